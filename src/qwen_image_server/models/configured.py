"""The served models as the settings configure them, resolved and checked together before the port opens.

``resolve_configured`` turns a ``Settings`` into ``ModelSpec``s (each read by ``spec.resolve_model``) with their run
profiles and LoRAs (``resolve_models``), and refuses what would fail later: ids that repeat, a ``VALUE@MODEL`` setting
or ``--lora`` naming a model that is not served (or an alias of one), a model's own defaults outside the limits
requests are held to, ``--model-alias`` names that clash, ``--share-components`` with models that cannot share a
process (``share_refusal``). No torch here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..config_scoped import SCOPED_BOOLEANS, SCOPED_NUMBERS
from ..limits import size_problem
from .lora_check import resolve_loras
from .profile import (
    SERVED_NAME,
    SERVED_NAME_RULE,
    SIDECAR_NAME,
    LoraSpec,
    ProfileError,
    build_profile,
    parse_lora,
    scoped_targets,
    scoped_value,
)
from .spec import ModelConfigError, ModelSpec, resolve_model

log = logging.getLogger(__name__)


def resolve_models(
    entries: list[tuple[str | None, str]],
    profile_flags: dict[str, list[str]] | None = None,
    loras: list[str] | tuple[str, ...] = (),
) -> list[ModelSpec]:
    """Resolve every configured model and its run profile; ids must be unique.

    ``profile_flags`` are the run-profile values of the command line and environment
    (``Settings.profile_flags()``); ``loras`` the ``NAME=PATH[@MODEL]`` values of ``--lora``.
    """
    if not entries:
        raise ModelConfigError("no model to serve: pass --model PATH_OR_HUB_ID (or --demo), or set MODEL_PATH")
    for ident, _ in entries:  # scoped values (N@MODEL) and routes could not name another
        if ident and not SERVED_NAME.fullmatch(ident):  # (an empty one is none: --model =PATH)
            raise ModelConfigError(f"model id {ident!r} (--model ID=PATH, or MODEL_NAME): a model id is {SERVED_NAME_RULE}")
    specs = [resolve_model(source, ident) for ident, source in entries]
    ids = [spec.id for spec in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ModelConfigError(f"model ids must be unique, repeated: {', '.join(duplicates)} (use ID=PATH)")
    flags = profile_flags or {}
    owners = _lora_owners(loras, specs)
    for key, values in flags.items():
        variable = f"QIS_MODEL_{key.upper()}" if key in SCOPED_BOOLEANS else f"QIS_{key.upper()}"
        _refuse_unserved(f"--{key.replace('_', '-')} (or {variable})", scoped_targets(values), ids, owners)
    try:
        parsed = resolve_loras([_lora_for(parse_lora(text), specs) for text in loras], specs)
        resolved = [replace(spec, profile=build_profile(spec.id, spec.options, flags, tuple(parsed))) for spec in specs]
        for spec in resolved:
            if spec.profile.attention_backend is not None:
                from .attention import validate_attention_backend  # imports diffusers: only when a backend is named

                validate_attention_backend(spec.profile.attention_backend, spec.id)
        return resolved
    except ProfileError as exc:
        raise ModelConfigError(str(exc)) from None


def _lora_owners(loras: Sequence[str], specs: list[ModelSpec]) -> dict[str, str]:
    """The model of each ``--lora`` that parses (the others are refused later, with their own message)."""
    owners = {}
    for text in loras:
        try:
            lora = _lora_for(parse_lora(text), specs)
        except (ProfileError, ModelConfigError):
            continue
        owners[lora.name] = str(lora.model)
    return owners


def _lora_for(lora: LoraSpec, specs: list[ModelSpec]) -> LoraSpec:
    """``lora`` with its base model resolved: the named one, else the first text-to-image model."""
    if lora.model is None:
        base = next((spec for spec in specs if spec.can_generate), specs[0])
        return replace(lora, model=base.id)
    if lora.model not in {spec.id for spec in specs}:
        raise ModelConfigError(f"--lora {lora.name}: base model {lora.model} is not served")
    return lora


def resolve_configured(settings) -> list[ModelSpec]:
    """The models a ``Settings`` asks for, with their run profiles.

    A compiled text-to-image model without ``compile_sizes`` warms its default size:
    the folder's, else the server's ``--default-size``.
    """
    _check_not_scoped_to_aliases(settings)
    specs = resolve_models(settings.model_entries(), settings.profile_flags(), settings.loras)
    _check_configured_defaults(specs, settings)
    _check_model_workers(specs, settings)
    for spec in specs:
        if spec.profile.compile_sizes and not spec.profile.compile:
            log.warning("%s: compile sizes are given but compile is off: nothing is compiled or warmed", spec.id)
    specs = _with_aliases(specs, settings)
    return [_with_warm_default(spec, settings.default_size) for spec in specs]


def _check_not_scoped_to_aliases(settings) -> None:
    """A setting scoped to another name of a model (``--cache fbcache@dall-e-3``) is refused with that reason: the
    names share one model, and so one run profile and one set of workers."""
    aliases = {alias for alias, _ in _alias_flags(settings)} | {ident for ident, _ in settings.repeated_sources()}
    scoped = {f"--{key.replace('_', '-')}": scoped_targets(values) for key, values in settings.profile_flags().items()}
    for setting in SCOPED_NUMBERS.values():  # --workers N@MODEL, --queue-size N@MODEL...
        scoped[setting.flag] = set(settings.own_values(setting.field))
    scoped["--lora"] = set()
    for text in settings.loras:
        with contextlib.suppress(ProfileError):  # a malformed one is refused later, with its own message
            scoped["--lora"].add(parse_lora(text).model or "")
    for flag, targets in scoped.items():
        if named := sorted(targets & aliases):
            raise ModelConfigError(
                f"{flag} names {', '.join(named)}, another name of a served model (--model-alias, or a source given "
                "twice): scope it to the model's own id"
            )


def _alias_flags(settings) -> list[tuple[str, str]]:
    """``--model-alias ALIAS=NAME`` values as ``(alias, name)``."""
    pairs = []
    for text in settings.model_aliases:
        alias, sep, name = text.partition("=")
        if not sep or not alias.strip() or not name.strip():
            raise ModelConfigError(f"--model-alias: expected ALIAS=MODEL, got {text!r}")
        pairs.append((alias.strip(), name.strip()))
    return pairs


def _with_aliases(specs: list[ModelSpec], settings) -> list[ModelSpec]:
    """The other names each model answers to: ``--model-alias ALIAS=NAME`` (NAME a model or LoRA id), and a source
    given again under an id of its own (``--model a=X --model b=X``: one model, served as ``a`` and as ``b``)."""
    by_source = {source: spec.id for (_, source), spec in zip(settings.model_entries(), specs, strict=True)}

    # each with how the user gave it, for the messages: a repeated source was no --model-alias of theirs
    def again(source: str) -> Callable[[str], str]:
        return lambda shown: f"--model {shown}={source} (the source of {by_source[source]} again)"

    repeated = [(ident, by_source[source], again(source)) for ident, source in settings.repeated_sources()]
    pairs = repeated + [(alias, name, lambda shown: f"--model-alias {shown}") for alias, name in _alias_flags(settings)]
    owner = {spec.id: spec.id for spec in specs} | {lora.name: spec.id for spec in specs for lora in spec.profile.loras}
    aliases: dict[str, str] = {}
    for alias, name, flag in pairs:
        given = flag(alias)
        if not SERVED_NAME.fullmatch(alias):
            rule = "a model id" if given.startswith("--model ") else "an alias"
            raise ModelConfigError(f"{flag(repr(alias))}: {rule} is {SERVED_NAME_RULE}")
        if name not in owner:
            raise ModelConfigError(f"{given}: {name} is not a served model or LoRA id (served: {', '.join(owner)})")
        if alias in owner:
            raise ModelConfigError(f"{given}: {alias} is a served model or LoRA id already")
        if aliases.setdefault(alias, name) != name:
            raise ModelConfigError(f"{given} names two models: {aliases[alias]} and {name}")
    return [replace(spec, aliases=tuple((a, n) for a, n in aliases.items() if owner[n] == spec.id)) for spec in specs]


def _refuse_unserved(flag: str, targets: set[str], ids: list[str], lora_owners: dict[str, str] | None = None) -> None:
    """A ``VALUE@MODEL`` flag (a profile setting or a per-model limit) naming models that are not served: refused; one
    naming a LoRA is told its model, items run together with a comma are told the separator."""
    unknown = sorted(targets - set(ids))
    if loras := [name for name in unknown if name in (lora_owners or {})]:
        model = lora_owners[loras[0]]  # type: ignore[index]
        raise ModelConfigError(
            f"{flag} names {loras[0]}, a LoRA of {model}: a LoRA runs on its model's workers with its model's settings; "
            f"scope it to {model}"
        )
    if unknown:
        message = f"{flag} names models that are not served: {', '.join(unknown)} (served: {', '.join(ids)})"
        if any("," in name or "@" in name for name in unknown):
            message += (
                "; several VALUE@MODEL items are separated by ';' in an environment variable (2@a;1@b), or given as the "
                "flag once each"
            )
        raise ModelConfigError(message)


def _check_model_workers(specs: list[ModelSpec], settings) -> None:
    """``--workers N@MODEL`` (and ``--queue-size``, ``--task-timeout``, ``--stuck-task-seconds``) must name served
    models; with ``--share-components`` every model has the same worker count."""
    ids = [spec.id for spec in specs]
    owners = {lora.name: spec.id for spec in specs for lora in spec.profile.loras}
    for setting in SCOPED_NUMBERS.values():
        named = f"{setting.flag} (or QIS_{setting.scoped_field.upper()})"  # from either: both are named
        _refuse_unserved(named, set(settings.own_values(setting.field)), ids, owners)
    refusal = share_refusal(specs, settings) if settings.share_components else None
    if refusal:
        raise ModelConfigError(refusal)


def share_refusal(specs: list[ModelSpec], settings) -> str | None:
    """Why ``--share-components`` cannot serve these models in shared processes, or None when it can: every model
    needs the same deterministic mode (a process's torch settings) and the same number of workers (slot i of every
    model is one process). The start checks refuse with it; the plan's advice offers the flag only when it is None."""
    modes = {spec.id: spec.profile.deterministic for spec in specs}
    if len(set(modes.values())) > 1:
        given = ", ".join(f"{ident} {'on' if on else 'off'}" for ident, on in modes.items())
        return (
            f"--share-components runs every model in one process, where deterministic mode is the process's (torch's "
            f"settings): every model needs the same --deterministic (here: {given})"
        )
    counts = {spec.id: settings.workers_for(spec.id) for spec in specs}
    if len(set(counts.values())) > 1:
        given = ", ".join(f"{ident} {count}" for ident, count in counts.items())
        return (
            f"--share-components runs worker slot i of every model in one process, so every model needs the same number "
            f"of workers (here: {given}); give one --workers N"
        )
    return None


