"""What each model needs in a plan: its footprint on a GPU or on the CPU, with nothing offloaded, and what the CPU
entries of an explicit ``--device`` list hold in this machine's memory. No torch here."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .footprint import CPU_PROCESS_OVERHEAD, PROCESS_OVERHEAD, Footprint, footprint
from .weights_files import ModelTensors

if TYPE_CHECKING:
    from .plan_result import Placement


def run_bytes(dtype: str, device: str) -> int:
    """Bytes per parameter of the dtype the model runs in: bf16 on GPUs, float32 on CPU unless told."""
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return 4 if dtype == "float32" else 2


def footprints_for(specs, tensors: dict[str, ModelTensors], settings, on_gpu: bool, overrides=None) -> dict[str, Footprint]:
    """Footprints of the models whose tensors are known (``overrides``: model id -> profile, for suggestions).
    On the CPU nothing is offloaded: every weight stays in the machine's memory."""
    out = {}
    for spec in specs:
        if spec.id in tensors:
            profile = (overrides or {}).get(spec.id) or spec.profile
            out[spec.id] = footprint(
                spec,
                tensors[spec.id],
                run_bytes=run_bytes(settings.dtype, "cuda" if on_gpu else "cpu"),
                max_image_side=settings.max_image_side,
                max_input_images=settings.max_input_images,
                max_batch_size=settings.max_batch_size,
                profile=profile if on_gpu else replace(profile, offload="none"),
                overhead=PROCESS_OVERHEAD if on_gpu else CPU_PROCESS_OVERHEAD,
                preview_scale=settings.preview_scale,
                on_gpu=on_gpu,
            )
    return out


def with_cpu_needs(placed, specs, tensors, settings, profiles=None) -> tuple[list[Placement], dict[str, Footprint]]:
    """The placements with what the CPU entries of an explicit ``--device`` list need there (every weight, in the
    CPU's dtype), and those CPU footprints (none without CPU entries)."""
    if not any(p.device == "cpu" for p in placed):
        return placed, {}
    cpu = footprints_for(specs, tensors, settings, on_gpu=False, overrides=profiles)
    return [replace(p, need=cpu[p.model].total if p.model in cpu else None) if p.device == "cpu" else p for p in placed], cpu


def whole_footprints(specs, tensors, settings, profiles=None) -> dict[str, Footprint]:
    """GPU footprints with nothing offloaded: what a worker's weights are in all."""
    resident = {spec.id: replace((profiles or {}).get(spec.id) or spec.profile, offload="none") for spec in specs}
    return footprints_for(specs, tensors, settings, on_gpu=True, overrides=resident)
