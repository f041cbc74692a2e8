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
from typing import cast

import torch

from . import offload
from .memory_modes import OFFLOADED, check_spec_mode, load_order, loads_on_cpu, quantize_on_load
from .profile import fp8_stored
from .shared import SHAREABLE, ComponentCache, component_folder
from .spec import ModelSpec

log = logging.getLogger(__name__)

FP8_STORAGE = torch.float8_e4m3fn
#: Layers of the (transformers) text encoder kept in the run dtype, on top of diffusers' default patterns
#: (``norm``, ``patch_embed``...): the token embeddings, and the LM head that may share their weight.
TEXT_ENCODER_SKIP_PATTERNS = ("embed_tokens", "lm_head")


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
    from .random_arch import build_random_pipeline
    from .random_source import component_key

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
    """Install the offload hooks ``mode`` asks for on the loaded pipeline's components (group offload:
    ``offload.py``)."""
    if mode.offload == "text-encoder":
        offload.group_offload(pipe.text_encoder, mode.device)
    elif mode.offload == "group":
        offload.group_offload(pipe.transformer, mode.device)
        offload.group_offload(pipe.text_encoder, mode.device)
    elif mode.offload == "model":
        pipe.enable_model_cpu_offload(device=mode.device)
    elif mode.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=mode.device)


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
