"""FP8 weights and FP8 matmuls for the transformer's linear layers (``--quantize fp8``).

Each ``nn.Linear`` in the repeated transformer blocks becomes an ``FP8Linear``: its
weight is stored as ``float8_e4m3fn`` with one fp32 scale per output channel (row),
which halves the weight memory; at run time the activations are quantized per row
(token) to e4m3 and multiplied with torch's own ``torch._scaled_mm``, which on
Hopper/Ada GPUs runs the FP8 tensor cores and writes the run dtype directly.

Kept in the run dtype, on purpose: the input projections (``img_in``, ``txt_in``),
the timestep embedder, ``norm_out`` and ``proj_out``. Together they are about 0.2% of
Qwen-Image's weights and run once per forward, so FP8 would save nothing measurable,
while they are where errors are not averaged by the residual stream: ``txt_in`` reads
the text encoder's outlier-heavy states, ``proj_out`` writes the predicted velocity
itself, the embedders condition every block. The blocks' modulation layers
(``img_mod``/``txt_mod``, a third of the weights) are quantized: memory could not be
halved without them, and per-channel weight scales keep their error at the level of
the other layers.

Quantizing the activations is memory-bound work that must not eat the GEMM's gain. Run
op by op (abs, amax, two float32 copies, divide, clamp, cast) it reads and writes the
activations about 16 times: at Qwen-Image's MLP-out shape (4096 x 12288 bf16, 100 MB)
that is ~1.6 GB, ~0.5 ms on an H100, more than the ~0.12 ms FP8 saves on the GEMM. So
on CUDA ``quantize_activations`` runs it as one ``torch.compile``d function (dynamic
shapes: one graph for every token count), which inductor turns into a row reduction
and one pointwise cast: the activations read twice, the FP8 values written once. Inside
a region that is itself being compiled (``--compile``) the plain function is traced
instead, and inductor fuses it into the block's graph.

FP8 matmuls are only worth it when they are faster: ``probe_fp8`` times representative
GEMMs in the run dtype and in FP8 (activation quantization included, as it will run) on
the device at start-up. When FP8 matmuls are unavailable (CPU, GPUs before Ada such as
the A100) or not at least ``MIN_SPEEDUP`` times faster, ``apply_fp8`` still stores the
weights in FP8, because the memory plan counted them at one byte each and another model
may be placed in the memory saved, but multiplies in the run dtype: each layer casts its
weight back (``matmul="dequant"``), which costs one pass over the weights per call instead
of running 4x slower than bf16 as a mismatched FP8 kernel can. A warning names the reason
or the measured ratio, and the worker's info says what runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import is_out_of_memory, short_reason
from .footprint import QUANTIZED_PREFIXES

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
#: FP8 must be at least this much faster than the run dtype on the probe's GEMMs to be used.
MIN_SPEEDUP = 1.1
#: (tokens M, in features K, out features N): Qwen-Image's attention/MLP-in and MLP-out shapes at 1 MP.
PROBE_SHAPES = ((4096, 3072, 12288), (4096, 12288, 3072))


@dataclass
class Fp8Probe:
    """What the start-up probe found: whether FP8 is used, why (not), and the timings behind it."""

    ok: bool
    reason: str
    speedup: float | None = None
    dense_ms: float | None = None
    fp8_ms: float | None = None
    activations: str | None = None  # how activations are quantized: fused (compiled) or eager
    fused_failed: str | None = None  # why the compiled quantizer is not used where the device has one

    def summary(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, cols) → (e4m3 values, fp32 scales of shape (rows, 1)) with ``x ≈ values * scales``."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp_(min=1e-12)
    values = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale


#: Device types whose activations are quantized by the compiled (fused) function rather than op by op.
FUSED_QUANTIZE_DEVICES: tuple[str, ...] = ("cuda",)
#: The ``torch.compile`` backend of the fused quantizer (tests trace it with ``"eager"``, without inductor).
FUSED_QUANTIZE_BACKEND = "inductor"


@functools.cache
def _fused_quantizer(backend: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(quantize_rowwise, backend=backend, dynamic=True, fullgraph=True)


def quantize_activations(rows: torch.Tensor, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rowwise`` as fused kernels on the devices of ``FUSED_QUANTIZE_DEVICES`` (see the module doc), unless
    ``fused`` is false (the probe found the compiled one failing: ``probe_fused_quantizer``).

    While an enclosing region is being compiled the plain function is traced, so the
    enclosing graph fuses it with its neighbours.
    """
    if fused and rows.device.type in FUSED_QUANTIZE_DEVICES and not torch.compiler.is_compiling():
        return _fused_quantizer(FUSED_QUANTIZE_BACKEND)(rows)
    return quantize_rowwise(rows)


