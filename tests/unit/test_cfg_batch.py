"""Batched CFG: one transformer call per step, with the same results as the two unbatched calls."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_server.errors import TaskCancelled
from qwen_image_server.jobs import Job
from qwen_image_server.models import cfg_attention, cfg_batch
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.runner import PipelineRunner, edit_areas
from qwen_image_server.models.spec import resolve_model


def _runner(folder, mode="on") -> PipelineRunner:
    spec = resolve_model(str(folder))
    return PipelineRunner(replace(spec, profile=RunProfile(cfg_batch=mode)), device="cpu")


@pytest.fixture(scope="module")
def t2i(tiny_t2i):
    return _runner(tiny_t2i)


@pytest.fixture(scope="module")
def edit(tiny_edit):
    return _runner(tiny_edit)


class _Count:
    """Counts the transformer's real forward passes (``img_in`` runs once in each)."""

    def __init__(self, runner):
        self.calls = 0
        self.batches = []

        def count(module, args):
            self.calls += 1
            self.batches.append(args[0].shape[0])

        self._handle = runner.pipe.transformer.img_in.register_forward_pre_hook(count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _latents(runner, batched: bool, **kwargs) -> torch.Tensor:
    """The pipeline's final latents, with batched CFG (the runner's per-call context) or without."""
    pipe = runner.pipe
    kwargs = dict(num_inference_steps=2, true_cfg_scale=4.0, output_type="latent", **kwargs)
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(7 + i) for i in range(kwargs.get("num_images_per_prompt", 1))]
    options = runner.spec.options
    with torch.inference_mode(), edit_areas(options.get("edit_area"), options.get("condition_area")):
        if batched:
            with runner.speed.call(pipe):
                return pipe(**kwargs).images
        return pipe(**kwargs).images


@pytest.mark.parametrize("n", [1, 2])
def test_batched_generation_equals_sequential_with_one_call_per_step(t2i, n):
    kwargs = dict(prompt="a red cube on a wooden table", negative_prompt="blurry", width=128, height=128, num_images_per_prompt=n)
    with _Count(t2i) as sequential_count:
        sequential = _latents(t2i, batched=False, **kwargs)
    with _Count(t2i) as batched_count:
        batched = _latents(t2i, batched=True, **kwargs)
    assert sequential_count.calls == 4 and sequential_count.batches == [n] * 4
    assert batched_count.calls == 2 and batched_count.batches == [2 * n] * 2
    assert batched.shape == sequential.shape
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4)
    assert sequential.abs().mean() > 0.1  # not trivially equal


def _seen_calls(runner):
    """Records the keyword arguments of the first block's calls: what each real transformer call (batched or not) runs."""
    seen: list[dict] = []
    block = runner.pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("a very detailed photograph of a red cube standing on a wooden table next to a window, morning light", " "),
        ("a cat", "blurry, low quality, watermark, jpeg artefacts, overexposed, extra fingers, deformed hands"),
    ],
    ids=["prompt-longer", "negative-longer"],
)
def test_texts_of_different_lengths_run_batched_with_split_attention_and_no_mask(t2i, prompt, negative):
    """The shorter text is padded; each half's attention sees only its own text: equal to the two unbatched calls."""
    assert cfg_attention.split_installed(t2i.pipe.transformer)
    assert t2i.speed.info["cfg_batch"]["padded_text"] == "split"
    kwargs = dict(prompt=prompt, negative_prompt=negative, width=128, height=128)
    seen, handle = _seen_calls(t2i)
    try:
        batched = _latents(t2i, batched=True, **kwargs)
    finally:
        handle.remove()
    sequential = _latents(t2i, batched=False, **kwargs)
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4)
    call = next(kw for kw in seen if kw["hidden_states"].shape[0] == 2)
    assert call["encoder_hidden_states_mask"] is None, "no mask: the attention backend runs unmasked"
    texts = (t2i.pipe.encode_prompt(prompt, device="cpu")[0], t2i.pipe.encode_prompt(negative, device="cpu")[0])
    lengths = sorted(t.shape[1] for t in texts)
    assert call["encoder_hidden_states"].shape[1] == lengths[1] and lengths[0] < lengths[1]
    assert call["joint_attention_kwargs"][cfg_attention.SPLIT_KEY].shape == (lengths[0],)


