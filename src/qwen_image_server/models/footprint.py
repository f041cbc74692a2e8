"""How much device memory a model will need, worked out from its files before any weight is read.

The tensors come from the safetensors headers (``weights_files``); ``footprint`` applies
the run dtype and the run profile (FP8, offload) and adds the working memory of the
largest image the server accepts. The constants below say where each figure comes from.
No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .memory_modes import OFFLOADED, load_order, loads_on_cpu, quantize_on_load
from .profile import RunProfile, fp8_stored
from .spec import ModelSpec
from .step_cache import parse_policy
from .weights_files import REFERENCE_INNER_DIM, ModelTensors, Tensor

GIB = 1024**3
MIB = 1024**2

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

# --- constants of the working-memory estimate (all measured or derived for full-size Qwen-Image) ---
#: Measured on an H100 80GB, bf16, everything resident: weights 53.8 GiB; peak 58.0 GiB at 1024x1024
#: (4096 image tokens) and 60.8 GiB at 1328x1328 (6889 tokens). The working memory over the weights,
#: 4.2 and 7.0 GiB, fitted as a line in the output's image tokens (16x16-pixel latent patches):
ACT_PER_OUTPUT_TOKEN = (7.0 - 4.2) * GIB / (6889 - 4096)  # ≈ 1.03 MiB per token (denoising and VAE decode)
ACT_BASE = 4.2 * GIB - 4096 * ACT_PER_OUTPUT_TOKEN  # ≈ 0.094 GiB
#: Other transformer widths than Qwen-Image's (``REFERENCE_INNER_DIM``) scale the figures above linearly.
#: Input images of edits join the transformer's sequence but are not decoded: their tokens cost the
#: transformer's share only, estimated from its architecture as about 16 hidden vectors per token
#: alive inside a block (norms, q/k/v, attention output, the 4x MLP and its activation).
VECTORS_PER_INPUT_TOKEN = 16
#: With ``vae_tiling`` (``vae_tiling.py``) the VAE decodes 256x256-pixel tiles: the decode's share of the line above
#: (most of it) gives way to a tile's working memory plus the decoded tiles and the image. Measured by
#: ``bench/vae_fast.py --tiling --cpu-peak`` with the full-size VAE on a CPU in float32: 0.67-0.68 GiB above the
#: weights at 1024x1024 and 0.75 GiB at 2048x2048 (6.2 GiB untiled at 1024x1024); halved for bf16, as a line in
#: output tokens. The transformer's own share of an output token is then counted as an input token's.
TILED_DECODE_BASE = int(0.33 * GIB)
TILED_DECODE_PER_OUTPUT_TOKEN = 3 * 1024
#: The text encoder (Qwen2.5-VL) as the server runs it (``text_encoder_fast``: no language-model head, no
#: hidden states of every layer, no cache): 0.21-0.24 GiB above the weights for 1024 tokens at full width in bf16,
#: measured by ``bench/text_encoder.py`` on a CPU (with 2 and with 8 layers), up to 124 K values per token, written
#: as 4 x hidden + 6 x intermediate (the stock forward: 0.41 GiB with 2 layers, 0.48 with 8: each layer keeps one
#: more hidden state). Its longest input: diffusers' tokenizer limit (1024) plus the edit template (64), plus the
#: vision tokens of each input image (28x28 pixels each at the condition area).
TEXT_TOKENS = 1024 + 64
VISION_PATCH = 28
#: Every worker is its own process: a CUDA context plus the allocator's and cuBLAS's workspaces.
PROCESS_OVERHEAD = 512 * MIB
#: What a CPU worker process holds besides its model: measured 147 MB of private memory for a worker of the tiny
#: models, forked from the forkserver that has imported torch and diffusers (2-core Linux machine, torch 2.13).
CPU_PROCESS_OVERHEAD = 256 * MIB
#: The text tokens the transformer sees beside a generation's image: diffusers cuts the prompt's embeddings to its
#: default ``max_sequence_length`` (an edit's are not cut and carry the input images' vision tokens: ``TEXT_TOKENS``).
GENERATION_TEXT_TOKENS = 512
#: Values per image token of the transformer's output projection (2x2 patches of 16 latent channels): what the
#: lite form of ``taylorseer`` keeps.
PROJ_OUT_VALUES = 64
DIFFUSERS_EDIT_AREA = 1024 * 1024
DIFFUSERS_CONDITION_AREA = 384 * 384


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
    #: Host bytes of a GPU worker's offloaded weights as group offload holds them (``pinned_copies``); None: what its
    #: offload mode moves off the device, as loaded (model and sequential offload; a model sized from counts only).
    host_offloaded: int | None = None

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


def _kept(component: str, tensors, run_bytes: int, profile: RunProfile) -> dict[str, int]:
    """Bytes of each tensor of ``component`` the worker keeps once loaded (``DROPPED`` ones are freed), by name."""
    dropped = DROPPED.get(component, ())
    adapted = _adapted(profile)
    return {t.name: sum(_pieces(component, t, run_bytes, profile, adapted)) for t in tensors if not t.name.startswith(dropped)}


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
    totals = {component: sum(sizes.values()) for component, sizes in sized.items()}
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
        largest_leaf = {c: _leaves(sizes) for c, sizes in sized.items()}
        top = max(largest_leaf, key=largest_leaf.__getitem__)
        return {c: (largest_leaf[c] if c == top else 0) for c in totals}
    out = dict(totals)  # group, text-encoder
    for component in ("transformer", "text_encoder") if mode == "group" else ("text_encoder",):
        if component in sized:
            blocks, rest = _groups(sized[component])
            out[component] = GROUPS_ON_DEVICE * max(blocks.values(), default=0) + rest
    return out


#: The components whose blocks' tensors group offload pins in host memory, per offload mode (``memory.apply_offload``).
PINNED_COMPONENTS = {mode: OFFLOADED[mode] for mode in ("group", "text-encoder")}


def pinned_size(nbytes: int) -> int:
    """What torch's pinned-memory allocator takes for ``nbytes``: the next power of two (its ``CachingHostAllocator``
    rounds every allocation up so, e.g. a 37.7 MB FP8 weight takes 64 MiB)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


