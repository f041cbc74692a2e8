"""``--quantize int4``: 4-bit group-wise weights for the transformer blocks' linear layers, multiplied in the run dtype.

The layer tests check the format (levels within half a step of the weight, packing, the fused unpacking equal to the
plain one); the pipeline tests run the tiny model with it alone and with the memory modes and LoRAs it combines with.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qwen_image_server.config import Settings
from qwen_image_server.jobs import Job
from qwen_image_server.models import int4
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.memory import MemoryMode
from qwen_image_server.models.memory_modes import check_mode
from qwen_image_server.models.profile import LoraSpec, ProfileError, RunProfile, check_profile
from qwen_image_server.models.runner import PipelineRunner

SIZE = 128
GENERATE = Job(mode="generate", prompt="a red cube", seeds=[7], width=SIZE, height=SIZE, num_inference_steps=2)


# --- the format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_levels_are_within_half_a_step_of_each_weight(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 48, dtype=dtype)
    with torch.no_grad():
        linear.weight[3, :64] = 0.25  # a constant group: its step is 0, every weight exact
        linear.weight[5, 64:128] *= 40  # a wide group beside narrow ones in the same row
    layer = int4.Int4Linear(linear, dtype)
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (48, 128)
    assert layer.weight_step.shape == layer.weight_low.shape == (48, 4) and layer.weight_step.dtype == dtype
    weight = int4.dequantize_plain(layer.weight_packed, layer.weight_step, layer.weight_low).float()
    step = layer.weight_step.float().repeat_interleave(64, dim=1)
    error = (weight - linear.weight.float()).abs()
    rounding = 0.5 if dtype == torch.float32 else 0.5 + 2**-8 * 16  # bf16 rounds the dequantized value too
    assert (error <= rounding * step + 1e-6).all()
    assert torch.equal(weight[3, :64], torch.full((64,), 0.25))
    assert error.mean() > 0, "the weights really are rounded to 16 levels"


def test_a_narrow_group_keeps_its_sixteen_levels_in_half_precision():
    """A step below float16's smallest normal number is kept (as a subnormal), not raised to it: a group whose range
    is 5e-4 still has levels 3.3e-5 apart, its weights within half a step."""
    weight = torch.linspace(0, 5e-4, 64).repeat(2, 1)
    for dtype in (torch.float16, torch.bfloat16):
        packed, step, low = int4.quantize_weight(weight, 64, dtype)
        error = (int4.dequantize_plain(packed, step, low).float() - weight).abs().max()
        assert step.float().max() < 4e-5 and error < 0.55 * 5e-4 / 15, dtype


def test_two_levels_a_byte_low_nibble_first():
    weight = torch.arange(16, dtype=torch.float32).repeat(2, 4)  # rows 0..15 repeated: each group's levels are 0..15
    packed, step, low = int4.quantize_weight(weight, 64, torch.float32)
    assert torch.equal(step, torch.ones(2, 1)) and torch.equal(low, torch.zeros(2, 1))
    assert packed[0, :4].tolist() == [0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4, 6 | 7 << 4]
    assert torch.equal(int4.dequantize_plain(packed, step, low), weight)


def test_the_layer_multiplies_by_its_unpacked_weight_and_keeps_the_input_dtype():
    torch.manual_seed(1)
    linear = nn.Linear(128, 64)
    layer = int4.Int4Linear(linear, torch.float32)
    x = torch.randn(2, 5, 128)
    weight = int4.dequantize_plain(layer.weight_packed, layer.weight_step, layer.weight_low)
    assert torch.equal(layer(x), nn.functional.linear(x, weight, linear.bias))
    assert (layer(x) - linear(x)).abs().mean() < 0.1 * linear(x).abs().mean(), "close to the original layer"
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_fused_unpacking_is_the_plain_one(monkeypatch):
    """On CUDA the unpacking runs compiled (one kernel); traced here with the eager backend, it must give the same
    weight for layers of several shapes (one graph with dynamic shapes)."""
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_DEVICES", ("cpu",))
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_BACKEND", "eager")
    for rows, cols in ((32, 128), (48, 256)):
        packed, step, low = int4.quantize_weight(torch.randn(rows, cols), 64, torch.float32)
        assert torch.equal(int4.dequantize_weight(packed, step, low), int4.dequantize_plain(packed, step, low))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_the_unpacking_check_takes_either_rounding_and_refuses_wrong_levels(dtype):
    """Inductor (CUDA's fused unpacking) computes ``level * step + low`` in float32 and rounds once; the plain function
    rounds twice. In bf16 they differ by several units in the last place where the two terms nearly cancel: both are
    right, while a wrong nibble, group or level is not."""
    torch.manual_seed(3)
    packed, step, low = int4.quantize_weight(torch.randn(96, 256), 64, dtype)
    plain = int4.dequantize_plain(packed, step, low)
    rounded_once = int4.dequantize_plain(packed, step.float(), low.float()).to(dtype)
    assert int4.unpacked_right(plain, packed, step, low)
    assert int4.unpacked_right(rounded_once, packed, step, low)
    swapped = (packed >> 4) | ((packed & 0xF) << 4)
    assert not int4.unpacked_right(int4.dequantize_plain(swapped, step, low), packed, step, low)
    assert not int4.unpacked_right(int4.dequantize_plain(packed, step.roll(1, dims=1), low), packed, step, low)
    one_level_off = plain.clone()
    one_level_off[5, 7] += step[5, 0]
    assert not int4.unpacked_right(one_level_off, packed, step, low)
    assert not int4.unpacked_right(plain[:, :-2], packed, step, low)


def test_the_probe_keeps_a_fused_unpacking_that_rounds_once_and_compiles_the_graph_requests_use(monkeypatch):
    """The start-up probe accepts inductor's single rounding in bf16 (it once compared with the plain function's values
    and so turned the fused unpacking off on every GPU) and compiles in inference mode, as requests run: the layers'
    calls after it add no graph."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_DEVICES", ("cpu",))

    def rounding_once(backend):
        return lambda packed, step, low: int4.dequantize_plain(packed, step.float(), low.float()).to(step.dtype)

    with monkeypatch.context() as patched:
        patched.setattr(int4, "_fused_dequantizer", rounding_once)
        assert int4.probe_unpacking("cpu", torch.bfloat16) is None
    counter = CompileCounter()
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_BACKEND", counter)
    assert int4.probe_unpacking("cpu", torch.bfloat16) is None
    assert counter.frame_count == 1
    # layers made as the model's are, when it loads (outside inference mode), called as requests call them (in it)
    layers = [
        int4.Int4Linear(nn.Linear(cols, rows, dtype=torch.bfloat16), torch.bfloat16) for rows, cols in ((40, 192), (72, 640))
    ]
    with torch.inference_mode():
        for layer in layers:
            unpacked = int4.dequantize_weight(layer.weight_packed, layer.weight_step, layer.weight_low)
            assert torch.equal(unpacked, int4.dequantize_plain(layer.weight_packed, layer.weight_step, layer.weight_low))
    assert counter.frame_count == 1


