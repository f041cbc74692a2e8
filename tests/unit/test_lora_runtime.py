"""LoRAs in a worker's runner on CPU: hot-swap, fused, the compiled-transformer slot, preset schedulers."""

import math
from dataclasses import replace

import numpy as np
import pytest

from qwen_image_server.config import Settings
from qwen_image_server.jobs import Job
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.lora_runtime import LoraSet
from qwen_image_server.models.runner import PipelineRunner


def _spec(tiny_t2i, *loras):
    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=list(loras)))
    return spec


def _job(lora=None, steps=2, cfg=1.0, seed=7, lora_scale=None):
    return Job(
        mode="generate",
        prompt="a cat",
        seeds=[seed],
        width=128,
        height=128,
        num_inference_steps=steps,
        true_cfg_scale=cfg,
        lora=lora,
        lora_scale=lora_scale,
    )


def _pixels(runner, job) -> np.ndarray:
    return np.asarray(runner.run(job)[0], dtype=np.int16)


@pytest.fixture(scope="module")
def swapped(tiny_t2i, tiny_lora):
    return PipelineRunner(_spec(tiny_t2i, f"style={tiny_lora}", f"fast={tiny_lora}:preset=lightning,scale=0.5"), device="cpu")


@pytest.fixture(scope="module")
def images(swapped):
    """Base, LoRA, base again: in this order on one runner."""
    return {"base": _pixels(swapped, _job()), "style": _pixels(swapped, _job("style")), "base_after": _pixels(swapped, _job())}


def test_the_tests_lora_file_is_what_peft_and_diffusers_save(tiny_t2i, tmp_path):
    """The tests' LoRAs are written without torch (model_files.make_tiny_lora): the same tensor names, shapes and
    dtype, and the same metadata, as a LoRA made with peft and saved by diffusers, at two ranks."""
    from safetensors import safe_open

    from model_files import make_tiny_lora, make_tiny_lora_with_peft
    from qwen_image_server.models.weights_files import read_header

    for rank in (4, 8):
        made = make_tiny_lora(tiny_t2i, tmp_path / f"numpy-{rank}" / "l.safetensors", rank=rank)
        saved = make_tiny_lora_with_peft(tiny_t2i, tmp_path / f"peft-{rank}" / "l.safetensors", rank=rank)
        layout = [{k: (v["dtype"], v["shape"]) for k, v in read_header(f).items()} for f in (made, saved)]
        assert layout[0] == layout[1] and len(layout[0]) == 2 * 2 * 9
        metadata = []
        for file in (made, saved):
            with safe_open(str(file), framework="np") as f:
                metadata.append(f.metadata())
                assert all(np.abs(f.get_tensor(k)).max() > 0 for k in f.keys())  # noqa: SIM118  (safe_open is no dict)
        assert metadata[0] == metadata[1]


def test_a_lora_changes_the_image_and_the_base_comes_back_bit_exactly(images):
    assert np.abs(images["style"] - images["base"]).mean() > 1.0
    assert np.array_equal(images["base"], images["base_after"])


def test_switching_between_loras_is_deterministic(swapped, images):
    fast = _pixels(swapped, _job("fast"))
    assert not np.array_equal(fast, images["style"])
    assert np.array_equal(_pixels(swapped, _job("style")), images["style"])


def test_a_request_sets_the_lora_strength_and_the_next_one_gets_its_own_back(swapped, images):
    assert np.array_equal(_pixels(swapped, _job("style", lora_scale=0.0)), images["base"]), "strength 0: the base image"
    assert np.array_equal(_pixels(swapped, _job("style", lora_scale=1.0)), images["style"]), "style is served at 1.0"
    half = _pixels(swapped, _job("style", lora_scale=0.5))
    assert np.abs(half - images["style"]).mean() > 0.5 and np.abs(half - images["base"]).mean() > 0.5
    assert np.array_equal(_pixels(swapped, _job("style")), images["style"])


def test_fused_lora_gives_the_hot_swapped_image(tiny_t2i, tiny_lora, images):
    fused = PipelineRunner(_spec(tiny_t2i, f"style={tiny_lora}:fuse=true"), device="cpu")
    assert not hasattr(fused.pipe.transformer, "peft_config") or not fused.pipe.transformer.peft_config, (
        "adapter weights unloaded"
    )
    for lora in ("style", None):  # the alias and the base id both run the fused weights
        image = _pixels(fused, _job(lora))
        assert np.abs(image - images["style"]).max() <= 2


def test_the_preset_scheduler_applies_during_the_call_and_is_restored(swapped):
    pipe = swapped.pipe
    own = pipe.scheduler
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(pipe.scheduler.config))
    try:
        swapped.run(_job("fast", steps=3))
        fast_calls = list(seen)
        seen.clear()
        swapped.run(_job("style", steps=2, cfg=2.0))
    finally:
        hook.remove()
    assert len(fast_calls) == 3, "one transformer call per step without CFG"
    assert all(c.base_shift == c.max_shift == math.log(3) and c.shift_terminal is None for c in fast_calls)
    assert fast_calls[0].base_image_seq_len == own.config.base_image_seq_len, "the model's sequence lengths are kept"
    assert len(seen) == 4 and all(c.shift_terminal == own.config.shift_terminal for c in seen), "no preset: the model's scheduler"
    assert pipe.scheduler is own


