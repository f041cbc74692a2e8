"""Whether what the workers keep in the machine's memory fits there, and what to say when it does not.

A CPU worker keeps every weight in the machine's memory (in float32 unless ``--dtype``
says otherwise: a full-size Qwen-Image needs about 115 GB), a GPU worker what its
offload mode keeps off the GPU; the kernel kills a process that runs out of it, minutes
into loading. The plan checks both against the memory available now
(``machine.discover_host_memory``) before anything loads. No torch here.
"""

from __future__ import annotations

from dataclasses import replace

from .footprint import PINNED_COMPONENTS, human
from .machine import HostMemory
from .plan_advice import can_share, fewer_workers, largest_side, needs


def cpu_need(placements, footprints, shared: bool = False) -> tuple[int, dict[str, int]]:
    """Host bytes the CPU workers of a plan need in all, and per model (``None`` needs are unknown: left out). Each
    worker loads with a peak above what it keeps (``load_extra``); ``shared`` (``--share-components``): slot ``i``
    of every model is one process, which loads its models one after the other, so only its largest peak counts
    (given to that model)."""
    per_model: dict[str, int] = {}
    peaks: dict[int, tuple[str, int]] = {}  # a shared process's (slot's) largest loading peak, and whose
    for p in placements:
        if p.device == "cpu" and p.need is not None:
            extra = footprints[p.model].load_extra if p.model in footprints else 0
            per_model[p.model] = per_model.get(p.model, 0) + p.need + (0 if shared else extra)
            if shared and extra > peaks.get(p.slot, ("", -1))[1]:
                peaks[p.slot] = (p.model, extra)
    for model, extra in peaks.values():
        per_model[model] += extra
    return sum(per_model.values()), per_model


def offloaded_bytes(fp, whole) -> int:
    """Host bytes one GPU worker keeps for the weights it offloads (``offloaded_parts`` in all)."""
    return sum(offloaded_parts(fp, whole).values())


def offloaded_parts(fp, whole) -> dict[str, int]:
    """Host bytes one GPU worker keeps for the weights it offloads, per component: group offload's pinned copies
    (``footprint.pinned_parts``), else what its mode keeps off the device (``whole``: nothing offloaded)."""
    if fp.host_pinned is not None:
        return dict(fp.host_pinned)
    parts = {name: size - fp.components.get(name, 0) for name, size in whole.components.items()}
    return {name: size for name, size in parts.items() if size > 0}


def offloaded(placements, footprints, full, keys=None) -> dict[str, int]:
    """Host bytes of the weights that GPU workers keep off their device (their offload mode), per model; ``full`` are
    the footprints with nothing offloaded. ``keys`` (``--share-components``: slot ``i`` of every model is one
    process): a component shared in a process (``plan_groups.shared_keys``) is counted once, for its first model."""
    per_model: dict[str, int] = {}
    seen: set[tuple] = set()
    for p in placements:
        if p.device != "cpu" and p.model in footprints and p.model in full:
            off = 0
            for name, size in offloaded_parts(footprints[p.model], full[p.model]).items():
                key = (keys or {}).get((p.model, name))
                if key is not None:
                    if (p.slot, key) in seen:
                        continue
                    seen.add((p.slot, key))
                off += size
            if off:
                per_model[p.model] = per_model.get(p.model, 0) + off
    return per_model


def host_needs(placements, footprints, full, cpu_footprints, keys=None) -> tuple[dict[str, int], list]:
    """Host bytes per model of a GPU plan, and the workers counted: the GPU workers that offload weights
    (``footprints`` against ``full``; ``keys``: shared components once per process, ``offloaded``), and the whole
    of the workers an explicit ``--device`` list puts on the CPU (their ``need`` in ``cpu_footprints``)."""
    per_model = offloaded(placements, footprints, full, keys)
    counted = [p for p in placements if p.device == "cpu" or p.model in per_model]
    for model, need in cpu_need(placements, cpu_footprints)[1].items():
        per_model[model] = per_model.get(model, 0) + need
    return per_model, counted


def mixed_refusal(per_model: dict[str, int], counted, cpu_footprints, settings, host: HostMemory, suggestions) -> str:
    """The message of a GPU plan whose CPU entries (``--device cuda:0,cpu``), with any offloaded weights, need more
    host memory than the machine has available; ``counted`` are the workers that need it."""
    on_cpu = [p for p in counted if p.device == "cpu"]
    model = max({p.model for p in on_cpu}, key=lambda m: per_model.get(m, 0))
    fp = cpu_footprints.get(model)
    each = f": a worker of {model} needs {human(fp.total)} there ({needs(fp, 'the CPU')})" if fp is not None else ""
    head = (
        f"not enough memory on this machine for the workers --device puts on the CPU ({', '.join(p.name for p in on_cpu)}){each}"
    )
    counts = {m: sum(1 for p in counted if p.model == m) for m in per_model}
    last = "Or give --device only GPUs: `qwen-image-server plan` shows what each GPU needs."
    return _message(head, "This machine's workers and offloaded weights", per_model, settings, host, suggestions, last, counts)


