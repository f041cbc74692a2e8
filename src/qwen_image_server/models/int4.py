"""4-bit weights for the transformer's linear layers (``--quantize int4``): weight-only, group-wise.

Each ``nn.Linear`` in the repeated transformer blocks (``QUANTIZED_PREFIXES``, the same
layers as ``--quantize fp8``) becomes an ``Int4Linear``: every run of ``GROUP_SIZE``
input weights of an output row is mapped to 16 levels between its minimum and maximum
(round to nearest, asymmetric), two levels packed in a byte, with the group's step and
minimum kept in the run dtype. That is 4.5 bits a weight with bf16 (0.5625 bytes):
Qwen-Image's 20.4 B transformer takes about 10.8 GiB instead of 38 GiB in bf16 or 19
in FP8, so it stays resident on a 16 or 24 GB card instead of being streamed over PCIe
at every step (``--offload group``).

At run time each layer unpacks its weight to the run dtype and multiplies in the run
dtype (W4A16): the matmul is bf16's, the added cost one pass over the weights per call.
Run op by op (mask, shift, interleave, cast, scale, shift) that pass reads and writes
the weight several times, so on CUDA ``dequantize_weight`` runs as one
``torch.compile``d function (dynamic shapes: a graph or two serve every layer), which reads
the packed bytes once and writes the run-dtype weight once; inside a region that is
itself being compiled (``--compile``) the plain function is traced and fused there.
At start-up ``probe_unpacking`` compiles it once and checks its values; where it cannot
compile (a torch build without Triton, an inductor error) or gives wrong values, the
layers unpack op by op, with a warning, and the worker's info says why.
Inductor computes the unpacked value in float32 and rounds it once, where the plain
function rounds the product and the sum each to the run dtype: in bf16 many values then
differ, by several units in the last place where the product and the minimum nearly
cancel. Both are right to the dtype's rounding, which is what the check allows
(``unpacked_right``), not equality with the plain function.

Kept in the run dtype, as under FP8: the input projections, the embedders, ``norm_out``
and ``proj_out`` (about 0.2% of the weights, where errors are not averaged out), and
layers whose input width is not a multiple of the group size. The layers a hot-swapped
LoRA adapts keep the run dtype (peft wraps plain linear layers only); a fused LoRA is
merged into the run-dtype weights before they are quantized.

Quality: round-to-nearest 4-bit weights change a model's outputs more than FP8 does
(the unit tests bound the weight error at half a step, about 3% of a group's range);
how much that shows in Qwen-Image's images is not measured here (random weights).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from .footprint import INT4_GROUP_SIZE, QUANTIZED_PREFIXES
from .fp8 import compiled_probe, lora_layers, replace_layers

log = logging.getLogger(__name__)

#: Input weights that share one step and minimum.
GROUP_SIZE = INT4_GROUP_SIZE
LEVELS = 15  # the largest 4-bit level


def group_size(in_features: int) -> int | None:
    """The group size of a layer with ``in_features`` inputs: ``GROUP_SIZE`` when it divides them, the whole row for
    narrower even rows (tiny models); None (not quantized) otherwise."""
    if in_features <= 0:
        return None
    if in_features % GROUP_SIZE == 0:
        return GROUP_SIZE
    if in_features < GROUP_SIZE and in_features % 2 == 0:
        return in_features
    return None


def quantize_weight(weight: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) → (packed levels (out, in / 2) uint8, steps (out, in / group), minimums (out, in / group)),
    the last two in ``dtype``, with ``weight ≈ level * step + minimum`` for each group of ``group`` inputs."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group, group)
    low = w.amin(dim=-1, keepdim=True)
    high = w.amax(dim=-1, keepdim=True)
    # The step and minimum are rounded to ``dtype`` first, so that the levels are chosen for the values that dequantize.
    # A step of 0 (a constant group, or one whose step underflows ``dtype``) leaves every level 0: the minimum.
    step = ((high - low) / LEVELS).to(dtype).float()
    low = low.to(dtype).float()
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    levels = ((w - low) / divisor).round_().clamp_(0, LEVELS).to(torch.uint8).reshape(rows, cols)
    packed = levels[:, 0::2] | (levels[:, 1::2] << 4)
    return packed.contiguous(), step.squeeze(-1).to(dtype), low.squeeze(-1).to(dtype)


def dequantize_plain(packed: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The weight ``quantize_weight`` packed, in the dtype of ``step`` (op by op)."""
    rows, groups = step.shape
    levels = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(rows, groups, -1)
    return (levels.to(step.dtype) * step.unsqueeze(-1) + low.unsqueeze(-1)).reshape(rows, -1)