def activation_quantizer(device: str) -> str:
    """How activations are quantized on ``device``, for the worker's info: ``fused`` or ``eager``."""
    return "fused" if torch.device(device).type in FUSED_QUANTIZE_DEVICES else "eager"


def probe_fused_quantizer(device: str, dtype: torch.dtype) -> str | None:
    """Compile the fused activation quantizer on ``device`` and check its values against the plain one; why it cannot
    be used (a torch build without a working compiler for the device: inductor needs Triton on CUDA), or None when it
    can or the device does not fuse. FP8 matmuls then quantize their activations op by op, rather than not at all.
    Out of memory is raised: it says nothing of the compiler, and a worker that short of memory cannot serve."""
    if torch.device(device).type not in FUSED_QUANTIZE_DEVICES:
        return None

    def check() -> str | None:
        with torch.inference_mode():
            rows = torch.randn(40, 96, device=device, dtype=dtype)
            values, scale = _fused_quantizer(FUSED_QUANTIZE_BACKEND)(rows)
            expected_values, expected_scale = quantize_rowwise(rows)
            if not (torch.equal(values.float(), expected_values.float()) and torch.allclose(scale, expected_scale)):
                return "the compiled activation quantizer gave other values than the plain one"
        return None

    return compiled_probe("the activation quantizer", device, check)


def compiled_probe(what: str, device: str, check: Callable[[], str | None]) -> str | None:
    """``check()`` (it compiles a function on ``device`` and compares its values with the plain one's: a reason, or
    None when they agree), or why compiling ``what`` failed: no Triton, an inductor error. Out of memory is raised:
    it says nothing of the compiler, and a worker that short of memory cannot serve."""
    try:
        return check()
    except Exception as exc:
        if is_out_of_memory(exc):  # also when the compiler ran out (dynamo wraps it: errors.compiler_cause)
            raise
        return f"compiling {what} failed on {device}: {short_reason(exc)}"[:300]


#: Device types where ``FP8Linear`` pads its row count to a multiple of 16 (``_scaled_mm``'s alignment on CUDA).
PADDED_ROWS_DEVICES: tuple[str, ...] = ("cuda",)


def _pad_rows(rows: torch.Tensor, m: int) -> torch.Tensor:
    """``rows`` with zero rows added up to a multiple of 16. In eager mode an aligned count is left as it is; inside a
    compiled region the padding is computed, not branched on: the row count (the text length times the batch) is a
    dynamic dimension there, and a branch on ``m % 16`` would be a guard that recompiles the block whenever a prompt's
    length crosses from one case to the other (the warm-up covers one of them)."""
    if torch.compiler.is_compiling() or m % 16:  # ``is_compiling`` first: ``m % 16`` is never evaluated while tracing
        return torch.nn.functional.pad(rows, (0, 0, 0, (-m) % 16))
    return rows


