"""FP8 linear layers: numerics, which layers are converted, the start-up probe and its fallback."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qwen_image_server.jobs import Job
from qwen_image_server.models import fp8
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model


def _cpu_takes_rowwise_scales() -> bool:
    """Whether this torch build's CPU ``_scaled_mm`` multiplies with per-row and per-column scales, as ``FP8Linear``
    does: 2.13's does, 2.11's (the GPU image's) takes one scale per tensor there. The server never multiplies in FP8
    on a CPU (the probe refuses it); only these tests take that path there."""
    a = torch.ones(16, 16).to(fp8.FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except Exception:  # RuntimeError here; another build may say NotImplementedError: never a collection error
        return False
    return True


#: The tests that run ``FP8Linear``'s FP8 matmul on the CPU.
needs_cpu_fp8_matmul = pytest.mark.skipif(
    not _cpu_takes_rowwise_scales(),
    reason=f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only (FP8Linear's are per row)",
)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@needs_cpu_fp8_matmul
def test_fp8_linear_is_close_to_the_linear_it_replaces(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64, bias=bias).to(dtype)
    x = torch.randn(2, 7, 96, dtype=dtype)  # leading dims are flattened and restored
    quantized = fp8.FP8Linear(linear, dtype)
    out = quantized(x)
    assert out.shape == (2, 7, 64) and out.dtype == dtype
    assert quantized.weight.dtype == torch.float8_e4m3fn and quantized.weight_scale.shape == (1, 64)
    assert _relative_error(out, linear(x)) < 0.06
    assert _relative_error(out, nn.Linear(96, 64, bias=bias).to(dtype)(x)) > 0.5  # another layer is far off


@needs_cpu_fp8_matmul
def test_fused_quantizer_is_one_graph_for_every_token_count_and_matches_the_plain_one(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = fp8.FP8Linear(linear, torch.float32)
    inputs = [torch.randn(rows, 64) * scale for rows, scale in ((5, 1.0), (17, 30.0), (40, 0.01), (333, 3.0))]
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_DEVICES", ())
    plain = [layer(x) for x in inputs]

    torch._dynamo.reset()
    fused = CompileCounter()  # a torch.compile backend that counts the graphs it is given and runs them as they are
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_DEVICES", ("cpu",))
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_BACKEND", fused)
    for x, reference in zip(inputs, plain, strict=True):
        values, scale = fp8.quantize_activations(x)
        expected_values, expected_scale = fp8.quantize_rowwise(x)
        assert torch.equal(values.float(), expected_values.float()) and torch.equal(scale, expected_scale)
        assert torch.equal(layer(x), reference)
    assert fused.frame_count == 1  # compiled once, dynamic in the token count: no graph per request size
    assert fp8.activation_quantizer("cpu") == "fused" and fp8.activation_quantizer("meta") == "eager"

    # Inside a region that is compiled itself (--compile), the plain function is traced into that region's graph.
    outer = CompileCounter()
    compiled = torch.compile(layer, backend=outer, fullgraph=True)
    assert torch.equal(compiled(inputs[1]), plain[1])
    assert outer.frame_count == 1 and fused.frame_count == 1


@needs_cpu_fp8_matmul
def test_padded_rows_in_a_compiled_block_are_one_graph_whatever_the_prompt_length(monkeypatch):
    """On CUDA the row count (batch times text length for the text stream) is padded to a multiple of 16. Inside a
    compiled block whose text length is dynamic (``--compile``) that padding must not be a branch on the length: its
    guard would recompile the block for the first prompt whose length falls in the other case than the warm-up's.
    Run here as if the CPU padded, with the eager layer as the reference."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(fp8, "PADDED_ROWS_DEVICES", ("cpu",))
    torch.manual_seed(0)
    layer = fp8.FP8Linear(nn.Linear(64, 48), torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    for length in (7, 16, 23, 32, 9):  # the first is the warm-up's; then aligned and unaligned in turn
        x = torch.randn(2, length, 64)  # batched CFG: two rows a token
        torch._dynamo.mark_dynamic(x, 1)
        out = compiled(x)
        assert out.shape == (2, length, 48) and torch.equal(out, layer(x))
    assert counter.frame_count == 1


def _tiny_transformer(folder):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(folder / "transformer")


def test_only_the_blocks_linear_layers_become_fp8(tiny_t2i):
    model = _tiny_transformer(tiny_t2i)
    block_bytes = sum(b.numel() * b.element_size() for b in model.transformer_blocks.parameters())
    count = fp8.quantize_linears(model, torch.float32, "cpu")
    linears = [
        m for n, m in model.named_modules() if n.startswith("transformer_blocks.") and isinstance(m, (nn.Linear, fp8.FP8Linear))
    ]
    assert count == len(linears) > 0
    assert all(isinstance(m, fp8.FP8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert {type(m) for m in (model.img_in, model.txt_in, model.proj_out, model.norm_out.linear)} == {nn.Linear}
    after = sum(
        t.numel() * t.element_size() for t in [*model.transformer_blocks.parameters(), *model.transformer_blocks.buffers()]
    )
    assert after < 0.35 * block_bytes  # fp32 → fp8 weights (plus small scales, biases and norms)


@needs_cpu_fp8_matmul
def test_fp8_transformer_output_is_close_to_the_unquantized_one(tiny_t2i):
    model = _tiny_transformer(tiny_t2i)
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 16),
        encoder_hidden_states=torch.randn(1, 10, 32),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 8, 8)]],
        return_dict=False,
    )
    with torch.inference_mode():
        reference = model(**inputs)[0]
        fp8.quantize_linears(model, torch.float32, "cpu")
        quantized = model(**inputs)[0]
    # 0.3% here; with the blocks' linear layers all zeroed this tiny model's output moves by ~6%
    assert _relative_error(quantized, reference) < 0.02