def test_split_attention_equals_the_masked_attention_of_the_padded_batch(t2i):
    """One block's processor on a padded batch: the split halves equal diffusers' masked joint attention."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    block = t2i.pipe.transformer.transformer_blocks[0]
    dim = block.attn.inner_dim
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 16, dim, generator=generator).repeat(2, 1, 1)
    text = torch.randn(2, 9, dim, generator=generator)
    text[1, 5:] = 0  # the second half's text is 5 tokens long, padded to 9
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    rope = t2i.pipe.transformer.pos_embed([(1, 4, 4)], max_txt_seq_len=9, device=torch.device("cpu"))
    with torch.inference_mode():
        masked = QwenDoubleStreamAttnProcessor2_0()(
            block.attn, image, text, encoder_hidden_states_mask=mask, image_rotary_emb=rope
        )
        split = cfg_attention.SplitTextAttnProcessor()(
            block.attn, image, text, image_rotary_emb=rope, qis_cfg_text_split=torch.empty(5, dtype=torch.bool)
        )
    torch.testing.assert_close(split[0], masked[0], rtol=1e-5, atol=1e-5)  # the image stream, both halves
    torch.testing.assert_close(split[1][:, :5], masked[1][:, :5], rtol=1e-5, atol=1e-5)  # every real text token
    torch.testing.assert_close(split[1][0], masked[1][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(split[0][1], masked[0][0], atol=1e-3), "the halves differ: their texts differ"


def test_batched_edit_equals_sequential(edit):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    kwargs = dict(prompt="make it blue", negative_prompt="ugly", image=image)
    with _Count(edit) as count:
        batched = _latents(edit, batched=True, **kwargs)
    sequential = _latents(edit, batched=False, **kwargs)
    assert count.calls == 2
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4)


def test_runner_batches_and_previews_and_no_cfg_is_unchanged(t2i):
    job = Job(mode="generate", prompt="a cat", seeds=[3], width=128, height=128, num_inference_steps=3, partial_images=1)
    previews = []
    with _Count(t2i) as count:
        image = t2i.run(job, on_partial=lambda i, j, img: previews.append(img))[0]
    assert count.calls == 3 and image.size == (128, 128)
    # the pipeline's calls, each computed: the unconditional one by the batch, not from a step cache
    assert {"transformer_calls": 6, "cached_calls": 0}.items() <= t2i.last_stats.items()
    assert len(previews) == 1 and previews[0].size == (128, 128)
    without_cfg = replace(job, true_cfg_scale=1.0, partial_images=0)
    with _Count(t2i) as count:
        t2i.run(without_cfg)
    assert count.calls == 3 and count.batches == [1, 1, 1], "true_cfg_scale 1: one unbatched call per step"


def test_cancelled_call_leaves_no_state_behind(t2i):
    job = Job(mode="generate", prompt="a cat", seeds=[3], width=128, height=128, num_inference_steps=4)
    calls = []
    with pytest.raises(TaskCancelled):
        t2i.run(job, should_stop=lambda: len(calls.append(1) or calls) > 2)
    assert t2i.speed.cfg.hook.state is None
    assert "encode_prompt" not in vars(t2i.pipe)
    with _Count(t2i) as count:
        t2i.run(replace(job, num_inference_steps=2))
    assert count.calls == 2


def test_auto_batches_only_when_memory_allows(t2i, monkeypatch):
    hook = t2i.speed.cfg.hook
    monkeypatch.setattr(hook, "mode", "auto")
    job = Job(mode="generate", prompt="a cat", seeds=[3], width=128, height=128, num_inference_steps=2)
    monkeypatch.setattr(hook, "free_bytes", lambda device: 0)
    with _Count(t2i) as count:
        t2i.run(job)
    assert count.calls == 4
    monkeypatch.setattr(hook, "free_bytes", lambda device: 64 << 30)
    with _Count(t2i) as count:
        t2i.run(job)
    assert count.calls == 2


def test_activation_estimate_scales_with_tokens_images_and_dtype():
    one = cfg_batch.extra_activation_bytes(3072, 4096 + 100, 1, torch.bfloat16)
    assert one == cfg_batch.ACTIVATION_FACTOR * 4196 * 3072 * 2
    assert cfg_batch.extra_activation_bytes(3072, 4196, 2, torch.float32) == 4 * one


@pytest.fixture
def foreign_processors(t2i):
    """The blocks' attention processors swapped back to diffusers' own (as another library might): no split path."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    for block in t2i.pipe.transformer.transformer_blocks:
        block.attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    yield
    assert cfg_attention.install_split_attention(t2i.pipe.transformer)


