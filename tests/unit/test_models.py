"""Tiny models: deterministic, loaded like real ones; the runner's cancellation and edit areas."""

import hashlib
import importlib
from dataclasses import replace

import numpy as np
import pytest

from qwen_image_server.errors import TaskCancelled
from qwen_image_server.jobs import Job
from qwen_image_server.models.previews import to_pil_images
from qwen_image_server.models.runner import PipelineRunner, edit_areas
from qwen_image_server.models.spec import resolve_model
from qwen_image_server.models.tiny import build_tiny_model


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", "text-to-image", seed=3)
    b = build_tiny_model(tmp_path / "b", "text-to-image", seed=3)
    c = build_tiny_model(tmp_path / "c", "text-to-image", seed=4)
    assert _digest(a) == _digest(b) != _digest(c)


def test_edit_model_folder_looks_like_a_real_one(tiny_edit):
    import json

    index = json.loads((tiny_edit / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]


@pytest.fixture(scope="module")
def t2i_runner(tiny_t2i):
    return PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu")


def test_runner_generates_requested_size_and_seeds_reproduce(t2i_runner):
    job = Job(mode="generate", prompt="a red cube", seeds=[5], width=256, height=256, num_inference_steps=2)
    first, second = t2i_runner.run(job)[0], t2i_runner.run(job)[0]
    assert first.size == (256, 256)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = t2i_runner.run(Job(**{**job.__dict__, "seeds": [6]}))[0]
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def _same_8_bit_images_as_diffusers(dtype: str, device: str) -> None:
    """``to_pil_images`` converts on the tensor's device; diffusers' ``output_type="pil"`` on the CPU in float32."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2, 3, 17, 23, generator=generator)
    values[0, 0, 0, :12] = (torch.arange(12) + 0.5) / 255  # halfway between two 8-bit values: rounded to even
    values[1, :, 0, :2] = torch.tensor([0.0, 1.0])
    images = values.to(device=device, dtype=getattr(torch, dtype))
    ours = [np.asarray(image) for image in to_pil_images(images)]
    theirs = [np.asarray(image) for image in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))]
    assert [a.shape for a in ours] == [(17, 23, 3)] * 2 and all(a.dtype == np.uint8 for a in ours)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_images_are_made_8_bit_exactly_as_diffusers_pil_output_makes_them(dtype):
    _same_8_bit_images_as_diffusers(dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_images_made_8_bit_on_a_gpu_equal_diffusers_pil_output(dtype):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _same_8_bit_images_as_diffusers(dtype, "cuda")


def test_runner_crops_to_the_output_size(t2i_runner):
    job = Job(mode="generate", prompt="p", seeds=[1], width=288, height=256, out_width=280, out_height=256, num_inference_steps=2)
    assert t2i_runner.run(job)[0].size == (280, 256)


@pytest.mark.parametrize("scale,preview_latent_side", [(1.0, 16), (0.5, 8), (0.25, 4)])
def test_previews_are_decoded_at_the_preview_scale_and_sent_at_the_image_size(
    t2i_runner, monkeypatch, scale, preview_latent_side
):
    """A preview costs a VAE decode; at scale 0.5 the decode has a quarter of the pixels, and the preview is enlarged
    to the image's size. The final image is decoded at full size whatever the scale."""
    vae = t2i_runner.pipe.vae
    decoded_sides = []
    decode = vae.decode

    def counting(latents, *args, **kwargs):
        decoded_sides.append(tuple(latents.shape[-2:]))
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting)
    previews = []
    job = Job(mode="generate", prompt="p", seeds=[1], width=128, height=128, num_inference_steps=4, partial_images=2)
    image = t2i_runner.run(replace(job, preview_scale=scale), on_partial=lambda i, j, preview: previews.append((j, preview)))
    assert decoded_sides == [(preview_latent_side, preview_latent_side)] * 2 + [(16, 16)], "two previews, then the image"
    assert [j for j, _ in previews] == [0, 1] and all(p.size == (128, 128) for _, p in previews)
    assert image[0].size == (128, 128)


def test_eager_models_on_a_gpu_run_once_before_ready_and_cpu_ones_do_not(t2i_runner, monkeypatch, caplog):
    from qwen_image_server.models import compile as compile_module
    from qwen_image_server.models import runner as runner_module

    warmed = []
    monkeypatch.setattr(runner_module, "warm_eager", warmed.append)
    t2i_runner.warm_up()
    assert warmed == [], "nothing is lazy on the CPU"
    monkeypatch.setattr(t2i_runner, "device", "cuda:0")
    t2i_runner.warm_up()
    assert warmed == [t2i_runner]
    monkeypatch.setattr(t2i_runner, "device", "cpu")  # the run below is a real one, on the CPU
    # what the warm-up runs: one image with true CFG at the model's default size (256x256 for the tiny model), 2 steps
    jobs = []
    run = t2i_runner.run
    monkeypatch.setattr(t2i_runner, "run", lambda job, *a, **k: jobs.append(job) or run(job, *a, **k))
    with caplog.at_level("INFO"):
        compile_module.warm_eager(t2i_runner)
    [job] = jobs
    assert (job.mode, job.width, job.height, job.n) == ("generate", 256, 256, 1)
    assert (job.num_inference_steps, job.true_cfg_scale) == (2, 4.0)
    assert t2i_runner.last_stats["transformer_calls"] == 4, "both passes of true CFG ran"
    assert f"warmed {t2i_runner.spec.id} at 256x256 in " in caplog.text


def test_runner_stops_at_the_next_step(t2i_runner):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2  # checked once before the call, then after each step

    job = Job(mode="generate", prompt="p", seeds=[1], width=256, height=256, num_inference_steps=50)
    with pytest.raises(TaskCancelled):
        t2i_runner.run(job, should_stop)
    assert len(calls) == 3