def _sidecar_of(spec: ModelSpec) -> str:
    """Where a model's own options come from, as errors name it."""
    return spec.source if spec.is_random else f"{spec.source}/{SIDECAR_NAME}"


def _check_configured_defaults(specs: list[ModelSpec], settings) -> None:
    """A model's own ``default_size`` and ``default_steps``, its LoRAs' preset steps and its warmed ``compile_sizes``
    are held to the limits requests are held to, so that they are valid request values: refused at start rather than
    failing every request (or running longer than ``QIS_MAX_STEPS`` lets a request run)."""
    lo, hi = settings.min_image_side, settings.max_image_side
    for spec in specs:
        where = _sidecar_of(spec)
        if "default_size" in spec.options:
            problem = size_problem(spec.options["default_size"], lo, hi)
            if problem:
                raise ModelConfigError(f"{where}: default_size {problem} (the size of requests that give none)")
        if "default_steps" in spec.options:
            steps = spec.options["default_steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= settings.max_steps:
                raise ModelConfigError(
                    f"{where}: default_steps must be an integer from 2 to {settings.max_steps} (QIS_MAX_STEPS), as "
                    f"requests' num_inference_steps, got {steps!r}"
                )
        for key in ("edit_area", "condition_area"):  # pixels the edit pipelines resize inputs to
            value = spec.options.get(key)
            if key in spec.options and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelConfigError(f"{where}: {key} must be a positive integer (an area in pixels), got {value!r}")
        for lora in spec.profile.loras:  # this model's (build_profile keeps each model's own)
            steps = lora.preset.get("steps")
            if steps is not None and steps > settings.max_steps:
                raise ModelConfigError(
                    f"LoRA {lora.name}: its preset runs {steps} steps, more than QIS_MAX_STEPS={settings.max_steps} allows "
                    "a request (set steps=N in --lora, or raise QIS_MAX_STEPS)"
                )
        flagged = scoped_value(list(settings.compile_sizes), spec.id) is not None
        for size in spec.profile.compile_sizes:
            problem = size_problem(size, lo, hi)
            if problem:
                given = "--compile-sizes (QIS_COMPILE_SIZES)" if flagged else f"{where}: compile_sizes"
                raise ModelConfigError(f"{given} for model {spec.id}: {problem} (a warmed size must be a valid request size)")


def _with_warm_default(spec: ModelSpec, default_size: str) -> ModelSpec:
    profile = spec.profile
    if not profile.compile or profile.compile_sizes or not spec.can_generate:
        return spec
    size = str(spec.options.get("default_size", default_size)).lower().replace(" ", "")
    return replace(spec, profile=replace(profile, compile_sizes=(size,)))