@needs_cpu_fp8_matmul
def test_probe_passes_when_fp8_is_fast_enough_and_falls_back_otherwise():
    shapes = ((32, 64, 48),)
    supported = lambda device: None  # noqa: E731

    def timer(ratio):
        return lambda kind, fn: (fn(), 1.0 if kind == "dense" else 1.0 / ratio)[1]

    fast = fp8.probe_fp8("cpu", torch.float32, timer=timer(1.5), shapes=shapes, supported=supported)
    assert fast.ok and fast.speedup == pytest.approx(1.5)
    slow = fp8.probe_fp8("cpu", torch.float32, timer=timer(1.02), shapes=shapes, supported=supported)
    assert not slow.ok and "1.02x" in slow.reason and slow.summary()["speedup"] == pytest.approx(1.02)


def test_probe_refuses_devices_without_fp8_and_failing_kernels():
    refused = fp8.probe_fp8("cpu", torch.float32)
    assert not refused.ok and "cpu" in refused.reason and refused.speedup is None

    def broken(kind, fn):
        raise RuntimeError("no kernel image is available for execution on the device")

    failed = fp8.probe_fp8("cpu", torch.float32, timer=broken, shapes=((16, 16, 16),), supported=lambda d: None)
    assert not failed.ok and "no kernel image" in failed.reason


def _no_compiler(graph, example_inputs):
    """A torch.compile backend that fails as inductor does on a CUDA machine without a working Triton."""
    raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or it is too old.")


@needs_cpu_fp8_matmul
def test_a_failing_compiled_quantizer_leaves_fp8_matmuls_on_with_activations_quantized_op_by_op(monkeypatch):
    """Compiling the fused activation quantizer can fail where FP8 matmuls work (no Triton, an inductor error): FP8
    was then off for the worker's whole life ("FP8 matmul failed"); now only the fusing is."""
    torch._dynamo.reset()
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_DEVICES", ("cpu",))
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_BACKEND", "eager")
    assert fp8.probe_fused_quantizer("cpu", torch.float32) is None
    assert fp8.probe_fused_quantizer("meta", torch.float32) is None  # a device that does not fuse: nothing to probe
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE_BACKEND", _no_compiler)
    reason = fp8.probe_fused_quantizer("cpu", torch.float32)
    assert reason is not None and "activation quantizer failed on cpu" in reason and "triton" in reason

    def timer(kind, fn):
        fn()  # the FP8 layer's call would raise if it still went to the compiled quantizer
        return 1.0 if kind == "dense" else 1.0 / 1.5

    probe = fp8.probe_fp8("cpu", torch.float32, timer=timer, shapes=((32, 64, 48),), supported=lambda device: None)
    assert probe.ok and probe.activations == "eager" and "triton" in probe.fused_failed
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Linear(64, 48)])
    info = fp8.apply_fp8(model, "cpu", torch.float32, probe=lambda device, dtype: probe)
    assert info["effective"] == "fp8" and info["activations"] == "eager" and "triton" in info["fused_failed"]
    (layer,) = model.transformer_blocks
    assert isinstance(layer, fp8.FP8Linear) and layer.fused is False and layer.matmul == "scaled_mm"
    assert layer(torch.randn(5, 64)).shape == (5, 48)  # runs without the compiled quantizer