class FP8Linear(nn.Module):
    """A linear layer with an e4m3 weight (per-output-channel scales) and dynamically quantized activations.

    The weight is kept as (out, in) row-major, so its transpose is the column-major
    second operand ``_scaled_mm`` wants. Leading dimensions of the input are flattened;
    on CUDA the row count is padded to a multiple of 16 (``_scaled_mm``'s alignment),
    e.g. for the modulation layers, which see one row per image.
    """

    # Buffers, registered in __init__ (declared here for the type checker: nn.Module's
    # attribute lookup would otherwise type them as "Tensor | Module").
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, linear: nn.Linear, out_dtype: torch.dtype, matmul: str = "scaled_mm", work: str | torch.device | None = None
    ):
        """Quantize ``linear`` on ``work`` (default: where its weight is) and keep the result where the weight was: a
        layer of a component offloaded to the CPU is quantized on the run device, where a CPU at a GPU worker's two
        threads took 0.15-0.2 s per 12288x3072 layer (80-100 s for Qwen-Image's 20 B weights, at every worker start)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.out_dtype = out_dtype
        self.matmul = matmul  # "scaled_mm": FP8 tensor cores; "dequant": the weight cast back, run-dtype matmul
        self.fused = True  # activations quantized by the compiled function where the device has it (``apply_fp8``)
        home = linear.weight.device
        with torch.no_grad():
            weight, scale = quantize_rowwise(linear.weight.detach().to(work if work is not None else home))
        self.register_buffer("weight", weight.to(home).contiguous())  # (N, K) float8
        self.register_buffer("weight_scale", scale.t().to(home).clone())  # (1, N) fp32; its own tensor, not a view
        bias = linear.bias.detach().to(out_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == "dequant":
            weight = self.weight.to(self.out_dtype) * self.weight_scale.t().to(self.out_dtype)
            return nn.functional.linear(x.to(self.out_dtype), weight, self.bias).to(x.dtype)
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        if rows.device.type in PADDED_ROWS_DEVICES:
            rows = _pad_rows(rows, m)
        values, scale = quantize_activations(rows, self.fused)
        fused_bias = self.bias is not None and self.out_dtype != torch.float32  # _scaled_mm takes no bias with fp32 out
        out = torch._scaled_mm(
            values,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias if fused_bias else None,
            out_dtype=self.out_dtype,
            use_fast_accum=rows.is_cuda,
        )
        out = out[:m]
        if self.bias is not None and not fused_bias:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=float8_e4m3fn, matmul={self.matmul}"
        )


def fp8_unsupported_reason(device: str) -> str | None:
    """Why FP8 matmuls cannot run fast on ``device``, or None when they can (CUDA, compute capability ≥ 8.9)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no torch._scaled_mm / float8_e4m3fn"
    if not device.startswith("cuda"):
        return f"FP8 matmuls need an Ada or Hopper (or newer) GPU; the device is {device}"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"FP8 matmuls need compute capability 8.9 or newer; {name} has {capability[0]}.{capability[1]}"
    return None


