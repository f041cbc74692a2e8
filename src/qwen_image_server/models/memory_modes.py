"""Which memory modes can run where: the checks made before anything loads (torch-free, so that the API
process, which only validates and places, does not import torch for them on a machine without a GPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .profile import ProfileError

if TYPE_CHECKING:
    from .spec import ModelSpec

#: Components each offload mode keeps off the device between uses (loaded on the CPU).
OFFLOADED = {
    "none": (),
    "text-encoder": ("text_encoder",),
    "group": ("transformer", "text_encoder"),
    "model": ("transformer", "text_encoder", "vae"),
    "sequential": ("transformer", "text_encoder", "vae"),
}


def load_order(components) -> list[str]:
    """The order components load in: the transformer (the largest) first, then the text encoder, then the rest."""
    first = ("transformer", "text_encoder")
    return sorted(components, key=lambda name: first.index(name) if name in first else len(first))


def quantize_on_load(profile) -> bool:
    """Whether ``quantize`` (fp8, int4) converts the transformer as it loads (no LoRAs: they need its plain linear
    layers first), rather than once the whole pipeline and its adapters are loaded; the memory plan counts the
    difference."""
    return getattr(profile, "quantize", "none") in ("fp8", "int4") and not getattr(profile, "loras", ())


def loads_on_cpu(profile, component: str) -> bool:
    """Whether ``component`` is opened on the CPU first, whatever its offload: the transformer under ``quantize=int4``,
    whose layers are quantized one at a time on their way to the device, so that it is never there in the run dtype
    (38 GiB for Qwen-Image in bf16, more than the cards int4 is for). Its files are memory-mapped there (diffusers'
    loading with ``device_map="cpu"``), not copied into the process, when they hold the run dtype."""
    return component == "transformer" and getattr(profile, "quantize", "none") == "int4"


def check_mode(model: str, weights_dtype: str, offload: str, quantize: str, device: str) -> None:
    """Refuse combinations that cannot work, with a message naming the model and the settings."""
    if offload not in OFFLOADED:
        raise ProfileError(f"offload for model {model}: {offload!r} is not one of {', '.join(OFFLOADED)}")
    if weights_dtype == "fp8" and quantize == "fp8":
        raise ProfileError(
            f"model {model}: weights_dtype=fp8 (FP8 storage, compute in the run dtype) and quantize=fp8 (FP8 matmuls) "
            "both convert the transformer's weights; choose one"
        )
    if weights_dtype == "fp8" and offload == "sequential":
        raise ProfileError(
            f"model {model}: weights_dtype=fp8 does not combine with offload=sequential (accelerate's per-layer hooks "
            "replace the weights the FP8 casting keeps); use offload=group with weights_dtype=fp8"
        )
    if quantize in ("fp8", "int4") and offload == "sequential":
        kind = "FP8" if quantize == "fp8" else "4-bit"
        raise ProfileError(
            f"model {model}: quantize={quantize} does not combine with offload=sequential (the {kind} layers keep their "
            f"weights as buffers, which accelerate's per-layer hooks move to the GPU for good: the whole {kind} "
            f"transformer would stay there); use offload=group with quantize={quantize}"
        )
    if offload == "sequential" and not device.startswith("cuda"):
        raise ProfileError(f"model {model}: offload=sequential needs a CUDA device (the model runs on {device})")
    if offload != "none" and not (device.startswith("cuda") or device == "cpu"):
        raise ProfileError(f"model {model}: offload={offload} supports CUDA devices and the CPU, not {device}")


def check_memory_modes(specs: list[ModelSpec], device_setting: str) -> None:
    """Refuse, before any worker starts, memory modes that cannot run on the configured devices.

    ``device_setting`` is the server's ``device`` setting (``auto``, ``cpu``, ``cuda`` or a
    comma-separated list); ``auto`` means CUDA when a GPU is visible. Only ``auto`` on a machine
    with a GPU driver imports torch, to ask whether CUDA works.
    """
    if device_setting in ("auto", "cuda"):
        devices = ["cuda" if device_setting == "cuda" or _cuda_available() else "cpu"]
    else:
        devices = [d.strip() for d in device_setting.split(",") if d.strip()]
    for spec in specs:
        for device in devices:
            check_spec_mode(spec, device)


def check_spec_mode(spec: ModelSpec, device: str) -> None:
    """``check_mode`` for the memory mode ``spec``'s profile asks for on ``device``."""
    profile = spec.profile
    check_mode(spec.id, profile.weights_dtype, profile.offload, getattr(profile, "quantize", "none"), device)


def _cuda_available() -> bool:
    from .machine import no_gpu_driver

    if no_gpu_driver():
        return False
    import torch

    return torch.cuda.is_available()
