"""The memory plan: which device each worker gets, decided before anything loads.

Every worker of every model (``settings.workers_for(model)`` each) needs the memory its
``Footprint`` says. The planner places them on the GPUs that have that much free
(first-fit decreasing: the largest first, each on the GPU with the most room left,
preferring GPUs without a worker of the same model so that a model's workers spread;
if that fails, best fit, which packs tighter). An explicit ``--device`` list is kept
as given (one entry per worker slot, round-robin) and only checked. When the
workers do not fit, ``PlanError`` says which model, how much it needs, what each GPU
has, and which flags would make it fit, before the port opens.

Without a GPU every worker runs on the CPU, and the plan checks that they fit in the
machine's available memory (``host_memory``), with the same kind of refusal.

Free memory comes from injectable discovery functions (``machine``: the real ones ask a
short-lived subprocess for the GPUs, so the API process holds no CUDA context, and read
``/proc/meminfo`` and the memory cgroup for the host). The plan itself, its reports and ``PlanError`` are in
``plan_result.py``. No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from .footprint import Footprint
from .host_memory import cpu_need, cpu_suggestions, host_needs, host_refusal, mixed_refusal, offload_refusal
from .machine import Gpu, HostMemory, count_gpus_in_process, discover_gpus, discover_host_memory
from .plan_advice import allowed_only, changed_settings, profiles_allowed, refusal, suggest
from .plan_footprints import footprints_for, whole_footprints, with_cpu_needs
from .plan_groups import expand_groups, group_name, group_needs, group_slots, shared_keys
from .plan_result import Placement, Plan, PlanError
from .spec import ModelConfigError, ModelSpec
from .weights_files import ModelTensors, UnknownFootprint, read_tensors

log = logging.getLogger(__name__)


# --- the plan -------------------------------------------------------------------------------------
def _slots(specs, footprints: dict[str, Footprint], settings) -> list[tuple[str, int, int | None]]:
    """One ``(model, slot, need)`` per worker: ``settings.workers_for(model)`` of each model."""
    needs = {spec.id: footprints[spec.id].total if spec.id in footprints else None for spec in specs}
    return [(spec.id, slot, needs[spec.id]) for spec in specs for slot in range(settings.workers_for(spec.id))]


def place(
    slots: list[tuple[str, int, int | None]], gpus: list[Gpu], spread: bool = True, extras: dict[str, int] | None = None
) -> tuple[list[Placement], tuple | None]:
    """Place worker slots ``(model, slot, need)`` on ``gpus``; returns the placements and the first slot
    that found no room (None when all fit). Largest first; unknown needs last, on the emptiest GPU.

    ``extras`` (model -> bytes) is what a model's worker needs on top while it loads; the workers of one
    GPU load one at a time, so each GPU keeps room for the largest extra of its workers, once."""
    extras = extras or {}
    left = {g.device: (g.free if g.free is not None else float("inf")) for g in gpus}
    peak = {g.device: 0 for g in gpus}  # the loading room kept on each GPU
    models_on: dict[str, set[str]] = {g.device: set() for g in gpus}
    # Ties (free memory unknown: every GPU has "infinite" room; or needs unknown) go to the GPU with the fewest
    # workers, then the least planned: not all to the first GPU.
    workers_on = {g.device: 0 for g in gpus}
    planned = {g.device: 0 for g in gpus}
    order = sorted(slots, key=lambda s: (s[2] is None, -(s[2] or 0)))
    placed: list[Placement] = []
    for model, slot, need in order:
        extra = extras.get(model, 0) if need is not None else 0
        cost = {d: (need or 0) + max(0, extra - peak[d]) for d in left}
        fits = [g.device for g in gpus if need is None or left[g.device] >= cost[g.device]]
        if not fits:
            return placed, (model, slot, need)
        if spread:
            device = min(fits, key=lambda d: (model in models_on[d], -(left[d] - cost[d]), workers_on[d], planned[d]))
        else:
            device = min(fits, key=lambda d: (left[d] - cost[d], workers_on[d], planned[d]))
        left[device] -= cost[device]
        peak[device] = max(peak[device], extra)
        models_on[device].add(model)
        workers_on[device] += 1
        planned[device] += cost[device]
        placed.append(Placement(model, slot, device, need))
    return sorted(placed, key=lambda p: (p.model, p.slot)), None


def _check_explicit(
    slots, devices: list[str], gpus: list[Gpu], extras: dict[str, int] | None = None
) -> tuple[list[Placement], str | tuple | None]:
    """An explicit ``--device`` list, round-robin over the slots as given, checked for room (with the largest
    loading extra of each GPU's workers, see ``place``): the placements and None, an error text, or the
    first slot that found no room as ``(model, slot, need, device)``."""
    extras = extras or {}
    by_device = {g.device: g for g in gpus}
    placed = [Placement(m, s, _norm(devices[i % len(devices)]), need) for i, (m, s, need) in enumerate(slots)]
    # every GPU the list names, also one no worker goes to yet (a typo showed only once --workers grew)
    for device in dict.fromkeys(_norm(d) for d in devices):
        if device.startswith("cuda") and device not in by_device:
            visible = ", ".join(by_device) or "none"
            return placed, f"--device names {device}, which is not visible (visible GPUs: {visible})"
    for device in dict.fromkeys(p.device for p in placed):
        if not device.startswith("cuda"):
            continue
        gpu = by_device[device]
        here = [p for p in placed if p.device == device]
        need = sum(p.need or 0 for p in here) + max((extras.get(p.model, 0) for p in here if p.need is not None), default=0)
        if gpu.free is not None and need > gpu.free:
            first = here[-1]
            return placed, (first.model, first.slot, first.need, device)  # its own need (the others are listed)
    return placed, None


def _norm(device: str) -> str:
    device = device.strip()
    return "cuda:0" if device == "cuda" else device


def checked_plan(specs: list[ModelSpec], settings, discover=None, reader=None, host=None) -> Plan:
    """``make_plan`` as ``settings.memory_check`` says: ``on`` refuses a plan that does not fit, ``warn`` logs the
    refusal and places the workers unchecked (free memory unknown), ``off`` never checks."""
    if settings.memory_check == "on":
        return make_plan(specs, settings, discover, reader, host)
    # warn may plan twice: the GPUs are probed (a subprocess) and each model's files read once for both
    found = (discover or discover_gpus)() if settings.device.strip() != "cpu" else []
    read, tensors = reader or read_tensors, dict[str, ModelTensors]()

    def read_once(spec: ModelSpec) -> ModelTensors:
        if spec.id not in tensors:
            tensors[spec.id] = read(spec)
        return tensors[spec.id]

    failed: Plan | None = None
    if settings.memory_check == "warn":
        try:  # the real machine's memory is checked as make_plan checks it when it probes the GPUs itself
            return make_plan(specs, settings, lambda: found, read_once, host or (None if discover else discover_host_memory))
        except PlanError as exc:
            if not exc.about_memory:  # a GPU that is not there: no check makes it serve
                raise
            log.warning("the memory plan does not fit; placing the models anyway (--memory-check warn):\n%s", exc)
            failed = exc.plan
    unknown_free = None if found is None else [replace(gpu, free=None) for gpu in found]
    plan = make_plan(specs, settings, lambda: unknown_free, read_once, host=lambda: None)
    plan.unchecked = True
    if failed is not None:  # checked, and short: the table shows the memory the check saw, the host's too
        plan.check_failed, plan.gpus = True, list(found) if found is not None else plan.gpus
        if failed.host is not None:
            plan.host, plan.host_planned, plan.host_workers = failed.host, failed.host_planned, failed.host_workers
    return plan


def make_plan(
    specs: list[ModelSpec],
    settings,
    discover: Callable[[], list[Gpu] | None] | None = None,
    reader: Callable[[ModelSpec], ModelTensors] | None = None,
    host: Callable[[], HostMemory | None] | None = None,
) -> Plan:
    """The plan for ``settings.workers_for(model)`` workers of each of ``specs`` on ``settings.device``; ``PlanError``
    (a ``ModelConfigError``) when they do not fit, with the flags that would make them fit.

    ``discover`` lists the GPUs (default: ``discover_gpus``), ``reader`` a model's tensors (default:
    ``read_tensors``, headers only), ``host`` the machine's memory, which CPU workers are checked against
    (default: ``discover_host_memory``).
    """
    probe = discover or discover_gpus
    reader = reader or read_tensors
    setting = settings.device.strip()
    gpus: list[Gpu] = []
    if setting != "cpu":
        found = probe()
        gpus = count_gpus_in_process() if found is None else found
        if setting == "cuda" and not gpus:
            raise ModelConfigError("--device cuda asked for, but no GPU is visible (use --device cpu or auto)")
    on_gpu = bool(gpus) or setting not in ("cpu", "auto", "cuda")
    tensors: dict[str, ModelTensors] = {}
    unknown: dict[str, str] = {}
    for spec in specs:
        try:
            tensors[spec.id] = reader(spec)
        except UnknownFootprint as exc:
            unknown[spec.id] = str(exc)
            log.warning("memory estimate of %s unknown: %s", spec.id, exc)
    keys = shared_keys(specs) if getattr(settings, "share_components", False) and len(specs) > 1 else None
    if not on_gpu:
        return _cpu_plan(specs, tensors, unknown, settings, keys, (host or discover_host_memory)())

    # GPU workers that offload keep those weights in this machine's memory; with fake GPUs (planning for another
    # machine) only an injected host is checked
    machine = host() if host else discover_host_memory() if discover is None else None
    fps = footprints_for(specs, tensors, settings, on_gpu=True)
    plan = Plan(fps, unknown, gpus, shared_processes=keys is not None)
    placed, failed = _arrange(specs, fps, settings, gpus, keys)
    plan.placements = placed  # all of them, or what did fit (for the table)

    # a --device list with the CPU in it runs workers there too: a suggestion must pass the checks for both
    checked = "cuda,cpu" if "cpu" in (d.strip() for d in str(settings.device).split(",")) else "cuda"
    fits = allowed_only(lambda **kw: _fits(specs, tensors, settings, gpus, keys, machine=machine, **kw), checked)

    if isinstance(failed, str):  # a --device GPU that is not there, whatever the memory check says
        raise PlanError(failed, plan, about_memory=False)
    if failed is not None:
        raise PlanError(refusal(plan, failed, placed, specs, settings, fits), plan)
    placed, cpu_fps = with_cpu_needs(placed, specs, tensors, settings)
    plan.placements = placed
    if machine is None:
        return plan
    whole = whole_footprints(specs, tensors, settings)
    off, counted = host_needs(placed, fps, whole, cpu_fps, keys)
    if off:
        plan.host, plan.host_planned, plan.host_workers = machine, sum(off.values()), [p.name for p in counted]
        if plan.host_planned > machine.available:
            model = max(off, key=off.__getitem__)
            if cpu_fps:
                advice = cpu_suggestions(model, specs, settings, lambda **kw: fits(**kw)[0])
                raise PlanError(mixed_refusal(off, counted, cpu_fps, settings, machine, advice), plan)
            advice = suggest(model, specs, settings, fits, host_short=True)
            raise PlanError(offload_refusal(off, fps, whole, settings, machine, advice), plan)
    return plan


def _cpu_plan(specs, tensors, unknown, settings, keys, host: HostMemory | None) -> Plan:
    """Every worker on the CPU, checked against the machine's available memory (when it is known)."""

    def arrange(changed, share=False, profiles=None):
        fps = footprints_for(specs, tensors, changed, on_gpu=False, overrides=profiles)
        group = shared_keys(specs) if share and keys is None else keys
        return fps, _cpu_placements(specs, fps, changed, group)

    fps, placements = arrange(settings)
    total, per_model = cpu_need(placements, fps, shared=keys is not None)
    plan = Plan(fps, unknown, [], placements, shared_processes=keys is not None, host=host, host_planned=total)
    plan.host_workers = [p.name for p in placements if p.model in per_model] if host else []
    if host is None or total <= host.available:
        return plan

    def fits(profiles=None, share=False, **changes) -> bool:
        changed_fps, changed_placements = arrange(changed_settings(settings, **changes), share, profiles)
        need = cpu_need(changed_placements, changed_fps, shared=share or keys is not None)[0]
        return profiles_allowed(profiles, "cpu") and need <= host.available

    model = max(per_model, key=per_model.__getitem__)
    suggestions = cpu_suggestions(model, specs, settings, fits)
    raise PlanError(host_refusal(per_model, fps, settings, host, suggestions), plan)


