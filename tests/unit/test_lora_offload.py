"""LoRAs under the memory modes: loading or switching one leaves every component's offload as it was.

diffusers' LoRA loaders, given the pipeline, take every component's offload hooks off and put them back after:
under group offload they rebuilt each group (and made the text encoder's token embeddings, which the server keeps
on the device, a group of their own again), under model offload they re-chained every component. The server loads
LoRAs into the transformer only and leaves the other components alone; a compiled model's slot swaps its LoRA in
place on every request that changes it, where all of that ran once per switch.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen_image_server.config import Settings
from qwen_image_server.jobs import Job
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.lora_runtime import LoraSet
from qwen_image_server.models.runner import PipelineRunner

SIZE = 128


def _job(lora=None, prompt="a red cube") -> Job:
    return Job(mode="generate", prompt=prompt, seeds=[7], width=SIZE, height=SIZE, num_inference_steps=2, lora=lora)


def _spec(tiny_t2i, *lora_flags, **settings):
    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=list(lora_flags), **settings))
    return spec


def _pixels(runner, job) -> np.ndarray:
    return np.asarray(runner.run(job)[0].convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def resident_images(tiny_t2i, tiny_lora):
    """The base and LoRA images of a runner that keeps everything on its device (hot-swapped and fused LoRA)."""
    swapped = PipelineRunner(_spec(tiny_t2i, f"style={tiny_lora}"), device="cpu")
    fused = PipelineRunner(_spec(tiny_t2i, f"style={tiny_lora}:fuse=true"), device="cpu")
    images = {"base": _pixels(swapped, _job()), "style": _pixels(swapped, _job("style")), "fused": _pixels(fused, _job())}
    assert np.abs(images["style"] - images["base"]).max() > 10 and np.abs(images["fused"] - images["base"]).max() > 10
    return images


@pytest.mark.parametrize("offload", ["group", "text-encoder"])
@pytest.mark.parametrize("kind", ["adapter", "fused"])
def test_a_loaded_lora_leaves_the_text_encoders_offload_as_it_was(
    tiny_t2i, tiny_lora, resident_images, monkeypatch, offload, kind
):
    """Group offload with CUDA's options, emulated on the CPU (tests/offload_emulation.py). Loading the LoRA re-made
    the text encoder's groups, its token embeddings in one of their own (moved at every prompt encoding, where the
    server keeps them on the device), and the VAE's hooks; only the transformer's groups need making again (its new
    adapter layers), and only when they exist. The images are the resident runner's."""
    from offload_emulation import OffloadEmulation

    emulation = OffloadEmulation(monkeypatch)
    flag = f"style={tiny_lora}" + (":fuse=true" if kind == "fused" else "")
    runner = PipelineRunner(_spec(tiny_t2i, flag, offload=offload), device="cpu")
    embeddings = runner.pipe.text_encoder.model.language_model.embed_tokens
    assert emulation.resident == [embeddings] and id(embeddings.weight) not in emulation.owner
    assert emulation.applied.count("Qwen2_5_VLForConditionalGeneration") == 1
    assert "AutoencoderKLQwenImage" not in emulation.applied
    jobs = {"base": _job(), "style": _job("style")} if kind == "adapter" else {"fused": _job()}
    for name, job in jobs.items():
        with emulation.watching():
            pixels = _pixels(runner, job)
        assert emulation.used_offloaded == [], sorted(set(emulation.used_offloaded))
        assert np.abs(pixels - resident_images[name]).max() <= 1, name
    assert emulation.applied.count("Qwen2_5_VLForConditionalGeneration") == 1  # and nothing made them again since


