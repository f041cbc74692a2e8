"""How much device memory a model will need, worked out from its files before any weight is read.

The tensors come from the safetensors headers (``weights_files``); ``footprint`` applies
the run dtype and the run profile (FP8, offload) and adds the working memory of the
largest image the server accepts (``working_memory``). The constants here and there say
where each figure comes from. No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .memory_modes import OFFLOADED, load_order, loads_on_cpu, quantize_on_load
from .profile import RunProfile, fp8_stored
from .spec import ModelSpec
from .weights_files import ModelTensors, Tensor
from .working_memory import GIB, MIB, working_memory

#: Bytes per element of the dtypes safetensors headers name.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}
#: Tensors the server drops once a component is loaded (``text_encoder_fast``: the text encoder's language-model
#: head, which no Qwen-Image pipeline reads): loaded, then freed, so they count while loading only.
DROPPED = {"text_encoder": ("lm_head.",)}
_BLOCK = re.compile(r"^(.*?(?:transformer_blocks|blocks|layers)\.\d+)\.")

#: Every worker is its own process: a CUDA context plus the allocator's and cuBLAS's workspaces.
PROCESS_OVERHEAD = 512 * MIB
#: What a CPU worker process holds besides its model: measured 147 MB of private memory for a worker of the tiny
#: models, forked from the forkserver that has imported torch and diffusers (2-core Linux machine, torch 2.13).
CPU_PROCESS_OVERHEAD = 256 * MIB


@dataclass(frozen=True)
class Footprint:
    """The device memory one worker of a model needs, in bytes, and how it adds up."""

    model: str
    components: dict[str, int]  # resident weight bytes per component under the run profile
    activations: int  # denoising + VAE decode of the largest image (and the batch), the step cache's state included
    text_encoder_work: int  # encoding the longest prompt (and the input images of edits)
    overhead: int
    image_side: int
    origin: str
    profile: RunProfile
    #: More memory needed only while the worker loads (``load_peak`` over ``total``); one worker per GPU loads at a time.
    load_extra: int = 0
    #: What the step cache keeps between denoising steps (``step_cache_bytes``), part of ``activations``.
    step_cache: int = 0
    #: Host bytes of a GPU worker's offloaded weights as group offload holds them, per component (``pinned_parts``);
    #: None: what its offload mode moves off the device, as loaded (model and sequential offload; a model sized from
    #: counts only).
    host_pinned: dict[str, int] | None = None

    @property
    def host_offloaded(self) -> int | None:
        """``host_pinned`` in all (None: not pinned)."""
        return None if self.host_pinned is None else sum(self.host_pinned.values())

    @property
    def weights(self) -> int:
        return sum(self.components.values())

    @property
    def total(self) -> int:
        """Resident weights + the larger of the two working sets (they are not alive at once) + the process."""
        return self.weights + max(self.activations, self.text_encoder_work) + self.overhead

    def summary(self) -> dict:
        """GiB figures for ``/v1/models`` and the plan command."""

        def gib(b: int) -> float:
            return round(b / GIB, 2)

        return {
            "total_gib": gib(self.total),
            "weights_gib": {name: gib(b) for name, b in self.components.items()},
            "activations_gib": gib(self.activations),
            "step_cache_gib": gib(self.step_cache),
            "text_encoder_work_gib": gib(self.text_encoder_work),
            "overhead_gib": gib(self.overhead),
            "while_loading_gib": gib(self.load_extra),
            "image_side": self.image_side,
            "from": self.origin,
        }


def human(size: float | None) -> str:
    """Bytes as a short text: GiB for real models, MiB or KiB for tiny ones."""
    if size is None:
        return "? GiB"
    if size >= GIB or size == 0:
        return f"{size / GIB:.1f} GiB"
    return f"{size / MIB:.0f} MiB" if size >= MIB else f"{size / 1024:.0f} KiB"


# --- from tensors to bytes ---------------------------------------------------------------------
def _bytes(t: Tensor, run_bytes: int, fp8: bool) -> int:
    """A tensor's bytes on the device: floats in the run dtype (1 byte when FP8 applies to it), others as stored."""
    if t.dtype not in _FLOAT:
        return t.numel * DTYPE_BYTES.get(t.dtype, 4)
    return t.numel * (1 if fp8 else run_bytes)