def test_the_compile_probes_raise_out_of_memory_also_when_the_compiler_ran_out():
    """Dynamo wraps what a compiler raises (BackendCompilerFailed): out of memory while inductor compiled was read as
    the compiler failing, and the worker ran without the compiled function for its whole life."""

    def compiling(raised):
        def check():
            def backend(graph, example_inputs):
                raise raised

            torch.compile(lambda x: x + 1, backend=backend)(torch.ones(2))

        return check

    with pytest.raises(Exception) as caught:
        fp8.compiled_probe("the quantizer", "cuda", compiling(torch.OutOfMemoryError("CUDA out of memory")))
    assert type(caught.value).__name__ == "BackendCompilerFailed"
    reason = fp8.compiled_probe("the quantizer", "cuda", compiling(RuntimeError("Cannot find a working triton installation")))
    assert reason == "compiling the quantizer failed on cuda: RuntimeError: Cannot find a working triton installation"


def test_out_of_memory_in_the_probe_is_raised_not_taken_as_fp8_failing():
    """A worker too short of memory for the probe's few GEMMs cannot serve either: the load fails (and is retried) as
    with int4's probe, instead of the worker running for its whole life with FP8 matmuls off."""

    def out_of_memory(kind, fn):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    with pytest.raises(torch.OutOfMemoryError):
        fp8.probe_fp8("cpu", torch.float32, timer=out_of_memory, shapes=((16, 16, 16),), supported=lambda d: None)


def test_probe_fallback_keeps_fp8_weights_and_multiplies_in_the_run_dtype(tiny_t2i):
    """The memory plan counted FP8 weights: they stay FP8 when FP8 matmuls are not worth it; only the matmul changes."""
    model = _tiny_transformer(tiny_t2i)
    block_bytes = sum(b.numel() * b.element_size() for b in model.transformer_blocks.parameters())
    inputs = dict(
        hidden_states=torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(1)),
        encoder_hidden_states=torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(2)),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 8, 8)]],
        return_dict=False,
    )
    with torch.inference_mode():
        reference = model(**inputs)[0]
    info = fp8.apply_fp8(
        model, "cpu", torch.float32, probe=lambda device, dtype: fp8.Fp8Probe(False, "FP8 is only 0.90x as fast", speedup=0.9)
    )
    assert info["effective"] == "fp8-weights" and info["matmul"] == "float32" and "0.90x" in info["reason"]
    layers = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(layers) == info["layers"] > 0 and {m.matmul for m in layers} == {"dequant"}
    after = sum(
        t.numel() * t.element_size() for t in [*model.transformer_blocks.parameters(), *model.transformer_blocks.buffers()]
    )
    assert after < 0.35 * block_bytes  # the weights are FP8 all the same
    with torch.inference_mode():
        assert _relative_error(model(**inputs)[0], reference) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_fp8_linear_is_the_scaled_weight_times_the_input(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64).to(dtype)
    layer = fp8.FP8Linear(linear, dtype, matmul="dequant")
    x = torch.randn(3, 5, 96, dtype=dtype)
    weight = layer.weight.float() * layer.weight_scale.t()
    expected = nn.functional.linear(x.float(), weight, layer.bias.float())
    out = layer(x)
    assert out.shape == (3, 5, 64) and out.dtype == dtype
    assert _relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 0.02)
    assert _relative_error(out, linear(x)) < 0.06


class _OnARunDevice(torch.overrides.TorchFunctionMode):
    """``tensor.to("cuda")`` on a machine without one: a copy that stands in for the tensor on the GPU (recorded in
    ``copies``); other calls as they are."""

    def __init__(self):
        super().__init__()
        self.copies: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        targets = [*args[1:], kwargs.get("device")]
        if func is torch.Tensor.to and any(str(target).startswith("cuda") for target in targets):
            self.copies.append(args[0].detach().clone())
            return self.copies[-1]
        return func(*args, **kwargs)


def test_layers_offloaded_to_the_cpu_are_quantized_on_the_run_device_and_stay_on_the_cpu(monkeypatch):
    """``--quantize fp8`` with ``--offload group`` (or ``model``): the transformer loads on the CPU, where quantizing
    took 0.15-0.2 s per 12288x3072 layer at a GPU worker's two threads (80-100 s for Qwen-Image, at every worker start). Each
    layer's weight goes to the run device to be quantized, and the FP8 result comes back to where the weight was."""
    quantized_inputs = []
    real = fp8.quantize_rowwise
    monkeypatch.setattr(fp8, "quantize_rowwise", lambda x: (quantized_inputs.append(x), real(x))[1])
    torch.manual_seed(0)
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48))])
    reference = [layer.weight.detach().clone() for layer in model.transformer_blocks[0]]
    with _OnARunDevice() as run_device:
        assert fp8.quantize_linears(model, torch.float32, "cuda", matmul="dequant") == 2
    assert len(quantized_inputs) == 2
    assert all(any(x is copy for copy in run_device.copies) for x in quantized_inputs)  # on the run device
    for layer, weight in zip(model.transformer_blocks[0], reference, strict=True):
        assert isinstance(layer, fp8.FP8Linear) and layer.weight.device.type == "cpu"
        assert layer.weight.dtype == fp8.FP8_DTYPE and layer.weight_scale.shape == (1, weight.shape[0])
        assert _relative_error(layer.weight.float() * layer.weight_scale.t(), weight) < 0.06