#: Device types whose weights are unpacked by the compiled (fused) function rather than op by op.
FUSED_DEQUANTIZE_DEVICES: tuple[str, ...] = ("cuda",)
#: The ``torch.compile`` backend of the fused unpacking (tests trace it with ``"eager"``, without inductor).
FUSED_DEQUANTIZE_BACKEND = "inductor"


@functools.cache
def _fused_dequantizer(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(dequantize_plain, backend=backend, dynamic=True, fullgraph=True)


def dequantize_weight(packed: torch.Tensor, step: torch.Tensor, low: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``dequantize_plain`` as one fused kernel on the devices of ``FUSED_DEQUANTIZE_DEVICES`` (see the module doc),
    unless ``fused`` is False (``probe_unpacking`` found that the compiled function cannot run here)."""
    if fused and packed.device.type in FUSED_DEQUANTIZE_DEVICES and not torch.compiler.is_compiling():
        return _fused_dequantizer(FUSED_DEQUANTIZE_BACKEND)(packed, step, low)
    return dequantize_plain(packed, step, low)


def unpacked_right(weight: torch.Tensor, packed: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> bool:
    """Whether ``weight`` is the unpacking of (``packed``, ``step``, ``low``) up to the rounding of their dtype.

    Each value is compared with ``level * step + low`` in float32, allowing one epsilon of the dtype relative to
    ``|level * step| + |low|``: the bound of both the plain unpacking (which rounds the product, then the sum, so it
    can be a whole unit of the product off a small sum) and a compiled one (inductor computes in float32 and rounds
    once). A wrong level, group or nibble is off by at least a step, many times more."""
    exact = dequantize_plain(packed, step.float(), low.float())
    if weight.shape != exact.shape:
        return False
    bound = torch.finfo(step.dtype).eps * dequantize_plain(packed, step.float().abs(), low.float().abs())
    return bool(((weight.float() - exact).abs() <= bound).all())


def probe_unpacking(device: str, dtype: torch.dtype) -> str | None:
    """Compile and run the fused unpacking on ``device`` once (a small layer, so that requests find it compiled), and
    check its values (``unpacked_right``); the reason it cannot be used, or None when it can (or the device does not
    fuse). A torch build without a working compiler for the device (inductor needs Triton on CUDA) would otherwise fail
    every call of the model. Called as the model's calls are, so that the graph it compiles is theirs: in inference
    mode (a graph compiled with autograd on is not the one requests use), on weights made outside it (as the layers'
    are, when the model loads: tensors made inside inference mode are another kind to the compiled graph's guards)."""
    if torch.device(device).type not in FUSED_DEQUANTIZE_DEVICES:
        return None

    def check() -> str | None:
        # no two sizes alike (rows, packed bytes, groups): dynamic shapes assume equal sizes stay equal, and a
        # square probe would leave a graph that the model's layers compile anew
        with torch.no_grad():
            weight = torch.randn(96, 4 * GROUP_SIZE, device=device)
            packed, step, low = quantize_weight(weight, GROUP_SIZE, dtype)
        with torch.inference_mode():
            fused = _fused_dequantizer(FUSED_DEQUANTIZE_BACKEND)(packed, step, low)
            if not unpacked_right(fused, packed, step, low):
                return "the compiled unpacking gave other values than the plain one"
        return None

    return compiled_probe("the unpacking", device, check)


class Int4Linear(nn.Module):
    """A linear layer with 4-bit group-wise weights, multiplied in the run dtype (``out_dtype``) after unpacking."""

    weight_packed: torch.Tensor
    weight_step: torch.Tensor
    weight_low: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, work: str | torch.device | None = None, store=None):
        """Quantize ``linear`` on ``work`` (default: where its weight is; a GPU does it in milliseconds) and keep the
        result on ``store`` (default: ``work``)."""
        super().__init__()
        group = group_size(linear.in_features)
        if group is None:
            raise ValueError(f"{linear.in_features} input features are not a multiple of {GROUP_SIZE}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group = group
        self.out_dtype = out_dtype
        work = torch.device(work) if work is not None else linear.weight.device
        store = torch.device(store) if store is not None else work
        with torch.no_grad():
            packed, step, low = quantize_weight(linear.weight.detach().to(work), group, out_dtype)
        self.register_buffer("weight_packed", packed.to(store))
        self.register_buffer("weight_step", step.to(store))
        self.register_buffer("weight_low", low.to(store))
        bias = linear.bias.detach().to(device=store, dtype=out_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.fused = True  # unpack with the compiled function where the device has it (``apply_int4`` may say no)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.weight_packed, self.weight_step, self.weight_low, self.fused)
        return nn.functional.linear(x.to(self.out_dtype), weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int4 (groups of {self.group})"
        )


def int4_linears(model: nn.Module) -> list[str]:
    """The names of the plain ``nn.Linear`` layers under ``QUANTIZED_PREFIXES`` that ``Int4Linear`` can take (not in
    a peft LoRA layer, an input width ``group_size`` accepts)."""
    in_lora = lora_layers(model)
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name.startswith(QUANTIZED_PREFIXES)
        and id(module) not in in_lora
        and group_size(module.in_features) is not None
    ]


def quantize_linears(model: nn.Module, dtype: torch.dtype, device: str, keep_on: str | None = None) -> int:
    """Replace the quantizable linear layers of ``model`` by ``Int4Linear`` in place; returns how many.

    Each layer is quantized on ``device`` (the run device) and kept on ``keep_on`` (default: ``device``; the CPU for
    a component offloaded between uses), one at a time, so that the run-dtype weights are freed as they go: a
    transformer loaded on the CPU never has more than one run-dtype layer on the GPU. Then, unless ``keep_on`` is
    given, whatever else of ``model`` is elsewhere moves to ``device``.
    """
    store = keep_on or device
    count = replace_layers(model, int4_linears(model), lambda linear: Int4Linear(linear, dtype, work=device, store=store), device)
    if keep_on is None:
        model.to(device)
    return count


def apply_int4(transformer: nn.Module, device: str, dtype: torch.dtype, keep_on: str | None = None) -> dict:
    """Quantize what ``transformer`` still has in plain linear layers (those left when LoRAs were loaded first), and
    say what runs, for the worker's info."""
    quantize_linears(transformer, dtype, device, keep_on)  # those left after LoRAs; the rest were as the model loaded
    int4_layers = [m for m in transformer.modules() if isinstance(m, Int4Linear)]
    layers, groups = len(int4_layers), sorted({m.group for m in int4_layers})
    kept = sum(  # a hot-swapped LoRA's base layers (peft's own lora_A and lora_B layers are not counted)
        1
        for name, m in transformer.named_modules()
        if type(m) is nn.Linear and name.startswith(QUANTIZED_PREFIXES) and ".lora_" not in name
    )
    run = str(dtype).removeprefix("torch.")
    log.info("--quantize int4: %d linear layers with 4-bit weights, multiplied in %s (%d kept in %s)", layers, run, kept, run)
    unpacking: dict = {"unpacking": "fused" if torch.device(device).type in FUSED_DEQUANTIZE_DEVICES else "eager"}
    reason = probe_unpacking(device, dtype)
    if reason is not None:
        for layer in int4_layers:
            layer.fused = False
        log.warning("--quantize int4: the weights are unpacked op by op (slower: several passes over them): %s", reason)
        unpacking = {"unpacking": "eager", "unpacking_reason": reason}
    return {
        "requested": "int4",
        "effective": "int4-weights",
        "matmul": run,
        "group_sizes": groups,  # GROUP_SIZE; a row narrower than it is one group
        "layers": layers,
        "layers_in_run_dtype": kept,
        **unpacking,
    }