def cuda_event_timer(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream, measured with CUDA events after warm-up calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


Timer = Callable[[str, Callable[[], object]], float]


def probe_fp8(
    device: str,
    dtype: torch.dtype,
    timer: Timer | None = None,
    shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES,
    supported: Callable[[str], str | None] = fp8_unsupported_reason,
) -> Fp8Probe:
    """Time ``shapes`` as run-dtype ``F.linear`` and as ``FP8Linear`` (activation quantization included).

    ``timer(kind, fn)`` returns seconds per call of ``fn`` (``kind`` is ``"dense"`` or
    ``"fp8"``); by default CUDA events. ``supported(device)`` says why FP8 cannot run
    there. Both are parameters so that tests can force either outcome on a CPU.
    """
    reason = supported(device)
    if reason:
        return Fp8Probe(False, reason)
    fused_failed = probe_fused_quantizer(device, dtype)
    activations = "eager" if fused_failed else activation_quantizer(device)
    if fused_failed:
        log.warning("--quantize fp8: activations are quantized op by op: %s", fused_failed)
    time_it = timer or (lambda kind, fn: cuda_event_timer(fn))
    dense = fp8 = 0.0
    try:
        with torch.inference_mode():
            for m, k, n in shapes:
                x = torch.randn(m, k, device=device, dtype=dtype)
                linear = nn.Linear(k, n, device=device, dtype=dtype)
                quantized = FP8Linear(linear, dtype)
                quantized.fused = fused_failed is None
                dense += time_it("dense", functools.partial(linear, x))
                fp8 += time_it("fp8", functools.partial(quantized, x))
                del x, linear, quantized
    except Exception as exc:  # no FP8 kernel for this GPU/torch build, alignment...
        if is_out_of_memory(exc):  # not a verdict on FP8: the worker is too short of memory to serve (as int4's probe)
            raise
        return Fp8Probe(
            False,
            f"FP8 matmul failed on {device}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            fused_failed=fused_failed,
        )
    speedup = dense / fp8 if fp8 > 0 else 0.0
    figures: dict[str, Any] = dict(
        speedup=speedup, dense_ms=dense * 1000, fp8_ms=fp8 * 1000, activations=activations, fused_failed=fused_failed
    )
    if speedup < MIN_SPEEDUP:
        return Fp8Probe(
            False,
            f"FP8 is only {speedup:.2f}x as fast as {str(dtype).removeprefix('torch.')} here (needs {MIN_SPEEDUP}x)",
            **figures,
        )
    return Fp8Probe(True, f"FP8 is {speedup:.2f}x as fast as {str(dtype).removeprefix('torch.')} on the probe's GEMMs", **figures)


def quantizable_linears(model: nn.Module, device: str) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` layers under ``QUANTIZED_PREFIXES`` that ``_scaled_mm`` can take.

    Layers of a LoRA (peft's wrapper: its ``base_layer`` and the adapters' ``lora_A`` and
    ``lora_B``) are left alone: peft casts the input to the adapters' weight dtype and
    merges into the base weight. On CUDA, layers whose in/out features are not multiples
    of 16 are left alone too.
    """
    in_lora = lora_layers(model)
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name.startswith(QUANTIZED_PREFIXES) or id(module) in in_lora:
            continue
        if device.startswith("cuda") and (module.in_features % 16 or module.out_features % 16):
            continue
        out.append((name, module))
    return out


def lora_layers(model: nn.Module) -> set[int]:
    """The ids of every module inside a peft LoRA layer of ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no LoRA layers
        return set()
    return {id(inner) for module in model.modules() if isinstance(module, BaseTunerLayer) for inner in module.modules()}


def quantize_linears(model: nn.Module, dtype: torch.dtype, device: str, matmul: str = "scaled_mm") -> int:
    """Replace the quantizable linear layers of ``model`` by ``FP8Linear`` in place; returns how many.

    One layer at a time, so the run-dtype weights are freed as they go (peak: one extra layer). Each is quantized on
    ``device`` (the run device) and kept where its weight is (the CPU for a component offloaded between uses).
    """
    names = [name for name, _ in quantizable_linears(model, device)]
    return replace_layers(model, names, lambda linear: FP8Linear(linear, dtype, matmul, work=device), device)


def replace_layers(model: nn.Module, names: list[str], make: Callable[[Any], nn.Module], device: str) -> int:
    """Replace each layer of ``model`` named in ``names`` by ``make(layer)``, one at a time, so that the replaced
    weights are freed as they go (names, not layers, are passed: a list of the layers would keep every replaced one
    alive to the end, the whole run-dtype model beside its converted copy); returns how many. Under group offload the
    new layers then join their blocks' groups; on CUDA the allocator's cache is given back."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(getattr(parent, attr)))
    if names:
        from .offload import regroup_offloaded

        regroup_offloaded(model)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return len(names)


def apply_fp8(
    transformer: nn.Module, device: str, dtype: torch.dtype, probe: Callable[[str, torch.dtype], Fp8Probe] | None = None
) -> dict:
    """Quantize ``transformer`` to FP8 when the probe says it pays; returns what runs, for the worker's info.

    ``probe`` defaults to ``probe_fp8`` (looked up at call time, so tests can replace it).
    """
    result = (probe or probe_fp8)(device, dtype)
    info: dict = {"requested": "fp8", **{k: v for k, v in result.summary().items() if k != "activations"}}
    matmul = "scaled_mm" if result.ok else "dequant"
    quantize_linears(transformer, dtype, device, matmul)  # those left (after LoRAs); the rest were as the model loaded
    quantized = [m for m in transformer.modules() if isinstance(m, FP8Linear)]
    for layer in quantized:
        layer.matmul, layer.fused = matmul, result.activations != "eager"
    layers = len(quantized)
    if not result.ok:
        run = str(dtype).removeprefix("torch.")
        log.warning(
            "--quantize fp8: %d linear layers keep FP8 weights (the memory plan counts them so) but multiply in %s: %s",
            layers,
            run,
            result.reason,
        )
        return {**info, "effective": "fp8-weights", "matmul": run, "layers": layers}
    log.info("--quantize fp8: %d linear layers in FP8 (%s)", layers, result.reason)
    return {
        **info,
        "effective": "fp8",
        "matmul": "fp8",
        "activations": result.activations or activation_quantizer(device),
        "layers": layers,
    }