def test_unpacking_that_cannot_compile_falls_back_to_op_by_op_with_its_reason(tiny_t2i, monkeypatch):
    """On CUDA the start-up probe compiles the fused unpacking; where it fails (no Triton...) the layers unpack op by
    op and the worker's info says why, instead of every call of the model failing. Run here as if the CPU fused."""
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_DEVICES", ("cpu",))
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_BACKEND", "eager")
    assert int4.probe_unpacking("cpu", torch.float32) is None

    def broken(backend):
        def compiled(*args):
            raise RuntimeError("Cannot find a working triton installation\nmore")

        return compiled

    monkeypatch.setattr(int4, "_fused_dequantizer", broken)
    reason = int4.probe_unpacking("cpu", torch.float32)
    assert reason == "compiling the unpacking failed on cpu: RuntimeError: Cannot find a working triton installation"
    runner = _runner(tiny_t2i, quantize="int4")
    info = runner.speed.info["quantize"]
    assert (info["unpacking"], info["unpacking_reason"]) == ("eager", reason)
    assert not any(layer.fused for layer in _int4_layers(runner.pipe.transformer).values())
    assert runner.run(GENERATE)[0].size == (SIZE, SIZE), "the model serves, unpacking op by op"


def test_group_sizes_and_the_layers_taken():
    assert [int4.group_size(n) for n in (3072, 12288, 128, 16, 96, 15, 0)] == [64, 64, 64, 16, None, None, None]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.odd = nn.Linear(128, 128), nn.Linear(96, 32)

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([Block()])
    model.proj_out = nn.Linear(128, 16)
    assert int4.int4_linears(model) == ["transformer_blocks.0.to_q"], "outside the blocks or 96 wide: kept"
    assert int4.quantize_linears(model, torch.float32, "cpu") == 1
    assert isinstance(model.transformer_blocks[0].to_q, int4.Int4Linear)
    assert type(model.proj_out) is nn.Linear and type(model.transformer_blocks[0].odd) is nn.Linear