def offload_refusal(per_model: dict[str, int], footprints, full, settings, host: HostMemory, suggestions: list[str]) -> str:
    """The message of a GPU plan whose offloaded weights need more host memory than the machine has available."""
    model = max(per_model, key=per_model.__getitem__)
    fp, whole = footprints[model], full[model]
    if fp.host_offloaded is not None:  # pinned copies of whole components, rounded by torch's pinned allocator
        grouped = [name for name in PINNED_COMPONENTS[fp.profile.offload] if name in whole.components]
        parts = (
            f"pinned copies of its {' and '.join(name.replace('_', ' ') for name in grouped)}, each tensor rounded up to a "
            "power of two by torch's pinned-memory allocator"
        )
    else:
        parts = ", ".join(
            f"{name} {human(size - fp.components.get(name, 0))}"
            for name, size in whole.components.items()
            if size > fp.components.get(name, 0)
        )
    head = (
        f"not enough memory on this machine for the weights model {model} offloads (--offload {fp.profile.offload}): "
        f"each of its workers keeps {human(offloaded_bytes(fp, whole))} in host memory ({parts})"
    )
    last = "Or serve it on a machine with more memory: the GPUs themselves have room for the plan."
    return _message(head, "The GPU workers' offloaded weights", per_model, settings, host, suggestions, last)


def host_refusal(model_needs: dict[str, int], footprints, settings, host: HostMemory, suggestions: list[str]) -> str:
    """The message of a plan whose CPU workers need more memory than the machine has available."""
    largest = max(model_needs, key=model_needs.__getitem__)
    fp = footprints.get(largest)
    processes = settings.workers_for(largest)
    if settings.share_components and len(model_needs) > 1:
        head = (
            f"not enough memory on this machine for models {', '.join(model_needs)} on the CPU in {processes} "
            f"worker process(es) (--share-components): each needs {human(sum(model_needs.values()) // processes)} (text "
            "encoders and VAEs with the same files counted once)"
        )
    elif fp is not None:
        head = (
            f"not enough memory on this machine for model {largest} on the CPU: each of its workers needs {human(fp.total)} "
            f"({needs(fp, 'the CPU')})"
        )
    else:
        head = f"not enough memory on this machine for model {largest} on the CPU"
    last = "Or serve it on a GPU: `qwen-image-server plan` shows what each GPU needs."
    return _message(head, "The CPU workers", model_needs, settings, host, suggestions, last)


def _message(
    head: str, what: str, per_model: dict[str, int], settings, host: HostMemory, suggestions, last: str, counts=None
) -> str:
    """A host refusal: its head, the need per model against the machine's memory (``counts``: the workers counted per
    model, by default all of them), the flags that fit, a way out."""
    counts = counts or {m: settings.workers_for(m) for m in per_model}
    models = ", ".join(f"{m} {counts[m]} x {human(need // max(1, counts[m]))}" for m, need in per_model.items())
    return "\n".join(
        [
            head,
            f"{what} need {human(sum(per_model.values()))} in all ({models}); "
            f"{human(host.available)} is available of {human(host.total)} ({host.source}).",
            ("Would fit: " + "; ".join(suggestions)) if suggestions else "No single flag makes it fit.",
            last,
        ]
    )


def cpu_suggestions(model: str, specs, settings, fits) -> list[str]:
    """Flags that make the CPU workers fit, each checked by planning again (``fits(**changes)`` -> bool)."""
    out = []
    if settings.dtype in ("auto", "float32") and fits(dtype="bfloat16"):
        out.append("--dtype bfloat16 (2 bytes a weight instead of float32's 4)")
    profile = next(spec.profile for spec in specs if spec.id == model)
    fp8 = replace(profile, weights_dtype="fp8")
    if profile.weights_dtype != "fp8" and profile.quantize != "fp8" and fits(profiles={model: fp8}):
        stored = "the text encoder's" if profile.quantize == "int4" else "the transformer's"
        out.append(f"--weights-dtype fp8@{model} ({stored} weights stored in FP8)")
    if profile.vae_tiling != "on" and fits(profiles={model: replace(profile, vae_tiling="on")}):
        out.append(f"--vae-tiling on@{model} (the VAE decodes in tiles: less working memory)")
    side = largest_side(settings, lambda s: fits(max_side=s), specs)
    if side is not None:
        out.append(f"QIS_MAX_IMAGE_SIDE={side} (images up to {side}x{side}: less working memory)")
    fewer = fewer_workers(model, settings, fits)
    if fewer:
        out.append(fewer)
    if len(specs) > 1 and not settings.share_components and can_share(specs, settings) and fits(share=True):
        out.append("--share-components (one worker process serves every model; identical text encoders and VAEs load once)")
    return out