def _slot_images(tiny_t2i, tiny_lora, device="cpu", backend="eager"):
    """Base, LoRA, base, LoRA through the compiled-transformer slot; every call after the first under error_on_recompile."""
    import torch
    import torch._dynamo
    from diffusers import DiffusionPipeline

    spec = _spec(tiny_t2i, f"style={tiny_lora}", f"fast={tiny_lora}:preset=lightning,scale=0.5")
    profile = replace(spec.profile, compile=True)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = DiffusionPipeline.from_pretrained(str(tiny_t2i), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    loras = LoraSet(pipe, profile)
    assert loras.hotswap and list(pipe.transformer.peft_config) == ["hotswap_slot"]
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)

    def render(lora, scale=None):
        with loras.applied(pipe, lora, scale), torch.inference_mode():
            image = pipe(prompt="a cat", width=128, height=128, num_inference_steps=2, true_cfg_scale=1.0,
                         generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil").images[0]  # fmt: skip
        return np.asarray(image, dtype=np.int16)

    first = render(None)
    with torch._dynamo.config.patch(error_on_recompile=True):
        return first, render("style"), render(None), render("style"), render("style", 0.0)


def test_compiled_transformer_slot_swaps_without_recompiling(tiny_t2i, tiny_lora, images):
    first, style, base, again, zero = _slot_images(tiny_t2i, tiny_lora)
    assert np.abs(first - images["base"]).max() <= 1 and np.array_equal(first, base)
    assert np.abs(style - images["style"]).max() <= 2 and np.array_equal(style, again)
    assert np.abs(zero - base).max() <= 1, "a request's strength 0 in the slot: the base image, without recompiling"


def test_loading_several_loras_warns_nothing(tiny_t2i, tmp_path):
    """peft warned "Already found a `peft_config` attribute in the model ... Make sure to know what you are doing!"
    for each LoRA after the first, in every worker's start-up log: several adapters are what a set of LoRAs is."""
    import warnings

    import torch
    from diffusers import DiffusionPipeline

    from model_files import make_tiny_lora

    loras = [f"{name}={make_tiny_lora(tiny_t2i, tmp_path / f'{name}.safetensors', seed=i)}" for i, name in enumerate("ab")]
    pipe = DiffusionPipeline.from_pretrained(str(tiny_t2i), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraSet(pipe, _spec(tiny_t2i, *loras).profile)
    assert not [str(w.message) for w in caught if "peft_config" in str(w.message)]
    assert set(pipe.transformer.peft_config) == {"lora0", "lora1"}  # both loaded


def test_the_compiled_slot_keeps_each_loras_weights_whatever_dtype_the_first_one_has(tiny_t2i, tmp_path):
    """The slot's tensors took the dtype of the first LoRA listed for each layer: a float16 LoRA first rounded a
    float32 one swapped in after it (on a float32 model: other pixels than the same LoRA without the compiled slot)."""
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.numpy import load_file, save_file

    from model_files import make_tiny_lora

    half = make_tiny_lora(tiny_t2i, tmp_path / "half.safetensors", seed=1)
    save_file({k: v.astype(np.float16) for k, v in load_file(str(half)).items()}, str(half), metadata={"format": "pt"})
    full = make_tiny_lora(tiny_t2i, tmp_path / "full.safetensors", seed=2)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_t2i), dtype=torch.float32)
    slot = LoraSet(pipe, replace(_spec(tiny_t2i, f"half={half}", f"full={full}").profile, compile=True))
    laid_out, own = slot._laid_out("full", 1.0), load_file(str(full))
    assert len(own) == len(laid_out) > 0
    for name, value in own.items():
        assert laid_out[name].dtype == torch.float32, name
        kept = laid_out[name][: value.shape[0]] if name.endswith("lora_A.weight") else laid_out[name][:, : value.shape[1]]
        scaling = slot._weights["full"]["scaling"] if name.endswith("lora_B.weight") else 1.0
        assert torch.equal(kept, torch.from_numpy(value) * scaling), name