# --- the settings --------------------------------------------------------------------------------
def test_int4_reads_the_transformer_on_the_cpu_and_keeps_it_on_the_device():
    mode = MemoryMode(device="cuda:1", quantize="int4")
    assert [mode.load_device(c) for c in ("transformer", "text_encoder", "vae")] == ["cpu", "cuda:1", "cuda:1"]
    assert [mode.home(c) for c in ("transformer", "text_encoder", "vae")] == ["cuda:1"] * 3
    group = MemoryMode(device="cuda:1", quantize="int4", offload="group")
    assert group.home("transformer") == "cpu" and group.home("vae") == "cuda:1"


def test_int4_combinations():
    with pytest.raises(ProfileError, match=r"model m: quantize=int4 does not combine with offload=sequential"):
        check_mode("m", "auto", "sequential", "int4", "cuda:0")
    check_mode("m", "fp8", "group", "int4", "cuda:0")  # FP8 storage for the text encoder beside 4-bit layers
    # compile and fused LoRAs are refused with FP8 storage of the transformer, which int4 leaves alone
    fused = (LoraSpec("style", "/l.safetensors", "m", fuse=True),)
    check_profile("m", RunProfile(quantize="int4", weights_dtype="fp8", compile=True))
    check_profile("m", RunProfile(quantize="int4", weights_dtype="fp8", loras=fused))
    with pytest.raises(ProfileError, match="compile does not combine with weights_dtype=fp8"):
        check_profile("m", RunProfile(weights_dtype="fp8", compile=True))


# --- the pipeline --------------------------------------------------------------------------------
def _runner(tiny_t2i, *lora_flags, **settings) -> PipelineRunner:
    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=list(lora_flags), **settings))
    return PipelineRunner(spec, device="cpu")


def _pixels(runner, job=GENERATE) -> np.ndarray:
    return np.asarray(runner.run(job)[0].convert("RGB"), dtype=np.int16)


def _int4_layers(module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, int4.Int4Linear)}


@pytest.fixture(scope="module")
def reference(tiny_t2i) -> np.ndarray:
    return _pixels(_runner(tiny_t2i))


def test_int4_images_are_close_and_the_blocks_layers_are_4_bit(tiny_t2i, reference):
    runner = _runner(tiny_t2i, quantize="int4", weights_dtype="fp8")
    transformer = runner.pipe.transformer
    layers = _int4_layers(transformer)
    linear_in_blocks = [n for n, m in transformer.named_modules() if n.startswith("transformer_blocks.") and
                        isinstance(m, (nn.Linear, int4.Int4Linear))]  # fmt: skip
    assert sorted(layers) == sorted(linear_in_blocks) and len(layers) > 10
    assert type(transformer.proj_out) is nn.Linear and transformer.proj_out.weight.dtype == torch.float32
    assert not any(p.dtype == torch.float8_e4m3fn for p in transformer.parameters()), "FP8 storage is not the transformer's"
    assert runner.pipe.text_encoder.model.language_model.layers[0].mlp.gate_proj.weight.dtype == torch.float8_e4m3fn
    assert runner.memory.fp8_components == ("text_encoder",)
    info = runner.speed.info["quantize"]
    assert info["effective"] == "int4-weights" and info["layers"] == len(layers) and info["layers_in_run_dtype"] == 0
    assert info["group_sizes"] == sorted({m.group for m in layers.values()}) and 64 in info["group_sizes"]
    got = _pixels(runner)
    assert got.shape == reference.shape and 0 < np.abs(got - reference).mean() < 6
    variation = Job(mode="variation", prompt="a cube", seeds=[3], width=SIZE, height=SIZE, num_inference_steps=2,
                    images=[reference.astype(np.uint8)], strength=0.8)  # fmt: skip
    assert runner.run(variation)[0].size == (SIZE, SIZE)


def test_int4_under_group_offload_streams_its_packed_layers_with_their_blocks(tiny_t2i, monkeypatch):
    from offload_emulation import OffloadEmulation

    resident = _pixels(_runner(tiny_t2i, quantize="int4"))
    emulation = OffloadEmulation(monkeypatch)
    runner = _runner(tiny_t2i, quantize="int4", offload="group")
    assert _int4_layers(runner.pipe.transformer)
    for _ in range(2):  # the first call traces the blocks' order
        with emulation.watching():
            got = _pixels(runner)
        assert emulation.used_offloaded == [], sorted(set(emulation.used_offloaded))
        assert emulation.left_on_device() == []  # the packed weights are buffers: they go back to the CPU too
        assert np.abs(got - resident).max() <= 1