def _image(runner) -> np.ndarray:
    job = Job(mode="generate", prompt="a red cube", seeds=[5], width=128, height=128, num_inference_steps=2)
    return np.asarray(runner.run(job)[0]).astype(np.float64)


@needs_cpu_fp8_matmul
def test_tiny_pipeline_with_fp8_forced_gives_a_close_image(tiny_t2i, monkeypatch):
    spec = resolve_model(str(tiny_t2i))
    reference = _image(PipelineRunner(spec, device="cpu"))
    monkeypatch.setattr(fp8, "probe_fp8", lambda device, dtype: fp8.Fp8Probe(True, "forced", speedup=2.0))
    runner = PipelineRunner(replace(spec, profile=RunProfile(quantize="fp8")), device="cpu")
    info = runner.speed.info["quantize"]
    assert info["effective"] == "fp8" and info["layers"] > 0
    assert any(isinstance(m, fp8.FP8Linear) for m in runner.pipe.transformer.modules())
    image = _image(runner)
    assert image.shape == reference.shape
    random = np.random.default_rng(0).integers(0, 256, reference.shape).astype(np.float64)
    diff = np.abs(image - reference).mean()
    assert diff < 0.3, diff  # gray levels; this tiny model's image moves by ~0.7 when every FP8 layer is 30% off
    assert diff < 0.25 * np.abs(random - reference).mean()


def test_runner_reports_fp8_weights_when_the_probe_keeps_fp8_matmuls_off(tiny_t2i):
    spec = resolve_model(str(tiny_t2i))
    reference = _image(PipelineRunner(spec, device="cpu"))
    runner = PipelineRunner(replace(spec, profile=RunProfile(quantize="fp8")), device="cpu")  # the real probe: no FP8 on a CPU
    info = runner.speed.info["quantize"]
    assert info["effective"] == "fp8-weights" and "cpu" in info["reason"]
    layers = [m for m in runner.pipe.transformer.modules() if isinstance(m, fp8.FP8Linear)]
    assert layers and all(m.matmul == "dequant" for m in layers)
    assert np.abs(_image(runner) - reference).mean() < 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_the_gpu():
    probe = fp8.probe_fp8("cuda", torch.bfloat16)
    print("FP8 probe:", probe.summary())
    if fp8.fp8_unsupported_reason("cuda") is None:
        assert probe.speedup is not None, probe.reason
    linear = nn.Linear(3072, 3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 77, 3072, device="cuda", dtype=torch.bfloat16)  # 154 rows: padded to a multiple of 16
    if fp8.fp8_unsupported_reason("cuda") is None:
        assert _relative_error(fp8.FP8Linear(linear, torch.bfloat16)(x), linear(x)) < 0.06


def test_worker_ready_message_carries_what_really_runs(tiny_t2i):
    import multiprocessing
    import threading

    from qwen_image_server.engine.worker import Ready, Stop, worker_main

    spec = resolve_model(str(tiny_t2i))
    spec = replace(spec, profile=RunProfile(quantize="fp8"))
    ours, theirs = multiprocessing.Pipe()
    thread = threading.Thread(target=worker_main, args=(spec, "cpu", "auto", torch.get_num_threads(), theirs, "w0"), daemon=True)
    thread.start()
    ready = ours.recv()
    ours.send(Stop())
    thread.join(timeout=60)
    assert isinstance(ready, Ready), ready
    info = ready.info
    assert info["speed"]["quantize"]["effective"] == "fp8-weights" and "cpu" in info["speed"]["quantize"]["reason"]


def _loading_order(monkeypatch) -> dict:
    """``{component: whether the transformer had FP8 layers when that component finished loading}``."""
    from qwen_image_server.models import memory

    original, loaded, seen = memory.component_loaded, {}, {}

    def spy(name, module, mode, dtype, shared=False):
        original(name, module, mode, dtype, shared)
        loaded[name] = module
        seen[name] = any(isinstance(m, fp8.FP8Linear) for m in loaded["transformer"].modules())

    monkeypatch.setattr(memory, "component_loaded", spy)
    return seen


