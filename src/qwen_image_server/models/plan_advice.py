"""The refusal of a plan that does not fit: one message with the numbers and the flags that would fit.

Each suggestion is checked by planning again with it (all models, all workers), so
only changes that make the whole plan fit are offered, each with what the model would
then need. No torch here.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ..limits import request_defaults
from .footprint import human as _gib

#: Profile changes tried, least intrusive first: (setting, value, flag).
_PROFILE_CHANGES = (
    ("vae_tiling", "on", "--vae-tiling"),
    ("weights_dtype", "fp8", "--weights-dtype"),
    ("quantize", "fp8", "--quantize"),
    ("quantize", "int4", "--quantize"),
    ("offload", "text-encoder", "--offload"),
    ("offload", "group", "--offload"),
    ("offload", "model", "--offload"),
    ("offload", "sequential", "--offload"),
)
#: Settings that fit only together, tried when no single change keeps the transformer on the GPU: the transformer
#: resident in 4 bits, the text encoder in FP8 streamed per prompt (16-24 GB cards), the VAE in tiles if need be.
_RECIPES = (
    {"quantize": "int4", "weights_dtype": "fp8", "offload": "text-encoder"},
    {"quantize": "int4", "weights_dtype": "fp8", "offload": "text-encoder", "vae_tiling": "on"},
)
#: The single changes above that keep the transformer resident (an offload of it streams it at every step).
_RESIDENT = {"vae_tiling", "weights_dtype", "quantize"}


def profiles_allowed(profiles, device: str) -> bool:
    """Whether every run profile of ``{model: profile}`` (a suggestion's change) passes the checks ``serve`` and
    ``plan`` make before loading (``check_profile``, ``check_mode`` on ``device``, or on each of a comma-separated
    list: a ``--device`` list with the CPU in it): a refusal suggests no flag that would itself be refused."""
    from .memory_modes import check_mode
    from .profile import ProfileError, check_profile

    try:
        for model, profile in (profiles or {}).items():
            check_profile(model, profile)
            for one in device.split(","):
                check_mode(model, profile.weights_dtype, profile.offload, profile.quantize, one.strip())
    except ProfileError:
        return False
    return True


def allowed_only(fits, device: str):
    """``fits`` (``(**changes)`` -> ``(fits, footprints)``) answering ``(False, {})`` for profiles that are refused."""
    return lambda **kw: fits(**kw) if profiles_allowed(kw.get("profiles"), device) else (False, {})


def needs(fp, device: str = "the GPU") -> str:
    """What one worker's figure is made of (weights by component, working memory, process, loading)."""
    parts = ", ".join(f"{name} {_gib(b)}" for name, b in fp.components.items())
    work = max(fp.activations, fp.text_encoder_work)
    loading = f"; {_gib(fp.load_extra)} more while it loads (converting to FP8 or 4 bits on {device})" if fp.load_extra else ""
    cache = f" ({_gib(fp.step_cache)} of it the step cache's state)" if fp.step_cache and work == fp.activations else ""
    return (
        f"{_gib(fp.weights)} of weights ({parts}) + {_gib(work)} working memory at {fp.image_side}x{fp.image_side}{cache}"
        f" + {_gib(fp.overhead)} for the process{loading}"
    )


def refusal(plan, failed, placed, specs, settings, fits) -> str:
    """The message for a plan whose slot ``failed`` (``(model, slot, need[, device])``) found no room.

    ``placed`` are the slots placed before it; ``fits(profiles=, workers=, max_side=, device=)``
    plans again with changes and returns ``(fits, footprints)``.
    """
    model, slot = failed[0], failed[1]
    device = failed[3] if len(failed) > 3 else None
    where = f" on {device}" if device else ""
    if model not in plan.footprints:  # a worker process that serves every model (--share-components)
        need = failed[2] or 0
        extra = max((one.load_extra for one in plan.footprints.values()), default=0)  # its models load one by one
        members = ", ".join(spec.id for spec in specs)
        loading = f"; {_gib(extra)} more while it loads" if extra else ""
        head = (
            f"not enough GPU memory for models {members} in one worker process (--share-components; worker "
            f"{slot + 1} of {settings.workers_for(specs[0].id)}){where}: each process needs {_gib(need)} (text encoders and VAEs "
            f"with the same files counted once){loading}"
        )
        fp = None
    else:
        fp = plan.footprints[model]
        need, extra = fp.total, fp.load_extra
        head = (
            f"not enough GPU memory for model {model} (worker {slot + 1} of {settings.workers_for(model)}){where}: "
            f"each worker needs {_gib(fp.total)} ({needs(fp)})"
        )

    def refused(p) -> bool:  # the refused worker's entries: its slot of the model, or of every model it serves
        return p.slot == slot and (fp is None or p.model == model)

    gpus, left = [], []
    for gpu in plan.gpus:
        here = [p for p in placed if p.device == gpu.device and not refused(p)]
        free = "? free" if gpu.free is None else f"{_gib(gpu.free)} free of {_gib(gpu.total or gpu.free)}"
        held = f", planned there: {', '.join(f'{p.name} {_gib(p.need or 0)}' for p in here)}" if here else ""
        gpus.append(f"{gpu.device} {gpu.name}: {free}{held}".replace("  ", " "))
        # the workers of one GPU load one at a time: a peak of theirs above this worker's own takes room as well
        peak = max((plan.footprints[p.model].load_extra for p in here if p.model in plan.footprints), default=0)
        left.append(max(0, (gpu.free or 0) - sum(p.need or 0 for p in here) - max(0, peak - extra)))
    suggestions = suggest(model, specs, settings, fits) if fp is not None else suggest_for_all(specs, settings, fits)
    lines = [head, "GPUs: " + "; ".join(gpus)]
    if suggestions:
        lines.append("Would fit: " + "; ".join(suggestions))
    else:
        lines.append("No single flag makes it fit.")
    if device:  # an explicit --device placed it where it does not fit: the lists with another GPU there that do
        entries = [entry.strip() for entry in settings.device.split(",") if entry.strip()]
        others = [gpu.device for gpu in plan.gpus if gpu.device != device]
        # one entry at a time (cuda:0,cuda:0 -> cuda:1,cuda:0), and every entry of it at once (cuda:1,cuda:1)
        spots = [i for i, entry in enumerate(entries) if entry == device]
        moved = [",".join(other if i == at else entry for i, entry in enumerate(entries)) for at in spots for other in others]
        moved += [",".join(other if entry == device else entry for entry in entries) for other in others]
        working = [f"--device {candidate}" for candidate in dict.fromkeys(moved) if fits(device=candidate)[0]]
        if working:
            lines.append(f"Or put it on another GPU here: {'; '.join(working)}.")
            return "\n".join(lines)
    what = f"serve {model} on another GPU" if fp is not None else "serve these models on another GPU"
    lines.append(
        f"Or {what} with at least {_gib(need + extra)} free (the most any GPU here has left beside what is planned on "
        f"it: {_gib(max(left, default=0))})."
    )
    return "\n".join(lines)


def suggest_for_all(specs, settings, fits) -> list[str]:
    """Flags that make a plan of shared worker processes fit: a profile setting for every model, the settings that
    keep the transformers resident together (when no single one does), fewer workers."""
    out: list[str] = []
    resident = False
    for key, value, flag in _PROFILE_CHANGES:
        everyone = {spec.id: replace(spec.profile, **{key: value}) for spec in specs}
        if all(getattr(spec.profile, key) == value for spec in specs):
            continue
        if fits(profiles=everyone)[0]:
            out.append(f"{flag} {value} (for every model)")
            resident = resident or _keeps_resident(key, value)
    if not resident:
        recipe = resident_recipe({spec.id: spec.profile for spec in specs}, lambda profiles: fits(profiles=profiles))
        if recipe is not None:
            out.append(f"{_recipe_flags(recipe[0])} (for every model; the transformers stay on the GPU)")
    fewer = fewer_workers(specs[0].id, settings, lambda **kw: fits(**kw)[0])
    return out + ([fewer] if fewer else [])


def _keeps_resident(key: str, value: str) -> bool:
    """Whether a single change of ``_PROFILE_CHANGES`` leaves the transformer on the GPU (its offloads do not)."""
    return key in _RESIDENT or (key == "offload" and value == "text-encoder")


def _recipe_flags(changes: dict, model: str | None = None) -> str:
    at = f"@{model}" if model else ""
    return " ".join(f"--{key.replace('_', '-')} {value}{at}" for key, value in changes.items())


def fewer_workers(model: str, settings, fits) -> str | None:
    """The largest smaller worker count that fits (``fits(**changes)`` -> bool): ``--workers N@MODEL`` for a model
    with a count of its own, else ``--workers N`` (every model without one)."""
    own = model in settings.own_workers()
    for count in range(settings.workers_for(model) - 1, 0, -1):
        if fits(model_workers=(model, count)) if own else fits(workers=count):
            return f"--workers {count}@{model}" if own else f"--workers {count}"
    return None


def suggest(model: str, specs, settings, fits, host_short: bool = False) -> list[str]:
    """Flags (as a user types them) that make the plan fit, each with what ``model`` would then need. ``host_short``:
    the plan is short of host memory for what its GPU workers offload (then the recipe that keeps the transformer on
    the GPU is offered to a model that offloads it on purpose too: that offload is what does not fit)."""
    by_id = {spec.id: spec for spec in specs}
    out: list[str] = []
    # the figures are GPU memory: short of host memory, the plan's refusal is about another (the flags fit both)
    gpu = " on its GPU" if host_short else ""

    def need(fps) -> str:
        return f" (it would need {_gib(fps[model].total)}{gpu})"

    resident = False  # a suggestion that keeps the model's transformer on the GPU
    for key, value, flag in _PROFILE_CHANGES:
        if getattr(by_id[model].profile, key) == value:
            continue
        keeps = _keeps_resident(key, value)
        ok, fps = fits(profiles={model: replace(by_id[model].profile, **{key: value})})
        if ok:
            out.append(f"{flag} {value}@{model}{need(fps)}")
            resident = resident or keeps
            continue
        everyone = {spec.id: replace(spec.profile, **{key: value}) for spec in specs}
        if len(specs) > 1:
            ok, fps = fits(profiles=everyone)
            if ok:
                out.append(f"{flag} {value} (for every model){need(fps)}")
                resident = resident or keeps
    if not resident:
        recipe = resident_recipe({model: by_id[model].profile}, lambda profiles: fits(profiles=profiles), host_short)
        if recipe is not None:
            changes, fps = recipe
            out.append(
                f"{_recipe_flags(changes, model)} (the transformer stays on the GPU; it would need {_gib(fps[model].total)}{gpu})"
            )
        elif len(specs) > 1:
            every = resident_recipe(
                {spec.id: spec.profile for spec in specs}, lambda profiles: fits(profiles=profiles), host_short
            )
            if every is not None:
                changes, fps = every
                out.append(
                    f"{_recipe_flags(changes)} (for every model; the transformers stay on the GPU; it would need "
                    f"{_gib(fps[model].total)}{gpu})"
                )
    lite = lighter_cache(by_id[model].profile.cache)
    if lite:
        ok, fps = fits(profiles={model: replace(by_id[model].profile, cache=lite)})
        if ok:
            out.append(f"--cache {lite}@{model}{need(fps)}")
    side = largest_side(settings, lambda s: fits(max_side=s)[0], specs)
    if side is not None:
        total = fits(max_side=side)[1][model].total
        out.append(f"QIS_MAX_IMAGE_SIDE={side} (images up to {side}x{side}; it would need {_gib(total)}{gpu})")
    fewer = fewer_workers(model, settings, lambda **kw: fits(**kw)[0])
    if fewer:
        out.append(fewer)
    # (short of host memory too: a shared text encoder or VAE that a process offloads is kept there once)
    shareable = len(specs) > 1 and not settings.share_components and can_share(specs, settings)
    if shareable and fits(share=True)[0]:
        out.append("--share-components (one worker process serves every model; identical text encoders and VAEs load once)")
    if settings.device.strip() not in ("auto", "cuda") and fits(device="auto")[0]:
        out.append("--device auto (places the workers by free memory)")
    if not out:  # two to four profile settings for every model, the quickest first (a 12 GB card: group offload and
        for changes in _combinations():  # VAE tiling serve every size; sequential offload alone needed smaller images)
            everyone = {spec.id: replace(spec.profile, **changes) for spec in specs}
            if any(spec.profile != everyone[spec.id] for spec in specs) and (found := fits(profiles=everyone))[0]:
                out.append(f"{_recipe_flags(changes)} (for every model){need(found[1])}")
                break
    if not out:  # a profile setting for every model and a smaller largest image
        for key, value, flag in _PROFILE_CHANGES:
            everyone = {spec.id: replace(spec.profile, **{key: value}) for spec in specs}
            side = largest_side(settings, lambda s, p=everyone: fits(profiles=p, max_side=s)[0], specs)
            if side is not None:
                total = fits(profiles=everyone, max_side=side)[1][model].total
                out.append(f"{flag} {value} (for every model) with QIS_MAX_IMAGE_SIDE={side} (it would need {_gib(total)}{gpu})")
                break
    return out


def _combinations() -> list[dict[str, str]]:
    """Two to four ``_PROFILE_CHANGES`` of different settings, the quickest first: ordered by their places in that
    list (later is slower), the latest first (group offload with VAE tiling, then with FP8 storage too, comes before
    any combination with sequential offload)."""
    chosen = [
        combo
        for size in (2, 3, 4)
        for combo in itertools.combinations(range(len(_PROFILE_CHANGES)), size)
        if len({_PROFILE_CHANGES[i][0] for i in combo}) == size
    ]
    chosen.sort(key=lambda combo: sorted(combo, reverse=True))
    return [{_PROFILE_CHANGES[i][0]: _PROFILE_CHANGES[i][1] for i in combo} for combo in chosen]


def resident_recipe(profiles: dict, fits, offloaded_too: bool = False):
    """The first of ``_RECIPES`` that ``fits({model: profile})`` (-> ``(fits, footprints)``) given to every model of
    ``profiles``, as ``(the settings it changes for some model, footprints)``; None when none fits, when it would change
    nothing, or when a model offloads its transformer on purpose (``group``, ``model``, ``sequential``) unless
    ``offloaded_too``."""
    if not offloaded_too and any(profile.offload not in ("none", "text-encoder") for profile in profiles.values()):
        return None
    for recipe in _RECIPES:
        changes = {key: value for key, value in recipe.items() if any(getattr(p, key) != value for p in profiles.values())}
        if not changes:
            continue
        ok, fps = fits({model: replace(profile, **recipe) for model, profile in profiles.items()})
        if ok:
            return changes, fps
    return None


def lighter_cache(cache: str | None) -> str | None:
    """The lite form of a full ``taylorseer`` step cache (the same knobs, ``lite=true``), whose state is a few
    megabytes where the full form's is gigabytes (``working_memory.step_cache_bytes``); None for any other policy."""
    from .step_cache import parse_policy

    policy = parse_policy(cache)
    if policy is None or policy.name != "taylorseer" or policy["lite"]:
        return None
    return replace(policy, knobs=tuple((key, True if key == "lite" else value) for key, value in policy.knobs)).canonical()


def largest_side(settings, ok, specs=()) -> int | None:
    """The largest allowed image side below the current one (a multiple of 16) that fits, by bisection; never below
    a side the settings or ``specs`` name (a configured default size, a size to compile), which a smaller largest
    side would refuse at start."""
    lo, hi = (
        max(16, settings.min_image_side // 16 * 16, -(-_named_side(settings, specs) // 16) * 16),
        (settings.max_image_side - 1) // 16 * 16,
    )
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = lo + ((hi - lo) // 16 + 1) // 2 * 16
        if ok(mid):
            lo = mid
        else:
            hi = mid - 16
    return lo


def _named_side(settings, specs) -> int:
    """The longest side of the sizes the settings and the models' profiles and options name: 0 for none. (A default
    size that is the one the side limits give by themselves is not counted: it follows a smaller largest side.)"""
    own = request_defaults(settings.min_image_side, settings.max_image_side, settings.max_steps, None, None)[0]
    sizes = [settings.default_size] if settings.default_size != own else []
    for spec in specs:
        sizes += [*spec.profile.compile_sizes, *([spec.options["default_size"]] if spec.options.get("default_size") else [])]
    return max((int(side) for size in sizes for side in str(size).lower().split("x") if side.isdigit()), default=0)


def can_share(specs, settings) -> bool:
    """Whether ``--share-components`` would be accepted for these models (``configured.share_refusal``)."""
    from .configured import share_refusal

    return share_refusal(specs, settings) is None


def changed_settings(settings, workers=None, model_workers=None, dtype=None, device=None, max_side=None):
    """``settings`` with what a suggestion changes: ``workers`` (every model without a count of its own),
    ``model_workers`` ``(model, count)``, ``dtype``, ``device``, ``max_side`` (the largest image side)."""
    update: dict = {k: v for k, v in (("workers", workers), ("dtype", dtype), ("device", device)) if v is not None}
    if model_workers is not None:
        update["model_workers"] = [*settings.model_workers, f"{model_workers[1]}@{model_workers[0]}"]  # the last one counts
    if max_side is not None:
        update.update(max_image_side=max_side, min_image_side=min(settings.min_image_side, max_side))
    return settings.model_copy(update=update)
