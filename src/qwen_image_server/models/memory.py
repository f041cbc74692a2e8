"""Memory modes: where each component's weights live, in which dtype, and how they reach the device.

Qwen-Image in bf16 is ~53 GiB of weights (a 20 B transformer, a 7 B Qwen2.5-VL text
encoder, a small VAE), so an 80 GB card holds it resident, smaller cards do not. A
model's run profile picks a mode (``weights_dtype``, ``offload``); this module loads
the pipeline accordingly:

- every ``torch.nn.Module`` component is loaded on its own with ``device_map`` set to
  where it will live, so safetensors are read straight onto the GPU (no full copy in
  host RAM first); offloaded components are loaded on the CPU;
- ``weights_dtype=fp8`` stores the transformer's and text encoder's layers as
  ``float8_e4m3fn`` and casts each layer to the run dtype for its forward (diffusers'
  layerwise casting), right after each component loads, so that the bf16 copy of one
  component at most is on the device at a time;
- ``offload`` applies diffusers' group offload (``text-encoder``, ``group``), model
  CPU offload (``model``) or sequential CPU offload (``sequential``).

``text-encoder`` keeps the text encoder on the CPU and streams it to the GPU layer by
layer for each prompt (group offload with a CUDA stream: the next layer is copied from
pinned memory while the current one runs). That costs one pass of its weights over
PCIe per request (~15 GB bf16 without the head the server drops, ~8 GB fp8; ~0.3-0.6 s
at 25-50 GB/s). Running the 7 B encoder on the CPU instead would take seconds per
prompt (twice with a negative prompt, more for edit images), so streaming it is the
faster choice for a server.

On a CPU device the offload modes that diffusers allows there (``text-encoder``,
``group``, ``model``) run with onload = offload = CPU: nothing is saved, but the hooks
run, so the modes are tested without a GPU. ``sequential`` is refused on a CPU (diffusers
builds a ``cpu:0`` execution device on which accelerate's hooks fail).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from .memory_modes import OFFLOADED, check_spec_mode, load_order, loads_on_cpu, quantize_on_load
from .profile import fp8_stored
from .shared import SHAREABLE, ComponentCache, component_folder
from .spec import ModelSpec

log = logging.getLogger(__name__)

FP8_STORAGE = torch.float8_e4m3fn
#: Layers of the (transformers) text encoder kept in the run dtype, on top of diffusers' default patterns
#: (``norm``, ``patch_embed``...): the token embeddings, and the LM head that may share their weight.
TEXT_ENCODER_SKIP_PATTERNS = ("embed_tokens", "lm_head")
#: Submodules of the text encoder that group offload leaves on the device (``group_offload``): the token embeddings.
#: Qwen2.5-VL embeds the prompt before it calls its language model, so in the language model's group (moved on that
#: call) they would still be on the CPU when used; as a group of their own they were moved without pinned memory or
#: the side stream, before every encoding and once more by the language model's prefetch (1.1 GB each way for
#: Qwen2.5-VL-7B, twice per prompt), and stayed on the device between encodings anyway.
TEXT_ENCODER_RESIDENT = ("embed_tokens",)
#: Submodules of Qwen2.5-VL that group offload descends into to find its per-layer ``ModuleList`` blocks; and the
#: token embeddings, a group of their own should diffusers apply the offload again (it does so after loading a LoRA,
#: with these settings): then they are moved with each prompt as above, but are on the device when used.
TEXT_ENCODER_BLOCK_MODULES = ["model", "visual", "language_model", *TEXT_ENCODER_RESIDENT]


@dataclass
class MemoryMode:
    """The effective memory mode of one loaded pipeline (for logs and the worker's ``ready`` info)."""

    device: str
    weights_dtype: str = "auto"
    offload: str = "none"
    placement: dict[str, str] = field(default_factory=dict)  # component -> where it was loaded
    fp8_components: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()  # components that are another model's, in this process (models/shared.py)
    #: ``quantize=fp8`` without LoRAs: the transformer's linear layers get FP8 weights as soon as it is loaded,
    #: before the text encoder loads (the start-up probe later picks their matmul). With LoRAs they are quantized
    #: after the adapters are in place (peft wraps plain linear layers only).
    quantize_on_load: bool = False
    quantize: str = "none"  # the profile's: ``int4`` reads the transformer on the CPU, ``int4.py`` moves it

    @classmethod
    def for_spec(cls, spec: ModelSpec, device: str) -> MemoryMode:
        """The mode ``spec``'s profile asks for on ``device``, or a ``ProfileError`` naming the model and setting."""
        check_spec_mode(spec, device)
        profile = spec.profile
        return cls(
            device=device,
            weights_dtype=profile.weights_dtype,
            offload=profile.offload,
            quantize_on_load=quantize_on_load(profile),
            quantize=profile.quantize,
        )

    def offloaded(self, component: str) -> bool:
        """Whether ``component`` lives on the CPU between uses under this mode's offload."""
        return component in OFFLOADED[self.offload]

    def load_device(self, component: str) -> str:
        """Where ``component`` is read: the CPU when this mode offloads it or quantizes it to 4 bits on its way to the
        device (``memory_modes.loads_on_cpu``), else the run device."""
        return "cpu" if self.offloaded(component) or loads_on_cpu(self, component) else self.device

    def home(self, component: str) -> str:
        """Where ``component``'s weights live once loaded: the CPU when offloaded, else the run device."""
        return "cpu" if self.offloaded(component) else self.device

    def summary(self) -> dict:
        """Plain JSON values: the mode, where each component lives and, on CUDA, memory in use."""
        out: dict = {"weights_dtype": self.weights_dtype, "offload": self.offload, "placement": dict(self.placement)}
        if self.fp8_components:
            out["fp8_components"] = list(self.fp8_components)
        if self.shared:
            out["shared_components"] = list(self.shared)
        out.update(cuda_memory(self.device))
        return out


def cuda_memory(device: str) -> dict:
    """GiB allocated, reserved and at peak on ``device`` when it is a CUDA device; ``{}`` elsewhere."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return {}
    gib = 1024**3
    return {
        "cuda_allocated_gib": round(torch.cuda.memory_allocated(device) / gib, 2),
        "cuda_reserved_gib": round(torch.cuda.memory_reserved(device) / gib, 2),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
    }


def load_pipeline(spec: ModelSpec, mode: MemoryMode, dtype: torch.dtype, kwargs: dict, shared: ComponentCache | None = None):
    """Load ``spec``'s pipeline with ``mode``: each model component straight to where it lives, then the rest.

    ``kwargs`` are the other ``from_pretrained`` arguments (revision, processor...). With
    ``shared``, a text encoder or VAE that another model of this process loaded from the
    same files, in the same way, is that model's module (``models/shared.py``).
    """
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    # diffusers annotates a (config, unused kwargs) tuple; without return_unused_kwargs it returns the config alone.
    index = cast(dict, DiffusionPipeline.load_config(spec.source, revision=spec.revision))
    loaded: dict = {}
    for name in _model_components(index):
        library, class_name = index[name]
        key = None
        if shared is not None and name in SHAREABLE:
            key = shared.key(
                component_folder(spec.source, spec.revision, name),
                name,
                dtype=str(dtype),
                device=mode.load_device(name),
                weights_dtype=mode.weights_dtype,
                offload=mode.offload,
            )
            module = shared.get(spec.id, key)
            if module is not None:
                loaded[name] = module
                component_loaded(name, module, mode, dtype, shared=True)
                continue
        loaded[name] = _load_component(spec, name, library, class_name, dtype, mode.load_device(name))
        component_loaded(name, loaded[name], mode, dtype)
        if shared is not None:
            shared.put(key, loaded[name])
    pipe = DiffusionPipeline.from_pretrained(spec.source, **kwargs, **loaded)
    apply_offload(pipe, mode)
    return pipe


def build_random(spec: ModelSpec, mode: MemoryMode, dtype: torch.dtype, shared: ComponentCache | None = None):
    """A ``random:`` source's pipeline under ``mode``: each module built where it lives, FP8 storage and offload applied.

    With ``shared``, a text encoder or VAE of the same architecture values and seed that another model of this
    process built, held the same way, is that model's module (as files with the same content are for
    ``load_pipeline``)."""
    from .random_arch import build_random_pipeline, component_key

    devices = {name: mode.load_device(name) for name in ("transformer", "text_encoder", "vae")}
    keys: dict[str, tuple] = {}
    reuse: dict = {}
    if shared is not None:
        for name in SHAREABLE:
            held = dict(dtype=str(dtype), device=devices[name], weights_dtype=mode.weights_dtype, offload=mode.offload)
            key = shared.content_key(component_key(spec.source, name), name, **held)
            if key is None:
                continue
            keys[name] = key
            module = shared.get(spec.id, key)
            if module is not None:
                reuse[name] = module
                component_loaded(name, module, mode, dtype, shared=True)

    def built(name: str, module) -> None:
        component_loaded(name, module, mode, dtype)
        if shared is not None and name in keys:
            shared.put(keys[name], module)

    pipe = build_random_pipeline(spec.source, mode.device, dtype, devices=devices, on_component=built, reuse=reuse)
    apply_offload(pipe, mode)
    return pipe


def component_loaded(name: str, module: torch.nn.Module, mode: MemoryMode, dtype: torch.dtype, shared: bool = False) -> None:
    """Record where a loaded component lives and give it FP8 storage when the mode asks (before the next one loads);
    a VAE gets its fast routes for images (``vae_fast.py``), a text encoder loses the head no pipeline reads
    (``text_encoder_fast.py``).

    ``shared``: the module is another model's in this process, already converted; it is only recorded.
    """
    mode.placement[name] = mode.home(name)
    if name == "vae" and not shared:  # before offload hooks wrap its layers' forward
        from .vae_fast import prepare_vae

        prepare_vae(module)
    if name == "text_encoder" and not shared:  # before FP8 storage and offload hooks see its layers
        from .text_encoder_fast import prepare_text_encoder

        prepare_text_encoder(module)
    if mode.quantize_on_load and name == "transformer" and not shared:
        if mode.quantize == "int4":
            from . import int4

            count = int4.quantize_linears(module, dtype, mode.device, keep_on="cpu" if mode.offloaded(name) else None)
            log.info("transformer: %d linear layers given 4-bit weights on %s as loaded (quantize=int4)", count, mode.device)
        else:
            from .fp8 import quantize_linears

            count = quantize_linears(module, dtype, mode.device, matmul="dequant")  # the run device's alignment rules
            log.info("transformer: %d linear layers given FP8 weights as loaded (quantize=fp8)", count)
    if fp8_stored(mode, name):
        if not shared:
            store_fp8(module, dtype)
        mode.fp8_components += (name,)
    if shared:
        mode.shared += (name,)


def _model_components(index: dict) -> list[str]:
    """The components of ``model_index.json`` that are torch models, transformer first (the largest)."""
    names = [
        k
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] in ("diffusers", "transformers")
    ]
    models = []
    for name in names:
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name, None) if class_name else None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            models.append(name)
    return load_order(models)


def _load_component(spec: ModelSpec, name: str, library: str, class_name: str, dtype: torch.dtype, device: str):
    """One model component read straight onto ``device`` (``device_map``), in ``dtype``."""
    cls = getattr(importlib.import_module(library), class_name)
    options: dict = {"subfolder": name, "device_map": device}
    if spec.revision:
        options["revision"] = spec.revision
    options["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    return cls.from_pretrained(spec.source, **options).eval()


def store_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store ``module``'s layers as FP8 and cast each to ``compute_dtype`` for its forward (diffusers' layerwise casting).

    A diffusers model uses its own skip patterns (norms, positional and patch embeddings);
    the transformers text encoder gets diffusers' default patterns plus its token embeddings
    and LM head.
    """
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from diffusers.models.modeling_utils import ModelMixin

    if isinstance(module, ModelMixin):
        module.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype)
    else:
        patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN) + TEXT_ENCODER_SKIP_PATTERNS
        apply_layerwise_casting(module, FP8_STORAGE, compute_dtype, skip_modules_pattern=patterns)