def _cpu_placements(specs, fps, settings, keys) -> list[Placement]:
    if keys is None:
        return [Placement(m, s, "cpu", n) for m, s, n in _slots(specs, fps, settings)]
    slots = group_slots(specs, fps, settings.workers_for(specs[0].id), keys)
    return expand_groups([Placement(m, s, "cpu", n) for m, s, n in slots], specs, group_needs(specs, fps, keys))


def _arrange(specs, fps, settings, gpus, keys=None):
    """Placements and the failed slot (or an error text) for the device setting; with ``keys``
    (``--share-components``) slot ``i`` of every model is one process, placed as one."""
    slots = _slots(specs, fps, settings) if keys is None else group_slots(specs, fps, settings.workers_for(specs[0].id), keys)
    extras = {model: fp.load_extra for model, fp in fps.items()}
    if keys is not None:  # a process of several models loads them one after the other
        extras[group_name(specs)] = max(extras.values(), default=0)
    placed, failed = _arrange_slots(slots, settings, gpus, extras)
    if keys is not None:
        placed = expand_groups(placed, specs, group_needs(specs, fps, keys))
    return placed, failed


def _arrange_slots(slots, settings, gpus, extras):
    setting = settings.device.strip()
    if setting not in ("auto", "cuda"):
        return _check_explicit(slots, [d for d in setting.split(",") if d.strip()], gpus, extras)
    placed, failed = place(slots, gpus, spread=True, extras=extras)
    if failed is not None:
        packed, failed_packed = place(slots, gpus, spread=False, extras=extras)
        if failed_packed is None:
            return packed, None
    return placed, failed


def _fits(
    specs, tensors, settings, gpus, keys=None, profiles=None, share=False, machine=None, **changes
) -> tuple[bool, dict[str, Footprint]]:
    """Whether the plan fits with some settings changed (for the refusals' suggestions): on the GPUs, and the
    offloaded weights in ``machine``'s memory when it is checked."""
    if share and keys is None:
        keys = shared_keys(specs)
    changed = changed_settings(settings, **changes)
    fps = footprints_for(specs, tensors, changed, on_gpu=True, overrides=profiles)
    placed, failed = _arrange(specs, fps, changed, gpus, keys)
    if failed is None and machine is not None:
        placed, cpu_fps = with_cpu_needs(placed, specs, tensors, changed, profiles)
        need = host_needs(placed, fps, whole_footprints(specs, tensors, changed, profiles), cpu_fps, keys)[0]
        return sum(need.values()) <= machine.available, fps
    return failed is None, fps