def _render(pipe, loras, lora=None, watching=contextlib.nullcontext) -> np.ndarray:
    """The pipeline's image with ``lora`` switched in (``watching`` around the call, not the switch)."""
    with loras.applied(pipe, lora, None), torch.inference_mode(), watching():
        image = pipe(prompt="a red cube", width=SIZE, height=SIZE, num_inference_steps=2, true_cfg_scale=1.0,
                     generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil").images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("offload", ["group", "model"])
def test_a_compiled_models_lora_switch_moves_no_offload_hooks(tiny_t2i, tiny_lora, monkeypatch, offload):
    """A compiled model's LoRAs share one adapter slot and a switch copies the LoRA's weights into it
    (``lora_runtime``). Each switch made every component's offload anew: under group offload every group of the
    transformer, text encoder and VAE (the first call after it without its traced prefetch order), under model
    offload the whole chain. A switch now writes the slot in place: into the
    offloaded copies under group offload (what the next onload reads), and the images are those of the same switches
    without offload. (The transformer is not compiled here: what is checked is the switch, not the graph.)"""
    from diffusers.hooks import group_offloading

    from offload_emulation import OffloadEmulation

    def build(mode: str):
        """The model loaded as a worker loads it, in ``mode``, and the LoRA's slot as a compiled model gets it."""
        pipe = PipelineRunner(_spec(tiny_t2i, offload=mode), device="cpu").pipe
        spec = _spec(tiny_t2i, f"style={tiny_lora}", offload=mode)
        return pipe, LoraSet(pipe, replace(spec.profile, compile=True))

    plain, plain_loras = build("none")
    expected = [_render(plain, plain_loras, lora) for lora in (None, "style", None, "style")]
    assert not np.array_equal(expected[0], expected[1]) and np.array_equal(expected[0], expected[2])

    emulation = OffloadEmulation(monkeypatch) if offload == "group" else None
    pipe, loras = build(offload)
    assert loras.hotswap
    made_again: list[str] = []  # what a switch (``activate``) made anew
    switching: list[bool] = []
    activate = loras.activate

    def switch(*args, **kwargs):
        switching.append(True)
        try:
            return activate(*args, **kwargs)
        finally:
            switching.pop()

    def noting(what, function):
        return lambda *args, **kwargs: (switching and made_again.append(what(*args)), function(*args, **kwargs))[1]

    monkeypatch.setattr(loras, "activate", switch)
    reapply = group_offloading._maybe_remove_and_reapply_group_offloading
    monkeypatch.setattr(group_offloading, "_maybe_remove_and_reapply_group_offloading",
                        noting(lambda module: type(module).__name__, reapply))  # fmt: skip
    # (diffusers re-chains model offload at the end of every call of the pipeline too: not a switch's doing)
    monkeypatch.setattr(
        pipe, "enable_model_cpu_offload", noting(lambda *args: "the model offload chain", pipe.enable_model_cpu_offload)
    )
    images = []
    for lora in (None, "style", None, "style"):
        images.append(_render(pipe, loras, lora, emulation.watching if emulation else contextlib.nullcontext))
        assert emulation is None or emulation.used_offloaded == [], sorted(set(emulation.used_offloaded))
    assert made_again == [], "a LoRA switch re-made the offload of: " + ", ".join(made_again)
    for got, want in zip(images, expected, strict=True):
        assert np.abs(got - want).max() <= 1


def test_a_compiled_models_lora_switch_reaches_a_group_left_on_the_device(tiny_t2i, tiny_lora, monkeypatch):
    """A step cache that skips the blocks after the first leaves the group the first one prefetched on the device
    after a call. A slot switch then wrote that group's weights on the device only: the next onload read the CPU copy,
    which still held the LoRA before, and the switch was lost for that block. (The emulation copies on onload, as a
    GPU does.) The images are those of the same calls without offload, from the first call after the trace on."""
    from offload_emulation import OffloadEmulation
    from qwen_image_server.models.step_cache import StepCache, parse_policy

    policy = parse_policy("fbcache:threshold=1")

    def build(mode: str):
        pipe = PipelineRunner(_spec(tiny_t2i, offload=mode), device="cpu").pipe
        loras = LoraSet(pipe, replace(_spec(tiny_t2i, f"style={tiny_lora}", offload=mode).profile, compile=True))
        return pipe, loras, StepCache(pipe.transformer)

    def render(pipe, loras, cache, lora) -> np.ndarray:
        with loras.applied(pipe, lora, None), torch.inference_mode(), cache.run(policy, 4):
            image = pipe(prompt="a red cube", width=SIZE, height=SIZE, num_inference_steps=4, true_cfg_scale=1.0,
                         generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil").images[0]  # fmt: skip
        return np.asarray(image, dtype=np.int16)

    calls = [None, None, "style", "style", None]
    expected = [render(*build("none"), lora) for lora in calls]
    emulation = OffloadEmulation(monkeypatch)
    pipe, loras, cache = build("group")
    got = [render(pipe, loras, cache, lora) for lora in calls]
    left = [group for group, on in emulation.onloaded.items() if on]
    assert left, "the step cache left no group on the device: nothing is checked"
    for index in range(1, len(calls)):  # the first call traces group offload's order, without the cache
        assert np.abs(got[index] - expected[index]).max() <= 1, f"call {index} ({calls[index]})"


def test_a_hot_swapped_lora_on_fp8_stored_weights_under_group_offload(tiny_t2i, tiny_lora, monkeypatch):
    """``--weights-dtype fp8 --offload group`` with a hot-swapped LoRA: the adapters peft makes take their base layer's
    float8 dtype and are cast back to the run dtype after loading; the groups were made before that cast, so the
    next onload brought the float8 copies back and every request for the LoRA failed ("not implemented for
    'Float8_e4m3fn'"). The images are those of the same model without offload."""
    from offload_emulation import OffloadEmulation

    flag = f"style={tiny_lora}"
    resident = PipelineRunner(_spec(tiny_t2i, flag, weights_dtype=["fp8"]), device="cpu")
    expected = {name: _pixels(resident, _job(name)) for name in (None, "style")}
    emulation = OffloadEmulation(monkeypatch)
    runner = PipelineRunner(_spec(tiny_t2i, flag, weights_dtype=["fp8"], offload=["group"]), device="cpu")
    for name in (None, "style", None):
        with emulation.watching():
            pixels = _pixels(runner, _job(name))
        assert emulation.used_offloaded == []
        assert np.abs(pixels - expected[name]).max() <= 1, name


def test_hot_swapped_loras_switch_under_model_offload(tiny_t2i, tiny_lora, resident_images):
    """Model offload moves each component inside the pipeline call, under inference mode: the adapter weights it
    moved became inference tensors, and switching the LoRA on or off again (peft sets their ``requires_grad``) failed
    outside inference mode ("Setting requires_grad=True on inference tensor outside InferenceMode"): every LoRA
    request after the first switch was a 500. Each image is the resident runner's."""
    runner = PipelineRunner(_spec(tiny_t2i, f"style={tiny_lora}", offload=["model"]), device="cpu")
    for name in ("style", "base", "style", "base"):
        pixels = _pixels(runner, _job(None if name == "base" else name))
        assert np.abs(pixels - resident_images[name]).max() <= 1, name