#: Top-level transformer modules whose linear layers ``--quantize fp8`` and ``--quantize int4`` convert
#: (``fp8.quantizable_linears``, ``int4.int4_linears``).
QUANTIZED_PREFIXES = ("transformer_blocks.",)
#: Input weights that share one step and minimum under ``--quantize int4`` (``int4.GROUP_SIZE``). Headers give no
#: shapes here, so every linear weight of the blocks is counted in groups of it: exact for Qwen-Image (its widths are
#: multiples of it); a tiny model's narrower rows (one group each: more steps) are counted a few KiB low, and rows of
#: another width (kept in the run dtype by ``int4.group_size``; none in the Qwen-Image architectures) would be too.
INT4_GROUP_SIZE = 64


def _quantized(component: str, t: Tensor, adapted: frozenset[str]) -> bool:
    """Whether ``t`` is the weight of a linear layer of the transformer's blocks that ``quantize`` converts: not one a
    hot-swapped LoRA adapts (``adapted``: peft wraps them, and they keep the run dtype)."""
    linear = component == "transformer" and t.ndim == 2 and t.name.endswith(".weight")
    return linear and t.name.startswith(QUANTIZED_PREFIXES) and t.name.removesuffix(".weight") not in adapted


def _fp8_applies(component: str, t: Tensor, profile: RunProfile, adapted: frozenset[str] = frozenset()) -> bool:
    """FP8 storage (``weights_dtype``): matrices of the transformer and text encoder (norms and biases stay, and so
    do the text encoder's token embeddings: ``memory.TEXT_ENCODER_SKIP_PATTERNS``; the transformer's stay under
    ``quantize=int4``, ``profile.fp8_stored``);
    FP8 quantization (``quantize``): the linear weights of the transformer's blocks (``_quantized``)."""
    if fp8_stored(profile, component) and t.ndim >= 2:
        return not (component == "text_encoder" and "embed_tokens" in t.name)
    return profile.quantize == "fp8" and _quantized(component, t, adapted)