def test_edit_areas_swaps_and_restores_diffusers_constants():
    plus = importlib.import_module("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus")
    edit = importlib.import_module("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit")
    original = edit.calculate_dimensions
    with edit_areas(256 * 256, 64 * 64):
        assert plus.VAE_IMAGE_SIZE == 256 * 256 and plus.CONDITION_IMAGE_SIZE == 64 * 64
        assert edit.calculate_dimensions(1024 * 1024, 1.0)[:2] == (256, 256)
    assert plus.VAE_IMAGE_SIZE == 1024 * 1024 and plus.CONDITION_IMAGE_SIZE == 384 * 384
    assert edit.calculate_dimensions is original


@pytest.mark.parametrize("height,width", [(256, 256), (240, 320)])
def test_edit_runner_keeps_pixels_outside_the_mask(tiny_edit, height, width):
    runner = PipelineRunner(resolve_model(str(tiny_edit)), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[64:192, 64:192] = 255
    job = Job(mode="inpaint", prompt="p", seeds=[1], num_inference_steps=2, images=[image], mask=mask)
    out = np.asarray(runner.run(job)[0])
    assert out.shape == (height, width, 3), "a mask edit comes back at the input's size"
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert not np.array_equal(out[mask == 255], image[mask == 255])


def test_mask_edit_previews_are_at_the_final_size_with_the_input_kept(tiny_edit):
    """The pipeline works at its own size (here not the input's): previews come at the size the final image has,
    the input pasted back outside the mask, as the final image is made."""
    runner = PipelineRunner(resolve_model(str(tiny_edit)), device="cpu")
    height, width = 320, 256
    image = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[64:192, 64:192] = 255
    job = Job(mode="inpaint", prompt="p", seeds=[1], num_inference_steps=4, images=[image], mask=mask, partial_images=2)
    previews = []
    final = runner.run(job, on_partial=lambda i, j, preview: previews.append(np.asarray(preview)))[0]
    assert final.size == (width, height) and len(previews) == 2
    for preview in previews:
        assert preview.shape == (height, width, 3)
        assert np.array_equal(preview[mask == 0], image[mask == 0])


def test_a_mask_with_several_images_keeps_the_first_images_latents_outside_it_at_every_step(tiny_edit_plus, monkeypatch):
    """The edit-plus call of a mask edit of several images: at each step's end the latents outside the mask are the
    first image's, noised to the next step's level, and the pipeline goes on from those (the VAE decodes the last
    step's blend); the result has the first image's size, and its pixels outside the mask. n=2: each image its own."""
    import torch

    from qwen_image_server.models import mask_blend

    runner = PipelineRunner(resolve_model(str(tiny_edit_plus)), device="cpu")
    rng = np.random.default_rng(2)
    first, second = (rng.integers(0, 255, (256, 320, 3), dtype=np.uint8) for _ in range(2))
    mask = np.zeros((256, 320), np.uint8)
    mask[64:192, 96:224] = 255
    steps, blended, decoded = 3, [], []
    at_step_end = mask_blend.MaskBlend.at_step_end

    def spy(self, pipe, step, latents):
        out = at_step_end(self, pipe, step, latents)
        blended.append((step, latents.clone(), out.clone(), self))
        return out

    monkeypatch.setattr(mask_blend.MaskBlend, "at_step_end", spy)
    decode = runner.pipe.vae.decode
    monkeypatch.setattr(runner.pipe.vae, "decode", lambda z, *a, **k: decoded.append(z.clone()) or decode(z, *a, **k))
    job = Job(mode="inpaint", prompt="p", seeds=[1, 2], num_inference_steps=steps, images=[first, second], mask=mask,
              width=288, height=224)  # fmt: skip
    out = [np.asarray(image) for image in runner.run(job)]
    assert [step for step, *_ in blended] == list(range(steps))
    blend = blended[-1][3]
    keep = blend.keep.bool()
    assert 0 < keep.float().mean() < 1
    for _, before, after, _ in blended:
        assert torch.equal(after[keep], before[keep]), "inside the mask the model's latents are left as they are"
        assert not torch.equal(after[~keep], before[~keep]), "outside they are the first image's"
    assert torch.equal(blended[-1][2][~keep], blend.known[~keep])  # after the last step: exactly the first image's
    unpacked = runner.pipe._unpack_latents(blended[-1][2], 224, 288, runner.pipe.vae_scale_factor)
    assert len(decoded) == 1 and torch.equal(decoded[0], unpacked)  # the tiny VAE: latents mean 0, std 1
    for image in out:
        assert image.shape == first.shape and np.array_equal(image[mask == 0], first[mask == 0])
    assert not np.array_equal(out[0][mask == 255], out[1][mask == 255])


def test_torchvision_check_sees_a_missing_torchvision(monkeypatch):
    import sys

    from qwen_image_server.models import processor

    processor.torchvision_available.cache_clear()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    try:
        assert processor.torchvision_available() is False
    finally:
        processor.torchvision_available.cache_clear()


def test_edit_processor_folder_has_what_transformers_standard_loading_reads(tiny_edit):
    import json

    from transformers import Qwen2VLProcessor

    folder = tiny_edit / "processor"
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (folder / "video_preprocessor_config.json").is_file()
    try:  # where torchvision works this is the path the server takes
        processor = Qwen2VLProcessor.from_pretrained(folder)
    except ImportError as exc:  # without it, only the missing library may stop it
        assert "orchvision" in str(exc)
    else:
        assert processor.image_processor.merge_size == 2