def test_without_the_split_processor_padded_texts_are_masked_and_unmasked_backends_run_unbatched(
    t2i, foreign_processors, monkeypatch
):
    kwargs = dict(prompt="a long prompt about a cat on a sofa", negative_prompt=" ", width=128, height=128)
    seen, handle = _seen_calls(t2i)
    try:
        with _Count(t2i) as count:
            batched = _latents(t2i, batched=True, **kwargs)
    finally:
        handle.remove()
    assert count.calls == 2 and t2i.speed.info["cfg_batch"]["padded_text"] in ("split", "masked")
    assert t2i.speed.cfg.summary()["padded_text"] == "masked"
    mask = seen[0]["encoder_hidden_states_mask"]
    assert mask is not None and mask.shape[0] == 2 and not mask[1].all()
    torch.testing.assert_close(batched, _latents(t2i, batched=False, **kwargs), rtol=1e-4, atol=1e-4)

    job = Job(mode="generate", prompt=kwargs["prompt"], negative_prompt=" ", seeds=[3], width=128, height=128,
              num_inference_steps=2)  # fmt: skip
    t2i.run(job)
    assert {"transformer_calls": 4, "cached_calls": 0}.items() <= t2i.last_stats.items()  # the masked batch of two is two calls

    monkeypatch.setattr(t2i.speed.cfg.hook, "takes_mask", False)
    with _Count(t2i) as count:
        _latents(t2i, batched=True, **kwargs)
    assert count.calls == 4, "a backend without masks: padded steps unbatched"


def test_a_backend_without_masks_still_batches_with_the_split_processor(t2i, monkeypatch):
    monkeypatch.setattr(t2i.speed.cfg.hook, "takes_mask", False)
    job = Job(mode="generate", prompt="a long prompt about a cat", negative_prompt=" ", seeds=[3], width=128, height=128,
              num_inference_steps=2)  # fmt: skip
    with _Count(t2i) as count:
        t2i.run(job)
    assert count.calls == 2 and count.batches == [2, 2]


def test_off_installs_nothing(tiny_t2i):
    runner = _runner(tiny_t2i, mode="off")
    assert runner.speed.cfg is None and "cfg_batch" not in runner.speed.info
    assert (
        not hasattr(runner.pipe.transformer, "_diffusers_hook")
        or runner.pipe.transformer._diffusers_hook.get_hook(cfg_batch.HOOK_NAME) is None
    )


def test_under_sequential_offload_padded_texts_are_masked_not_split(tiny_t2i):
    """Sequential offload moves each layer's weights to the GPU on every call of it: the split attention calls the
    attention projections once per half (twice the transfers for them), the masked path once. (Sequential offload
    itself needs CUDA: here the speed settings are applied to a resident tiny pipeline with that profile.)"""
    from qwen_image_server.models.cfg_attention import split_installed
    from qwen_image_server.models.speed import apply_speed_settings

    runner = _runner(tiny_t2i, mode="off")
    pipe = runner.pipe
    speed = apply_speed_settings(pipe, RunProfile(cfg_batch="on", offload="sequential"), "cpu", runner.dtype, "m")
    assert speed.info["cfg_batch"]["padded_text"] == "masked" and not split_installed(pipe.transformer)
    with _Count(runner) as count, speed.call(pipe):
        pipe(
            prompt="a red cube on a wooden table",
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=2,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
        )
    assert count.batches == [2, 2], "texts of two lengths, batched with a mask"


def test_batching_goes_on_after_group_offloads_cuda_order_trace(tiny_t2i, monkeypatch):
    """Group offload on CUDA traces the blocks' order in its first call with a hook on the transformer that it then
    removes. diffusers' ``remove_hook`` gave the removed hook's forward to the hook registered after it in place of
    that hook's own: batched CFG's hook fell out of the chain, and every call after the worker's warm-up ran two passes
    a step while ``/ready`` said batching was on. Group offload with CUDA's options is emulated on the CPU."""
    from offload_emulation import OffloadEmulation

    OffloadEmulation(monkeypatch)
    spec = resolve_model(str(tiny_t2i))
    runner = PipelineRunner(replace(spec, profile=RunProfile(cfg_batch="on", offload="group")), device="cpu")
    job = Job(mode="generate", prompt="a cat", seeds=[3], width=128, height=128, num_inference_steps=2)
    for index in range(3):
        with _Count(runner) as count:
            (image,) = runner.run(replace(job, prompt=f"a cat, take {index}"))
        assert image.size == (128, 128)
        assert count.batches == [2, 2], f"call {index}"