def _pieces(component: str, t: Tensor, run_bytes: int, profile: RunProfile, adapted: frozenset[str]) -> list[int]:
    """The bytes of each tensor a weight becomes on its way to the device: one tensor, or a 4-bit layer's three
    (packed levels, steps, minimums). An FP8 layer's per-row scales (a few KiB) are left out."""
    if profile.quantize == "int4" and t.dtype in _FLOAT and _quantized(component, t, adapted):
        steps = run_bytes * -(-t.numel // INT4_GROUP_SIZE)
        return [t.numel // 2, steps, steps]
    return [_bytes(t, run_bytes, _fp8_applies(component, t, profile, adapted))]


def _adapted(profile: RunProfile) -> frozenset[str]:
    """The layers a hot-swapped LoRA adapts (they keep the run dtype)."""
    return frozenset(layer for lora in profile.loras if not lora.fuse for layer in lora.layers)


#: Sizings of one large immutable object (a component's tensors, a model's), by what they depend on: a plan sizes the
#: same models under dozens of candidate profiles (its advice tries flag after flag), and each sizing walks thousands
#: of tensors (Qwen-Image's transformer has 1,933). Each entry keeps its object, so an id is never another's.
_SIZED: dict[tuple, tuple[object, object]] = {}
_SIZED_ENTRIES = 512


def _sized(what: str, obj, key: tuple, compute):
    """``compute()``, a sizing of ``obj`` that depends on ``key`` only, done once per (``obj``, ``key``)."""
    entry = _SIZED.get((what, id(obj), *key))
    if entry is not None and entry[0] is obj:
        return entry[1]
    value = compute()
    if len(_SIZED) >= _SIZED_ENTRIES:
        _SIZED.clear()
    _SIZED[(what, id(obj), *key)] = (obj, value)
    return value


def _pieces_key(component: str, run_bytes: int, profile: RunProfile) -> tuple:
    """What ``_pieces`` of ``component``'s tensors depends on, of ``profile``."""
    return component, run_bytes, profile.quantize, fp8_stored(profile, component), _adapted(profile)


def _kept(component: str, tensors, run_bytes: int, profile: RunProfile) -> dict[str, int]:
    """Bytes of each tensor of ``component`` the worker keeps once loaded (``DROPPED`` ones are freed), by name. The
    dict is shared by every call with the same tensors and settings: read it, do not change it."""

    def compute() -> dict[str, int]:
        dropped = DROPPED.get(component, ())
        adapted = _adapted(profile)
        kept = (t for t in tensors if not t.name.startswith(dropped))
        return {t.name: sum(_pieces(component, t, run_bytes, profile, adapted)) for t in kept}

    return _sized("kept", tensors, _pieces_key(component, run_bytes, profile), compute)


def _kept_total(component: str, tensors, run_bytes: int, profile: RunProfile) -> int:
    """The sum of ``_kept``."""
    sizes = _kept(component, tensors, run_bytes, profile)
    return _sized("total", sizes, (), lambda: sum(sizes.values()))


def _groups(tensors: dict[str, int]) -> tuple[dict[str, int], int]:
    """Bytes per numbered block (``...blocks.N``, ``...layers.N``) and of everything outside blocks."""
    blocks: dict[str, int] = {}
    rest = 0
    for name, size in tensors.items():
        match = _BLOCK.match(name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + size
        else:
            rest += size
    return blocks, rest


def _leaves(tensors: dict[str, int]) -> int:
    """The largest leaf module (a weight with its bias): what sequential offload keeps on the device."""
    leaves: dict[str, int] = {}
    for name, size in tensors.items():
        leaf = name.rsplit(".", 1)[0]
        leaves[leaf] = leaves.get(leaf, 0) + size
    return max(leaves.values(), default=0)


#: Blocks of a group-offloaded component on the device at once: the one that runs, and the next, which the side
#: stream copies meanwhile (diffusers' group offload with ``use_stream``, as ``offload.group_offload`` runs it on CUDA).
#: Everything outside the blocks is there for the component's whole forward (its "unmatched" groups).
GROUPS_ON_DEVICE = 2


def resident_weights(model: ModelTensors, profile: RunProfile, run_bytes: int) -> dict[str, int]:
    """Bytes of each component kept on the device under ``profile``'s FP8 and offload settings.

    none: everything. group: of the transformer and of the text encoder, ``GROUPS_ON_DEVICE`` of its largest
    blocks (the one that runs and the next, prefetched) plus everything outside its blocks (the text encoder's token
    embeddings stay on the device: ``offload.TEXT_ENCODER_RESIDENT``), the rest whole. text-encoder: the text
    encoder as under group, the rest whole. model: only the largest component.
    sequential: the largest leaf module. Sized from parameter counts only, group and sequential count
    as model, and text-encoder as the text encoder off the device.
    """
    sized = {component: _kept(component, tensors, run_bytes, profile) for component, tensors in model.components.items()}
    totals = {component: _kept_total(component, tensors, run_bytes, profile) for component, tensors in model.components.items()}
    mode = profile.offload
    if model.counts_only and mode in ("group", "sequential"):
        mode = "model"
    if model.counts_only and mode == "text-encoder":  # no layer names to find its groups: the text encoder off the GPU
        return {c: (0 if c == "text_encoder" else b) for c, b in totals.items()}
    if mode == "none":
        return totals
    if mode == "model":
        largest = max(totals, key=totals.__getitem__)
        return {c: (b if c == largest else 0) for c, b in totals.items()}
    if mode == "sequential":
        largest_leaf = {c: _sized("leaves", sizes, (), lambda sizes=sizes: _leaves(sizes)) for c, sizes in sized.items()}
        top = max(largest_leaf, key=largest_leaf.__getitem__)
        return {c: (largest_leaf[c] if c == top else 0) for c in totals}
    out = dict(totals)  # group, text-encoder
    for component in ("transformer", "text_encoder") if mode == "group" else ("text_encoder",):
        if component in sized:
            sizes = sized[component]
            blocks, rest = _sized("groups", sizes, (), lambda sizes=sizes: _groups(sizes))
            out[component] = GROUPS_ON_DEVICE * max(blocks.values(), default=0) + rest
    return out


#: The components whose blocks' tensors group offload pins in host memory, per offload mode (``memory.apply_offload``).
PINNED_COMPONENTS = {mode: OFFLOADED[mode] for mode in ("group", "text-encoder")}


def pinned_size(nbytes: int) -> int:
    """What torch's pinned-memory allocator takes for ``nbytes``: the next power of two (its ``CachingHostAllocator``
    rounds every allocation up so, e.g. a 37.7 MB FP8 weight takes 64 MiB)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


def pinned_parts(model: ModelTensors, profile: RunProfile, run_bytes: int) -> dict[str, int] | None:
    """Host bytes of the copies group offload keeps on a CUDA worker (``--offload group`` or ``text-encoder``), per
    component, or None for the other modes. diffusers' group offload with CUDA's side stream pins a copy of every tensor of each grouped
    component's blocks (those on the device at the moment too), one allocation each, which torch rounds up to a power
    of two (``pinned_size``): about 1.6x the weights of Qwen-Image's transformer and 1.9x its text encoder's. What is
    outside the blocks moves whole, unpinned (counted as it is); the text encoder's token embeddings stay on the device
    (``offload.TEXT_ENCODER_RESIDENT``)."""
    components = PINNED_COMPONENTS.get(profile.offload)
    if components is None or model.counts_only:
        return None
    adapted = _adapted(profile)

    def pinned(component: str, tensors: tuple[Tensor, ...]) -> int:
        dropped = DROPPED.get(component, ())
        total = 0
        for t in tensors:
            if t.name.startswith(dropped) or (component == "text_encoder" and "embed_tokens" in t.name):
                continue
            pieces = _pieces(component, t, run_bytes, profile, adapted)
            total += sum(pinned_size(size) for size in pieces) if _BLOCK.match(t.name) else sum(pieces)
        return total

    return {
        c: _sized("pinned", tensors, _pieces_key(c, run_bytes, profile), lambda c=c, tensors=tensors: pinned(c, tensors))
        for c in components
        if (tensors := model.components.get(c, ()))
    }


def load_peak(model: ModelTensors, profile: RunProfile, run_bytes: int, on_gpu: bool = True) -> int:
    """The most weight bytes on the device while a worker loads, when FP8 or 4-bit modes convert there (else 0).

    Components load one after the other, the transformer first, then the text encoder,
    then the rest, each read in the run dtype. ``weights_dtype=fp8`` stores each in FP8
    before the next one loads, and so does ``quantize=fp8`` with the transformer's linear
    layers; with LoRAs, ``quantize=fp8`` converts only once everything and the adapters
    are loaded (``memory_modes.quantize_on_load``). Offloaded components load on the CPU and
    stay there (``quantize=fp8`` quantizes each layer on the device, one at a time: in the
    working headroom, not counted here). Under ``quantize=int4`` a GPU worker opens the transformer on the CPU and it
    reaches the device a 4-bit layer at a time (``memory_modes.loads_on_cpu``): only its kept
    bytes count there. A CPU worker (``on_gpu`` False) holds it whole in the run dtype first.
    """
    if profile.weights_dtype != "fp8" and profile.quantize not in ("fp8", "int4"):
        return 0
    offloaded = OFFLOADED.get(profile.offload, ())
    order = load_order(model.components)
    at_once = profile.weights_dtype == "fp8" or quantize_on_load(profile)
    peak = kept = 0
    for component in order:
        if component in offloaded:
            continue
        tensors = model.components[component]
        if on_gpu and loads_on_cpu(profile, component):
            kept += _kept_total(component, tensors, run_bytes, profile)
            continue
        run = _sized("run", tensors, (run_bytes,), lambda tensors=tensors: sum(_bytes(t, run_bytes, False) for t in tensors))
        if at_once:
            peak = max(peak, kept + run)
            kept += _kept_total(component, tensors, run_bytes, profile)
        else:
            kept += run
    return max(peak, kept)


def footprint(
    spec: ModelSpec,
    model: ModelTensors,
    *,
    run_bytes: int,
    max_image_side: int,
    max_input_images: int = 1,
    max_batch_size: int = 1,
    profile: RunProfile | None = None,
    overhead: int = PROCESS_OVERHEAD,
    preview_scale: float = 1.0,
    on_gpu: bool = True,
) -> Footprint:
    """The memory one worker of ``spec`` needs at the largest allowed image, under ``profile`` (default: its own);
    ``preview_scale``: the side of a streamed request's previews as a share of the image's (``QIS_PREVIEW_SCALE``);
    ``on_gpu``: a GPU worker (the device's memory), else a CPU worker (the machine's)."""
    profile = profile or spec.profile
    work = working_memory(
        spec,
        model,
        profile,
        run_bytes=run_bytes,
        max_image_side=max_image_side,
        max_input_images=max_input_images,
        max_batch_size=max_batch_size,
        preview_scale=preview_scale,
    )
    steady = Footprint(
        model=spec.id,
        components=resident_weights(model, profile, run_bytes),
        activations=work.activations,
        step_cache=work.step_cache,
        text_encoder_work=work.text_encoder,
        overhead=overhead,
        image_side=max_image_side,
        origin=model.origin,
        profile=profile,
        host_pinned=pinned_parts(model, profile, run_bytes) if on_gpu else None,
    )
    # While loading nothing runs, so the working memory is free: only a load peak above the total counts.
    return replace(steady, load_extra=max(0, load_peak(model, profile, run_bytes, on_gpu) + overhead - steady.total))