@pytest.mark.parametrize("offload", ["text-encoder", "model"])
def test_int4_with_the_offloads_that_keep_or_move_the_whole_transformer(tiny_t2i, offload):
    """README's 16-24 GB setting (``--quantize int4 --weights-dtype fp8 --offload text-encoder``) and model offload,
    which moves the 4-bit transformer whole: on the CPU (onload = offload = CPU) the images are the resident ones."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    resident = _pixels(_runner(tiny_t2i, quantize="int4", weights_dtype="fp8"))
    runner = _runner(tiny_t2i, quantize="int4", weights_dtype="fp8", offload=offload)
    assert _int4_layers(runner.pipe.transformer) and runner.memory.fp8_components == ("text_encoder",)
    if offload == "text-encoder":
        assert _is_group_offload_enabled(runner.pipe.text_encoder) and not _is_group_offload_enabled(runner.pipe.transformer)
    else:
        assert runner.pipe._all_hooks, "model CPU offload is on"
    assert np.abs(_pixels(runner) - resident).max() <= 1


def test_int4_with_loras(tiny_t2i, tiny_lora, monkeypatch):
    """A hot-swapped LoRA's layers keep the run dtype (peft wraps them) and switch per request; a fused one is merged
    before quantizing, so every layer is 4-bit and the image is the fused LoRA's, rounded."""
    from offload_emulation import OffloadEmulation

    emulation = OffloadEmulation(monkeypatch)
    swapped = _runner(tiny_t2i, f"style={tiny_lora}", quantize="int4", offload="group")
    wrapped = [n for n, m in swapped.pipe.transformer.named_modules() if n.endswith(".base_layer")]
    assert wrapped and all(type(swapped.pipe.transformer.get_submodule(n)) is nn.Linear for n in wrapped)
    assert _int4_layers(swapped.pipe.transformer), "the layers the LoRA does not adapt are 4-bit"
    assert swapped.speed.info["quantize"]["layers_in_run_dtype"] == len(wrapped), "its base layers, not its adapters"
    images = {}
    for lora in (None, "style", None):
        with emulation.watching():
            images[lora] = _pixels(swapped, replace(GENERATE, lora=lora))
        assert emulation.used_offloaded == []
    assert np.abs(images["style"] - images[None]).mean() > 1, "the LoRA changes the image"

    fused = _runner(tiny_t2i, f"style={tiny_lora}:fuse=true", quantize="int4")
    assert not [n for n, _ in fused.pipe.transformer.named_modules() if n.endswith(".base_layer")]
    assert fused.speed.info["quantize"]["layers_in_run_dtype"] == 0
    want = _pixels(_runner(tiny_t2i, f"style={tiny_lora}:fuse=true"))
    assert 0 < np.abs(_pixels(fused) - want).mean() < 6


def test_int4_layers_trace_into_compiled_blocks_without_graph_breaks_or_recompiles(tiny_t2i, monkeypatch):
    """``--compile`` with ``--quantize int4`` (and the text encoder in FP8 beside it, allowed there): each block is one
    graph (``fullgraph``) with the 4-bit layers' unpacking inside it, warmed once and never compiled again for
    prompts of other lengths. Traced with dynamo's eager backend: the graphs dynamo makes are the server's, without
    inductor's minutes of code generation on a CPU (inductor itself was run by hand: the same graph count)."""
    from qwen_image_server.models.compile import graph_count

    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: original(fn, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_DEVICES", ("cpu",))  # as on CUDA: the eager model unpacks compiled,
    monkeypatch.setattr(int4, "FUSED_DEQUANTIZE_BACKEND", "eager")  # the compiled blocks trace the plain unpacking
    before = graph_count()
    compiled = _runner(tiny_t2i, compile=True, compile_sizes=["256x256"], quantize="int4", weights_dtype="fp8")
    assert graph_count() > before and _int4_layers(compiled.pipe.transformer)
    eager = _runner(tiny_t2i, quantize="int4", weights_dtype="fp8")
    _pixels(eager, replace(GENERATE, width=256, height=256))  # its unpacking compiles here (dynamic shapes)
    warmed = graph_count()
    for prompt in ("a cat", "a lighthouse on a cliff at dusk, oil painting " * 4):
        job = replace(GENERATE, prompt=prompt, width=256, height=256)
        assert np.abs(_pixels(compiled, job) - _pixels(eager, job)).max() <= 1
    assert graph_count() == warmed
