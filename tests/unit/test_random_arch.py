"""``random:`` model sources: the published architectures with random weights, built on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image_server.jobs import Job
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.random_arch import (
    build_components,
    init_random_,
    parameter_counts,
    text_encoder_config,
)
from qwen_image_server.models.random_source import SMALL_OVERRIDES, architectures, parse_random_source
from qwen_image_server.models.spec import resolve_model
from qwen_image_server.models.tiny import _SPECIAL_TOKENS, _make_tokenizer

NAMES = ("Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509")
SMALL = f"?{SMALL_OVERRIDES}&seed=3"


# --- the packaged architectures ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_full_sizes_counted_on_meta(name):
    counts = parameter_counts(name)
    assert counts["transformer"] == pytest.approx(20.43e9, rel=0.005)
    assert counts["text_encoder"] == pytest.approx(8.29e9, rel=0.005)
    assert counts["vae"] == pytest.approx(0.13e9, rel=0.05)


def test_published_values():
    arch = architectures()
    assert sorted(arch) == sorted(NAMES)
    assert [arch[n]["pipeline_class"] for n in NAMES] == [
        "QwenImagePipeline",
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
    ]
    for name in NAMES:  # the three differ in weights and pipeline only
        assert {k: v for k, v in arch[name].items() if k not in ("name", "pipeline_class", "image_processor")} == {
            k: v for k, v in arch[NAMES[0]].items() if k not in ("name", "pipeline_class")
        }
    t = arch[NAMES[0]]["transformer"]
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"], t["joint_attention_dim"], t["axes_dims_rope"]) == (
        60, 24, 128, 3584, [16, 56, 56]
    )  # fmt: skip
    s = arch[NAMES[0]]["scheduler"]
    assert (s["max_shift"], s["max_image_seq_len"], s["shift_terminal"], s["use_dynamic_shifting"]) == (0.9, 8192, 0.02, True)
    for name in NAMES[1:]:
        p = arch[name]["image_processor"]
        assert (p["patch_size"], p["merge_size"], p["temporal_patch_size"], p["min_pixels"], p["max_pixels"]) == (
            14,
            2,
            2,
            3136,
            12845056,
        )


def test_special_token_ids_are_the_byte_tokenizers():
    tokenizer = _make_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS}
    config = text_encoder_config(architectures()["Qwen/Qwen-Image-Edit"], tokenizer)
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert config.text_config.vocab_size == 152064 and not config.tie_word_embeddings


# --- building on a device with random weights ---------------------------------------------------
def _small(name: str = "Qwen/Qwen-Image", seed: int = 3) -> dict:
    return build_components(
        parse_random_source(f"random:{name}?{SMALL_OVERRIDES}").architecture(), "cpu", torch.float32, seed=seed
    )


def test_same_seed_same_weights_and_the_init_scheme():
    first, again, other = _small(seed=3), _small(seed=3), _small(seed=4)
    for key in ("transformer", "text_encoder", "vae"):
        a, b, c = (m[key].state_dict() for m in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), key
        assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()), key
    tr = first["transformer"]
    block = tr.transformer_blocks[0]
    assert torch.all(block.attn.norm_q.weight == 1) and torch.all(block.attn.to_q.bias == 0)
    assert float(block.img_mlp.net[0].proj.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert not any(p.requires_grad for p in tr.parameters()) and not tr.training


def test_values_drawn_on_another_device_and_copied_in_are_the_same_weights():
    """A component kept on the CPU of a GPU worker draws its values on the GPU (``fill_device``) and copies them in:
    the same draws, in the same order, as filling it where it lives (on a GPU: test_memory_gpu.py)."""
    resident, copied = (_small()["transformer"] for _ in range(2))
    init_random_(resident, seed=11)
    init_random_(copied, seed=11, fill_device="cpu")
    ours, theirs = resident.state_dict(), copied.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert float(copied.transformer_blocks[0].img_mlp.net[0].proj.weight.std()) == pytest.approx(0.02, rel=0.05)


def test_modules_are_made_on_the_target_device_in_the_target_dtype(monkeypatch):
    made: list[tuple[torch.device, torch.dtype]] = []
    original = torch.nn.Parameter.__new__

    def record(cls, data=None, requires_grad=True):
        if data is not None:
            made.append((data.device, data.dtype))
        return original(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", record)
    arch = parse_random_source(f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES}").architecture()
    build_components(arch, "meta", torch.bfloat16)
    assert made and {d.type for d, _ in made} == {"meta"}  # never materialised elsewhere first
    assert {t for _, t in made} == {torch.bfloat16}


def test_full_width_transformer_block_stays_finite_in_bf16():
    # One block at full width (3072 = 24 heads x 128), the text encoder shrunk; bf16 as on a GPU.
    arch = parse_random_source(f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES.replace('heads=1&', 'heads=24&', 1)}").architecture()
    arch["transformer"]["joint_attention_dim"] = 3584
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_server.models.random_arch import _config, _constructing

    with _constructing("cpu", torch.bfloat16):
        tr = QwenImageTransformer2DModel(**{**_config(arch["transformer"]), "axes_dims_rope": (16, 56, 56)})
    init_random_(tr, seed=0)
    assert tr.inner_dim == 3072 and next(tr.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        out = tr(
            hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
            encoder_hidden_states=torch.randn(1, 8, 3584, generator=g).bfloat16(),
            encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool),
            timestep=torch.tensor([0.5]).bfloat16(),
            img_shapes=[[(1, 4, 4)]],
            return_dict=False,
        )[0]
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all() and 0 < float(out.float().std()) < 100


def test_full_width_vae_round_trip_is_finite_and_not_saturated():
    from diffusers import AutoencoderKLQwenImage

    from qwen_image_server.models.random_arch import _config, _constructing

    with _constructing("cpu", torch.float32):
        vae = AutoencoderKLQwenImage(**_config(architectures()["Qwen/Qwen-Image"]["vae"]))
    init_random_(vae, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        image = vae.decode(torch.randn(1, 16, 1, 4, 4, generator=g), return_dict=False)[0]
        latents = vae.encode(torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1).latent_dist.mode()
    assert image.shape == (1, 3, 1, 32, 32) and latents.shape == (1, 16, 1, 4, 4)
    assert torch.isfinite(image).all() and torch.isfinite(latents).all()
    assert float(image.std()) > 0.01 and float((image.abs() == 1).float().mean()) < 0.5  # not clamped flat


@pytest.mark.parametrize("name", NAMES)
def test_runner_builds_and_runs_each_architecture(name, monkeypatch):
    from diffusers import DiffusionPipeline

    from qwen_image_server.models.runner import PipelineRunner

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("random: sources load nothing"))
    spec = resolve_model(f"random:{name}{SMALL}&edit_area=16384&condition_area=3136")
    torch.set_num_threads(1)
    runner = PipelineRunner(spec, device="cpu")
    assert runner.pipe.__class__.__name__ == spec.pipeline_class
    finite: list[bool] = []
    runner.pipe.transformer.register_forward_hook(lambda m, a, out: finite.append(bool(torch.isfinite(out[0]).all())))
    runner.pipe.vae.decoder.register_forward_hook(lambda m, a, out: finite.append(bool(torch.isfinite(out).all())))
    job = Job(
        mode="generate" if spec.can_generate else "edit",
        prompt="a red fox",
        seeds=[5],
        width=128,
        height=128,
        num_inference_steps=2,
    )
    if spec.can_edit:
        picture = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        job.images = [picture, picture[::-1]] if spec.multi_image else [picture]
    images = runner.run(job)
    assert [image.size for image in images] == [(128, 128)]
    assert len(finite) == 2 * 2 + 1 and all(finite)  # 2 steps x (cond + uncond), then the decoder
    assert runner.count_tokens("abc") == 3  # the byte-level tokenizer


@pytest.mark.parametrize("offload", ["none", "model"])
def test_random_sources_take_the_memory_modes(offload):
    """The full-size benchmark measures memory modes on random: sources, so they must apply there too."""
    from dataclasses import replace

    from qwen_image_server.models.runner import PipelineRunner

    spec = resolve_model(f"random:Qwen/Qwen-Image{SMALL}")
    spec = replace(spec, profile=RunProfile(weights_dtype="fp8", offload=offload))
    torch.set_num_threads(1)
    runner = PipelineRunner(spec, device="cpu")
    summary = runner.memory.summary()
    assert summary["offload"] == offload and summary["fp8_components"] == ["transformer", "text_encoder"]
    assert runner.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    job = Job(mode="generate", prompt="a red fox", seeds=[5], width=128, height=128, num_inference_steps=2)
    image = np.asarray(runner.run(job)[0])
    assert image.shape == (128, 128, 3) and image.std() > 0