def test_quantize_converts_the_transformer_before_the_text_encoder_loads(tiny_t2i, monkeypatch):
    """The bf16 transformer and the text encoder are never on the device together (the plan's load peak)."""
    seen = _loading_order(monkeypatch)
    spec = resolve_model(str(tiny_t2i))
    runner = PipelineRunner(replace(spec, profile=RunProfile(quantize="fp8")), device="cpu")
    assert seen == {"transformer": True, "text_encoder": True, "vae": True}
    layers = [m for m in runner.pipe.transformer.modules() if isinstance(m, fp8.FP8Linear)]
    assert runner.speed.info["quantize"]["layers"] == len(layers) > 0  # counted once, converted once


def test_with_a_lora_quantize_waits_for_the_adapters(tiny_t2i, tiny_lora, monkeypatch):
    from qwen_image_server.config import Settings
    from qwen_image_server.models.configured import resolve_configured

    seen = _loading_order(monkeypatch)
    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=[f"style={tiny_lora}"], quantize="fp8"))
    runner = PipelineRunner(spec, device="cpu")
    assert seen == {"transformer": False, "text_encoder": False, "vae": False}
    assert any(isinstance(m, fp8.FP8Linear) for m in runner.pipe.transformer.modules())  # the layers no LoRA wraps
    base = np.asarray(runner.run(Job(mode="generate", prompt="a cat", seeds=[7], width=64, height=64, num_inference_steps=2))[0])
    styled = runner.run(Job(mode="generate", prompt="a cat", seeds=[7], width=64, height=64, num_inference_steps=2, lora="style"))
    assert not np.array_equal(base, np.asarray(styled[0]))


def test_each_linear_layer_is_freed_as_soon_as_its_fp8_copy_is_in_place(monkeypatch):
    """Converting layer by layer holds one extra layer at a time: a run-dtype layer is gone once its FP8 copy is in
    the model. A list of the layers kept them all alive to the end, the whole bf16 transformer beside its FP8 copy
    (about 57 GiB at the peak for Qwen-Image instead of the 38 planned)."""
    import weakref

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))
    olds = [weakref.ref(layer) for layer in model.transformer_blocks]
    alive_at_each_conversion = []
    real = fp8.FP8Linear.__init__

    def tracking(self, linear, *args, **kwargs):
        alive_at_each_conversion.append(sum(ref() is not None for ref in olds))
        real(self, linear, *args, **kwargs)

    monkeypatch.setattr(fp8.FP8Linear, "__init__", tracking)
    assert fp8.quantize_linears(model, torch.float32, "cpu", matmul="dequant") == 6
    # converting layer i: it and the ones not converted yet are alive, none of those converted before
    assert alive_at_each_conversion == [6, 5, 4, 3, 2, 1]
    assert all(ref() is None for ref in olds)


def test_the_plan_counts_the_layers_a_hot_swapped_lora_keeps_in_the_run_dtype(tiny_t2i, tiny_lora):
    """With a hot-swapped LoRA, ``--quantize fp8`` leaves the layers it adapts in the run dtype (peft wraps them):
    the memory estimate counted them at one byte, e.g. a LoRA on every block linear (as Lightning's) about halved the
    transformer's real size. The estimate's FP8 layers are now those the runner converts; a fused LoRA is merged
    before quantizing, so there every layer counts as FP8."""
    from qwen_image_server.config import Settings
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.footprint import _fp8_applies, resident_weights
    from qwen_image_server.models.weights_files import read_folder

    def spec(*loras):
        (one,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=list(loras), quantize="fp8"))
        return one

    tensors = read_folder(tiny_t2i)
    plain, swapped, fused = spec(), spec(f"style={tiny_lora}"), spec(f"style={tiny_lora}:fuse=true")
    transformer = {name: resident_weights(tensors, s.profile, 2)["transformer"] for name, s in
                   (("plain", plain), ("swapped", swapped), ("fused", fused))}  # fmt: skip
    assert transformer["plain"] == transformer["fused"] < transformer["swapped"]
    runner = PipelineRunner(swapped, device="cpu")
    converted = {name for name, m in runner.pipe.transformer.named_modules() if isinstance(m, fp8.FP8Linear)}
    adapted = frozenset(swapped.profile.loras[0].layers)
    counted = {t.name.removesuffix(".weight") for t in tensors.components["transformer"]
               if _fp8_applies("transformer", t, swapped.profile, adapted)}  # fmt: skip
    assert converted == counted and adapted and not converted & adapted