def pinned_copies(model: ModelTensors, profile: RunProfile, run_bytes: int) -> int | None:
    """Host bytes of the copies group offload keeps on a CUDA worker (``--offload group`` or ``text-encoder``), or None
    for the other modes. diffusers' group offload with CUDA's side stream pins a copy of every tensor of each grouped
    component's blocks (those on the device at the moment too), one allocation each, which torch rounds up to a power
    of two (``pinned_size``): about 1.6x the weights of Qwen-Image's transformer and 1.9x its text encoder's. What is
    outside the blocks moves whole, unpinned (counted as it is); the text encoder's token embeddings stay on the device
    (``offload.TEXT_ENCODER_RESIDENT``)."""
    components = PINNED_COMPONENTS.get(profile.offload)
    if components is None or model.counts_only:
        return None
    adapted = _adapted(profile)
    total = 0
    for component in components:
        dropped = DROPPED.get(component, ())
        for t in model.components.get(component, ()):
            if t.name.startswith(dropped) or (component == "text_encoder" and "embed_tokens" in t.name):
                continue
            pieces = _pieces(component, t, run_bytes, profile, adapted)
            total += sum(pinned_size(size) for size in pieces) if _BLOCK.match(t.name) else sum(pieces)
    return total


def load_peak(model: ModelTensors, profile: RunProfile, run_bytes: int, on_gpu: bool = True) -> int:
    """The most weight bytes on the device while a worker loads, when FP8 or 4-bit modes convert there (else 0).

    Components load one after the other, the transformer first, then the text encoder,
    then the rest, each read in the run dtype. ``weights_dtype=fp8`` stores each in FP8
    before the next one loads, and so does ``quantize=fp8`` with the transformer's linear
    layers; with LoRAs, ``quantize=fp8`` converts only once everything and the adapters
    are loaded (``memory_modes.quantize_on_load``). Offloaded components load and convert
    on the CPU. Under ``quantize=int4`` a GPU worker opens the transformer on the CPU and it
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
            kept += sum(_kept(component, tensors, run_bytes, profile).values())
            continue
        run = sum(_bytes(t, run_bytes, False) for t in tensors)
        if at_once:
            peak = max(peak, kept + run)
            kept += sum(_kept(component, tensors, run_bytes, profile).values())
        else:
            kept += run
    return max(peak, kept)


def _patches(side: int) -> int:
    """Image tokens of a square image: 16x16-pixel latent patches."""
    return (-(-side // 16)) ** 2


#: The transformer's share of the working memory per token, in bf16 at Qwen-Image's width (``VECTORS_PER_INPUT_TOKEN``).
TOKEN_SHARE = VECTORS_PER_INPUT_TOKEN * REFERENCE_INNER_DIM * 2


def _width_scale(inner_dim: int, run_bytes: int) -> float:
    """The measured figures (Qwen-Image's width, bf16) scaled to a transformer's width and run dtype."""
    return inner_dim / REFERENCE_INNER_DIM * run_bytes / 2


def activation_bytes(
    output_tokens: int,
    input_tokens: int,
    inner_dim: int,
    run_bytes: int,
    batch: int = 1,
    cfg_batch: bool = False,
    vae_tiling: bool = False,
) -> int:
    """Working memory of denoising and decoding: the measured line in output tokens plus the transformer's
    share for input-image tokens, scaled by the transformer's width and the run dtype, times the batch
    (``cfg_batch`` runs the transformer on two at once; ``vae_tiling`` decodes in tiles, when that needs less)."""
    scale = _width_scale(inner_dim, run_bytes)
    per_token = TOKEN_SHARE
    outputs = output_tokens * ACT_PER_OUTPUT_TOKEN
    if vae_tiling:
        outputs = min(outputs, TILED_DECODE_BASE + output_tokens * (per_token + TILED_DECODE_PER_OUTPUT_TOKEN))
    per_image = ACT_BASE + outputs + input_tokens * per_token
    transformer_share = (output_tokens + input_tokens) * per_token
    return int(scale * batch * (per_image + (transformer_share if cfg_batch else 0)))


def denoising_bytes(
    output_tokens: int, input_tokens: int, inner_dim: int, run_bytes: int, batch: int = 1, cfg_batch: bool = False
) -> int:
    """Working memory while denoising only (the VAE has not decoded yet): the measured line's base and the
    transformer's share of every token, with the same scaling as ``activation_bytes``."""
    tokens = (output_tokens + input_tokens) * TOKEN_SHARE
    return int(_width_scale(inner_dim, run_bytes) * batch * (ACT_BASE + tokens * (2 if cfg_batch else 1)))


def step_cache_bytes(
    cache: str | None,
    image_tokens: int,
    text_tokens: int,
    layers: int,
    inner_dim: int,
    run_bytes: int,
    batch: int = 1,
    out_values: int = PROJ_OUT_VALUES,
) -> int:
    """What the step cache policy ``cache`` keeps from one denoising step to the next, counted from diffusers' hooks.

    Each cache context keeps its own (true CFG's cond and uncond: two; a batched CFG call keeps the pair in one), per
    image of the batch: ``taylorseer`` keeps ``order + 1`` Taylor factors of every block's attention output (its image
    and text tokens at full width), in the run dtype; its ``lite`` form those of the output projection only;
    ``fbcache`` the first block's output (image and text) and residual (image), and the other blocks' residuals (image
    and text). The runner frees it at the last step's end, before the final decode; a streamed request's previews
    decode while it is kept.
    """
    policy = parse_policy(cache)
    if policy is None:
        return 0
    contexts = 2 * batch
    if policy.name == "taylorseer":
        factors = policy["order"] + 1
        if policy["lite"]:
            return contexts * factors * image_tokens * out_values * run_bytes
        return contexts * factors * layers * (image_tokens + text_tokens) * inner_dim * run_bytes
    return contexts * (3 * image_tokens + 2 * text_tokens) * inner_dim * run_bytes


def text_encoder_bytes(text_encoder: dict, tokens: int, run_bytes: int) -> int:
    """Working memory of one text-encoder call on ``tokens`` tokens (see ``TEXT_TOKENS``)."""
    per_token = 4 * text_encoder["hidden_size"] + 6 * text_encoder["intermediate_size"]
    return int(tokens * per_token * run_bytes)


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
    inputs = 0 if not spec.can_edit else (max_input_images if spec.multi_image else 1)
    edit_area = int(spec.options.get("edit_area") or DIFFUSERS_EDIT_AREA)
    condition_area = int(spec.options.get("condition_area") or DIFFUSERS_CONDITION_AREA)
    output_tokens = _patches(max_image_side)
    input_tokens = inputs * (edit_area // 256)
    text_tokens = TEXT_TOKENS + inputs * (condition_area // (VISION_PATCH * VISION_PATCH))
    cfg_batch = profile.cfg_batch == "on"
    activations = activation_bytes(
        output_tokens,
        input_tokens,
        model.inner_dim,
        run_bytes,
        max_batch_size,
        cfg_batch=cfg_batch,
        vae_tiling=profile.vae_tiling == "on",
    )
    transformer_text = text_tokens if spec.can_edit else GENERATION_TEXT_TOKENS
    kept = step_cache_bytes(
        profile.cache, output_tokens + input_tokens, transformer_text, model.layers, model.inner_dim, run_bytes, max_batch_size
    )
    if kept:  # alive while denoising and a streamed request's previews decode, freed before the final decode
        denoising = denoising_bytes(output_tokens, input_tokens, model.inner_dim, run_bytes, max_batch_size, cfg_batch)
        preview = activation_bytes(
            int(output_tokens * preview_scale**2),
            input_tokens,
            model.inner_dim,
            run_bytes,
            max_batch_size,
            cfg_batch=cfg_batch,
            vae_tiling=profile.vae_tiling == "on",
        )
        activations = max(activations, max(denoising, preview) + kept)
    steady = Footprint(
        model=spec.id,
        components=resident_weights(model, profile, run_bytes),
        activations=activations,
        step_cache=kept,
        text_encoder_work=text_encoder_bytes(model.text_encoder, text_tokens, run_bytes),
        overhead=overhead,
        image_side=max_image_side,
        origin=model.origin,
        profile=profile,
        host_offloaded=pinned_copies(model, profile, run_bytes) if on_gpu else None,
    )
    # While loading nothing runs, so the working memory is free: only a load peak above the total counts.
    return replace(steady, load_extra=max(0, load_peak(model, profile, run_bytes, on_gpu) + overhead - steady.total))