def test_the_compiled_slot_holds_loras_of_other_layers_and_ranks(tiny_t2i, tmp_path):
    """LoRAs of other layers and ranks, one with ranks that differ by layer: each swapped into the compiled model's
    slot gives its eager image, and the base comes back, without recompiling. peft refused such swaps (their
    configs differ from the slot's), diffusers then deleted the slot, and the LoRA requests after ran as the base."""
    import torch
    import torch._dynamo
    from diffusers import DiffusionPipeline

    from model_files import make_tiny_lora

    loras = [
        f"a={make_tiny_lora(tiny_t2i, tmp_path / 'a.safetensors', seed=1, rank=2, targets=('to_q',))}",
        f"b={make_tiny_lora(tiny_t2i, tmp_path / 'b.safetensors', seed=2, rank=4, targets=('to_q', 'to_k'))}",
        f"m={make_tiny_lora(tiny_t2i, tmp_path / 'm.safetensors', seed=3, targets=('to_q', 'to_k'), ranks={'to_q': 2})}",
    ]
    eager = PipelineRunner(_spec(tiny_t2i, *loras), device="cpu")
    want = {name: _pixels(eager, _job(name)) for name in ("a", "b", "m", None)}
    pipe = DiffusionPipeline.from_pretrained(str(tiny_t2i), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    slot = LoraSet(pipe, replace(_spec(tiny_t2i, *loras).profile, compile=True))
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", dynamic=False)

    def render(lora):
        with slot.applied(pipe, lora), torch.inference_mode():
            image = pipe(prompt="a cat", width=128, height=128, num_inference_steps=2, true_cfg_scale=1.0,
                         generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil").images[0]  # fmt: skip
        return np.asarray(image, dtype=np.int16)

    assert np.abs(render(None) - want[None]).max() <= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("b", None, "a", "m", None, "m", "b"):
            got = render(name)
            assert np.abs(got - want[name]).max() <= 2, name
    assert len({want["a"].tobytes(), want["b"].tobytes(), want["m"].tobytes(), want[None].tobytes()}) == 4


def test_the_compiled_slot_applies_a_loras_own_alpha(tiny_t2i, tmp_path):
    """A LoRA saved with its config (``lora_alpha`` twice its rank: scaled by 2): the compiled model's slot gives the
    eager image. The slot read the config without the pipeline's ``transformer.`` prefix and scaled by 1."""
    import torch
    from diffusers import DiffusionPipeline

    from model_files import make_tiny_lora_with_peft

    lora = f"strong={make_tiny_lora_with_peft(tiny_t2i, tmp_path / 'strong.safetensors', seed=4, rank=2, alpha=4)}"
    eager = PipelineRunner(_spec(tiny_t2i, lora), device="cpu")
    want, base = _pixels(eager, _job("strong")), _pixels(eager, _job())
    pipe = DiffusionPipeline.from_pretrained(str(tiny_t2i), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    slot = LoraSet(pipe, replace(_spec(tiny_t2i, lora).profile, compile=True))
    with slot.applied(pipe, "strong"), torch.inference_mode():
        image = pipe(prompt="a cat", width=128, height=128, num_inference_steps=2, true_cfg_scale=1.0,
                     generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil").images[0]  # fmt: skip
    got = np.asarray(image, dtype=np.int16)
    assert np.abs(got - want).max() <= 2 and np.abs(want - base).mean() > 0.5


@pytest.mark.gpu
def test_inductor_compiled_slot_on_gpu(tiny_t2i, tiny_lora):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    first, style, base, again, _ = _slot_images(tiny_t2i, tiny_lora, device="cuda", backend="inductor")
    assert np.array_equal(first, base) and np.array_equal(style, again)
    assert np.abs(style - first).mean() > 1.0


def test_lora_names_with_dots_serve_hot_swapped_and_fused(tiny_t2i, tiny_lora, images):
    """A LoRA is a model id, and "lightning-v1.0" a natural one; peft's adapter names are module names, which may not
    hold a ".": the worker failed to load such a LoRA (hot-swapped or fused)."""
    swapped = PipelineRunner(_spec(tiny_t2i, f"style.v1={tiny_lora}"), device="cpu")
    assert np.array_equal(_pixels(swapped, _job("style.v1")), images["style"])
    assert np.array_equal(_pixels(swapped, _job()), images["base"])
    fused = PipelineRunner(_spec(tiny_t2i, f"style.v1={tiny_lora}:fuse=true"), device="cpu")
    assert np.abs(_pixels(fused, _job("style.v1")) - images["style"]).max() <= 2


def test_hot_swapped_loras_run_on_fp8_stored_weights(tiny_t2i, tiny_lora):
    """``--weights-dtype fp8`` stores the base layers in float8; peft made each new adapter float8 too, in which its
    matmuls cannot run (a LoRA request failed). The adapters now run in the run dtype; the base layers stay FP8."""
    import torch

    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=[f"style={tiny_lora}"], weights_dtype="fp8"))
    runner = PipelineRunner(spec, device="cpu")
    layer = runner.pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert {p.dtype for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())} == {torch.float32}
    base = _pixels(runner, _job())
    styled = _pixels(runner, _job("style"))
    assert np.abs(styled - base).mean() > 0.5  # the LoRA shows
    assert np.array_equal(_pixels(runner, _job()), base)


def test_a_fused_lora_on_fp8_stored_weights_is_refused_before_loading(tiny_t2i, tiny_lora):
    from qwen_image_server.models.spec import ModelConfigError

    with pytest.raises(ModelConfigError, match="LoRA style with fuse=true does not combine with weights_dtype=fp8"):
        resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=[f"style={tiny_lora}:fuse=true"], weights_dtype="fp8"))
    resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=[f"style={tiny_lora}:fuse=true"], quantize="fp8"))