def apply_offload(pipe, mode: MemoryMode) -> None:
    """Install the offload hooks ``mode`` asks for on the loaded pipeline's components."""
    if mode.offload == "text-encoder":
        group_offload(pipe.text_encoder, mode.device)
    elif mode.offload == "group":
        group_offload(pipe.transformer, mode.device)
        group_offload(pipe.text_encoder, mode.device)
    elif mode.offload == "model":
        pipe.enable_model_cpu_offload(device=mode.device)
    elif mode.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=mode.device)


def pin_host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned host memory (torch's ``pin_memory``: a tensor already pinned is returned as it is)."""
    return tensor.pin_memory()


def streamed_blocks(module: torch.nn.Module, block_modules=()) -> list[torch.nn.Module]:
    """The blocks diffusers' block-level group offload streams through the side stream: the members of each
    ``ModuleList`` or ``Sequential`` child of ``module``, looking into the children named in ``block_modules``. The
    rest (embedders, norms, the output projection) is its "unmatched" group, moved whole without pinned copies."""
    blocks: list[torch.nn.Module] = []
    for name, child in module.named_children():
        if name in block_modules:
            blocks += streamed_blocks(child, block_modules)
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += list(child)
    return blocks


def pin_one_by_one(module: torch.nn.Module, block_modules=()) -> int:
    """Put each CPU weight (parameter or buffer) of the blocks group offload will stream (``streamed_blocks``) into
    pinned memory in place, one at a time; how many.

    Group offload on CUDA pins a copy of every weight it streams while the weights it copies stay in memory until
    the first call moves them (diffusers pins them all before it frees any): the host held the weights twice while
    loading (for Qwen-Image's FP8 transformer and text encoder, 25 GiB of weights beside 43 GiB of pinned copies).
    Pinned here first, each weight's unpinned memory is freed as soon as its copy is made, and diffusers keeps the
    pinned tensor itself as its copy (``pin_memory`` of a pinned tensor is that tensor)."""
    pinned = 0
    with torch.no_grad():
        for block in streamed_blocks(module, block_modules):
            for tensor in [*block.parameters(), *block.buffers()]:
                if tensor.device.type == "cpu" and tensor.numel():
                    tensor.data = pin_host_copy(tensor.data)
                    pinned += 1
    return pinned


def group_offload(module: torch.nn.Module, device: str) -> None:
    """Keep ``module`` on the CPU and move it to ``device`` one block at a time while it runs.

    On CUDA the next block is copied on a side stream from pinned memory while the current
    one computes (``use_stream``, ``record_stream``); on the CPU onload = offload = CPU.
    A text encoder's token embeddings (``TEXT_ENCODER_RESIDENT``) are kept out of the groups
    and stay on ``device``.
    """
    from diffusers.hooks import apply_group_offloading
    from diffusers.models.modeling_utils import ModelMixin

    offload_buffers_too()
    keep_later_hooks_forward()
    if getattr(module, "_qis_group_offloaded", False):  # a component shared with a model loaded before
        return
    module._qis_group_offloaded = True  # type: ignore[assignment]
    cuda = device.startswith("cuda")
    options: dict[str, Any] = dict(
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=cuda,
        record_stream=cuda,
        low_cpu_mem_usage=False,  # pin every block once at start-up rather than on each transfer
    )
    if isinstance(module, ModelMixin):
        if cuda:
            pin_one_by_one(module)
        module.enable_group_offload(**options)
        return
    resident = [(name, sub) for name, sub in module.named_modules() if name.rsplit(".", 1)[-1] in TEXT_ENCODER_RESIDENT]
    placeholders = []
    for name, sub in resident:  # out of the module while the groups are made: in no group
        parent, _, attribute = name.rpartition(".")
        placeholder = torch.nn.Module()
        setattr(module.get_submodule(parent), attribute, placeholder)
        placeholders.append((parent, attribute, sub))
    try:
        if cuda:
            pin_one_by_one(module, TEXT_ENCODER_BLOCK_MODULES)  # the resident modules are out of it meanwhile
        apply_group_offloading(module, block_modules=TEXT_ENCODER_BLOCK_MODULES, **options)
    finally:
        for parent, attribute, sub in placeholders:
            setattr(module.get_submodule(parent), attribute, keep_on_device(sub, device))


def offload_buffers_too() -> None:
    """Make diffusers' group offload with a side stream (CUDA) put the buffers of a group's modules back into their
    CPU copies as it does the parameters (once per process).

    Its onload moves both to the device, but its offload restored only the parameters (diffusers 0.42), so every
    buffer stayed on the GPU after its block's first call. The quantized layers (``FP8Linear``, ``Int4Linear``) keep
    their weights in buffers: with ``--quantize fp8|int4 --offload group`` the whole quantized transformer would have
    piled up on the GPU (about 19 or 11 GiB for Qwen-Image) while the plan counted two blocks. Patched on the class,
    not on the groups, because diffusers makes new groups itself (loading or removing a LoRA regroups the model)."""
    from diffusers.hooks.group_offloading import ModuleGroup

    if getattr(ModuleGroup, "_qis_offloads_buffers", False):
        return
    offload_parameters = ModuleGroup._offload_to_memory

    def _offload_to_memory(group) -> None:
        offload_parameters(group)
        if group.stream is None:  # without a stream the modules were moved whole (``Module.to``), buffers too
            return
        for group_module in group.modules:
            for buffer in group_module.buffers():
                copy = group.cpu_param_dict.get(buffer)
                if copy is not None:
                    buffer.data = copy

    ModuleGroup._offload_to_memory = _offload_to_memory  # type: ignore[method-assign]
    ModuleGroup._qis_offloads_buffers = True  # type: ignore[attr-defined]


def keep_later_hooks_forward() -> None:
    """Make diffusers' ``HookRegistry.remove_hook`` keep the ``new_forward`` of the hook registered after the removed
    one (once per process).

    A hook with ``new_forward`` (batched CFG's, the step caches' head hooks) calls ``fn_ref.original_forward``, what
    ran below it; its ``fn_ref.forward`` is its own ``new_forward``. Removing the hook before it set the latter to the
    removed hook's forward (diffusers 0.42), so the later hook fell out of the chain: under group offload with CUDA's
    side stream, whose order-tracing hook removes itself after the first call, batched CFG stopped batching after a
    worker's warm-up (two passes a step while ``/ready`` said it was on); regrouping (a LoRA's loading, a change of
    the layers) did the same on any device. Here what the removal hands on goes to ``original_forward`` instead."""
    from diffusers.hooks.hooks import HookRegistry

    if getattr(HookRegistry, "_qis_keeps_new_forward", False):
        return
    remove = HookRegistry.remove_hook

    def remove_hook(registry, name: str, recurse: bool = True) -> None:
        after = own = None
        if name in registry.hooks:
            index = registry._hook_order.index(name)
            if index + 1 < len(registry._fn_refs) and registry._fn_refs[index + 1].original_forward is not None:
                after = registry._fn_refs[index + 1]
                own = after.forward
        remove(registry, name, recurse)
        if after is not None:  # diffusers put what the removed hook ran below it in ``forward``: it goes below
            after.original_forward, after.forward = after.forward, own

    HookRegistry.remove_hook = remove_hook  # type: ignore[method-assign,assignment]
    HookRegistry._qis_keeps_new_forward = True  # type: ignore[attr-defined]


def regroup_offloaded(module: torch.nn.Module) -> None:
    """Under group offload, make ``module``'s groups again after its layers changed (FP8 layers made after the hooks,
    LoRA adapters, their dtype): a group still lists the old weights, and with CUDA's side stream finds no CPU copy of
    the new ones (KeyError on the first call). Nothing without group offload."""
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook, _maybe_remove_and_reapply_group_offloading

    hook = _get_top_level_group_offload_hook(module)  # made by ``group_offload``, which patched diffusers already
    config = hook.config if hook is not None and hook.config.stream is not None else None  # streamed: CUDA
    if config is not None:  # the new weights, pinned one at a time as at first (``pin_one_by_one``); the rest are
        pin_one_by_one(module, config.block_modules or ())
    _maybe_remove_and_reapply_group_offloading(module)
    if config is not None:  # the pinned copies of the weights replaced (bf16 layers now FP8 or 4-bit) go back
        release_host_cache()


def release_host_cache() -> None:
    """Give the pinned memory torch's allocator keeps for reuse back to the system (it keeps every pinned block it
    freed: after the layers of a group-offloaded transformer are replaced, the pinned copies of the old ones); nothing
    without CUDA or where this torch has no such call."""
    if not torch.cuda.is_available():
        return
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def offload_groups(module: torch.nn.Module) -> None:
    """Put every offload group of ``module`` back in its CPU copies (with CUDA's stream: the weights point at them
    again; a group already there is unchanged), so that a write into the weights reaches what the next onload reads;
    nothing without group offload. The next call onloads each group as it comes."""
    groups = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        group.offload_()


def keep_on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` moved to ``device`` for good (the text encoder's token embeddings under group offload)."""
    return module.to(device)


def make_variant(cls, pipe, mode: MemoryMode):
    """A pipeline of class ``cls`` (img2img, inpaint) on ``pipe``'s loaded components, offloading like ``pipe``.

    Not diffusers' ``from_pipe``: that casts the new pipeline, and so the modules it shares, to its ``dtype`` argument
    (float32 by default): a bf16 model's first variation would have turned the whole model into float32 (twice its
    memory, and the generations after it failing on mixed dtypes), and FP8-stored weights back into the run dtype.
    Group and sequential offload hooks live on the shared modules and need nothing more.
    Model CPU offload keeps its hook chain on the pipeline object, so the variant installs
    its own (on the same modules), which also offloads the last model after its calls.
    """
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    variant = cls(**{name: pipe.components[name] for name in names if name in pipe.components})
    if mode.offload == "model":
        variant.enable_model_cpu_offload(device=mode.device)
    return variant
