"""What a memory plan holds and how it is shown: a device per worker slot (``Placement``), the models' estimates
and the memory they were checked against (``Plan``, with its reports for ``/ready``, ``/v1/models`` and
``qwen-image-server plan``), and the refusal of a plan that does not fit (``PlanError``). ``planner.py`` makes
plans. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .footprint import GIB, Footprint, human
from .machine import Gpu, HostMemory
from .spec import ModelConfigError


@dataclass(frozen=True)
class Placement:
    """One worker slot of one model and its device."""

    model: str
    slot: int
    device: str
    need: int | None  # bytes; None: the estimate is unknown

    @property
    def name(self) -> str:
        return f"{self.model}#{self.slot}"


@dataclass
class Plan:
    """Estimates per model and a device per worker slot (``placements`` is empty when the plan does not fit)."""

    footprints: dict[str, Footprint]
    unknown: dict[str, str]  # model id -> why its estimate is unknown
    gpus: list[Gpu]
    placements: list[Placement] = field(default_factory=list)
    shared_processes: bool = False  # --share-components: slot i of every model is one worker process
    host: HostMemory | None = None  # the machine's memory, when checked: CPU workers, or GPU workers that offload
    host_planned: int = 0  # bytes planned there: CPU workers whole, GPU workers' offloaded weights
    host_workers: list[str] = field(default_factory=list)
    unchecked: bool = False  # --memory-check off, or warn with a plan that did not fit: placed without any check
    check_failed: bool = False  # --memory-check warn with a plan that did not fit (the GPUs show what was checked)

    def devices(self, model: str) -> list[str]:
        """The device of each worker slot of ``model``, in slot order."""
        return [p.device for p in sorted(self.placements, key=lambda p: p.slot) if p.model == model]

    def model_summary(self, model: str) -> dict:
        """The estimate of one model for ``/v1/models``."""
        if model in self.footprints:
            return {**self.footprints[model].summary(), "devices": self.devices(model)}
        return {"total_gib": None, "unknown": self.unknown.get(model), "devices": self.devices(model)}

    def gpu_report(self, workers: list[dict] | None = None) -> list[dict]:
        """Per GPU: total, free at planning, planned use and its workers; with live numbers of ``workers``
        (the engine's worker descriptions, whose ``memory`` the workers report when they are ready)."""
        live = {w.get("name"): w for w in workers or []}
        out = []
        for gpu in self.gpus:
            here = [p for p in self.placements if p.device == gpu.device]
            planned = sum(p.need or 0 for p in here)
            report: dict = {
                "device": gpu.device,
                "name": gpu.name,
                "total_gib": _gib(gpu.total),
                "free_at_start_gib": _gib(gpu.free),
                "planned_gib": _gib(planned),
                "checked": not self.unchecked and gpu.free is not None,
                "workers": [],
            }
            frees = []
            for p in here:
                memory = (live.get(p.name) or {}).get("memory") or {}
                if memory.get("device_free_gib") is not None:
                    frees.append(memory["device_free_gib"])
                report["workers"].append({"name": p.name, "planned_gib": _gib(p.need), **memory})
            if frees and gpu.total:
                report["used_gib"] = round(gpu.total / GIB - min(frees), 2)  # as the last worker to load saw it
            out.append(report)
        return out

    def host_report(self) -> dict | None:
        """The machine's memory and what its CPU workers need (for ``/ready`` and ``/v1/models``), when checked."""
        if self.host is None:
            return None
        return {
            "source": self.host.source,
            "total_gib": _gib(self.host.total),
            "available_at_start_gib": _gib(self.host.available),
            "planned_gib": _gib(self.host_planned),
            "workers": self.host_workers,
        }

    def table(self) -> str:
        """The plan as text for ``qwen-image-server plan``: estimates per model, then placement per device."""
        lines = []
        for model in list(self.footprints) + [m for m in self.unknown if m not in self.footprints]:
            fp = self.footprints.get(model)
            if fp is None:
                lines.append(f"{model}: memory estimate unknown ({self.unknown[model]})")
                continue
            parts = ", ".join(f"{name} {human(b)}" for name, b in fp.components.items())
            work = max(fp.activations, fp.text_encoder_work)
            lines.append(f"{model}: {human(fp.total)} per worker at {fp.image_side}x{fp.image_side} (from {fp.origin})")
            loading = f", {human(fp.load_extra)} more while loading" if fp.load_extra else ""
            lines.append(
                f"  weights {human(fp.weights)} ({parts}), working memory {human(work)}, process {human(fp.overhead)}{loading}"
            )
        for gpu in self.gpus:
            here = [p for p in self.placements if p.device == gpu.device]
            planned = sum(p.need or 0 for p in here)
            names = ", ".join(f"{p.name} {human(p.need)}" for p in here) or "nothing"
            room = ""
            if gpu.free is not None:  # a refused plan shows the worker that did not fit where it was tried
                left = gpu.free - planned
                room = f", {human(left)} headroom" if left >= 0 else f", short by {human(-left)}"
            head = f"{gpu.device} {gpu.name}".strip()
            lines.append(f"{head} ({human(gpu.free)} free of {human(gpu.total)}): {names}{room}")
        if self.shared_processes:
            lines.append(
                "one worker process per slot serves every model (--share-components): a text encoder or VAE with the "
                "same files is counted for the first model only, the working memory and process once"
            )
        others = sorted({p.device for p in self.placements} - {g.device for g in self.gpus} - ({"cpu"} if self.host else set()))
        for device in others:
            names = ", ".join(p.name for p in self.placements if p.device == device)
            lines.append(f"{device}: {names} (no memory check)")
        if self.host is not None:
            room = f"{human(self.host.available)} available of {human(self.host.total)} ({self.host.source})"
            left = self.host.available - self.host_planned
            rest = f"{human(left)} headroom" if left >= 0 else f"short by {human(-left)}"
            what = ", ".join(self.host_workers) or "nothing"
            lines.append(f"host memory ({room}): {what}, {human(self.host_planned)} in all, {rest}")
        if self.check_failed:
            lines.append(
                "memory checked: the plan does not fit (the warning above says why); --memory-check warn places the "
                "workers anyway, as if every device had room"
            )
        elif self.unchecked:
            lines.append("memory not checked (--memory-check off): workers placed as if every device had room")
        return "\n".join(lines)


class PlanError(ModelConfigError):
    """The workers do not fit in the devices' memory (or, ``about_memory`` false, a ``--device`` GPU is not
    there); ``plan`` holds the estimates for display."""

    def __init__(self, message: str, plan: Plan, about_memory: bool = True):
        super().__init__(message)
        self.plan = plan
        self.about_memory = about_memory  # whether --memory-check warn would serve anyway


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 2)
