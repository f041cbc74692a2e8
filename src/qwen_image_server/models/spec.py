"""What a served model is: where its weights are, which pipeline it uses, what it can do.

Resolved in the API process before the port opens, from a folder's (or a hub
repository's) ``model_index.json``, so that a missing folder or an unknown
pipeline class is a clear error at start-up. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config_files import looks_like_path
from ..config_scoped import SCOPED_BOOLEANS, SCOPED_NUMBERS
from ..limits import size_problem
from .lora_check import resolve_loras
from .profile import (
    PROFILE_KEYS,
    SERVED_NAME,
    SERVED_NAME_RULE,
    SIDECAR_NAME,
    LoraSpec,
    ProfileError,
    RunProfile,
    build_profile,
    parse_lora,
    scoped_targets,
    scoped_value,
)

ModelKind = Literal["text-to-image", "edit", "edit-plus"]

#: Pipeline classes this server can serve, and what each does.
PIPELINE_KINDS: dict[str, ModelKind] = {
    "QwenImagePipeline": "text-to-image",
    "QwenImageEditPipeline": "edit",
    "QwenImageEditPlusPipeline": "edit-plus",
}

#: Optional per-model settings a folder may carry in this file (the tiny models do).
_SIDECAR_KEYS = {"edit_area", "condition_area", "default_size", "default_steps", *PROFILE_KEYS}


class ModelConfigError(ValueError):
    """A model given to the server cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model, as the workers need to load it and the API needs to route to it."""

    id: str
    source: str  # local folder or hub id, as given to ``from_pretrained``
    pipeline_class: str
    kind: ModelKind
    options: dict = field(default_factory=dict, hash=False, compare=False)
    revision: str | None = None  # hub branch, tag or commit (``ORG/NAME@REVISION``); None: main
    profile: RunProfile = field(default_factory=RunProfile, compare=False)  # how it runs (see ``profile.py``)
    #: Other names requests may give (``--model-alias``): ``(alias, name)``, name this model's id or one of its LoRA ids.
    aliases: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def is_hub(self) -> bool:
        """True when ``source`` is a hub id rather than a local folder."""
        return not self.is_random and not looks_like_path(self.source)

    @property
    def is_random(self) -> bool:
        """True for a ``random:ORG/NAME`` source: a packaged architecture with random weights (``random_source.py``)."""
        return self.source.startswith("random:")

    @property
    def can_generate(self) -> bool:
        return self.kind == "text-to-image"

    @property
    def can_edit(self) -> bool:
        return self.kind in ("edit", "edit-plus")

    @property
    def multi_image(self) -> bool:
        return self.kind == "edit-plus"


def _json_object(path: Path, shown: str) -> dict:
    """The JSON object in ``path`` (shown as ``shown`` in errors), or a ``ModelConfigError`` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelConfigError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except ValueError as exc:  # invalid JSON, or not UTF-8
        raise ModelConfigError(f"{shown} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{shown} must hold a JSON object, not {type(data).__name__} {json.dumps(data)[:60]}")
    return data


def split_revision(source: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` → ``("ORG/NAME", "REVISION")``; folders and plain hub ids keep no revision."""
    if looks_like_path(source):
        return source, None
    name, sep, revision = source.partition("@")
    if sep and not revision:
        raise ModelConfigError(f"{source}: empty revision after '@'")
    return name, (revision or None)


def _read_index(source: str, revision: str | None = None) -> tuple[dict, dict]:
    """Return ``(model_index, sidecar options)`` for a folder or hub id (at ``revision``)."""
    if looks_like_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelConfigError(f"model folder not found: {source}")
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise ModelConfigError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
        sidecar_file = folder / SIDECAR_NAME
        index = _json_object(index_file, str(index_file))
        missing = _missing_parts(folder, index)
        if missing:  # else the plan sized it from reference values, or a worker failed to load it once served
            raise ModelConfigError(f"{source} is incomplete: no {', '.join(missing)} (of what its model_index.json lists)")
        return index, _json_object(sidecar_file, str(sidecar_file)) if sidecar_file.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        index_download = hf_hub_download(source, "model_index.json", revision=revision)
    except Exception as exc:  # offline, unknown repo, gated repo, unknown revision...
        at = f" at revision {revision}" if revision else ""
        raise ModelConfigError(f"cannot read model_index.json of hub model {source}{at}: {type(exc).__name__}: {exc}") from exc
    sidecar = {}
    try:  # a hub repository may carry the sidecar too (optional)
        sidecar_download = hf_hub_download(source, SIDECAR_NAME, revision=revision)
    except Exception:
        pass
    else:
        sidecar = _json_object(Path(sidecar_download), f"{SIDECAR_NAME} of hub model {source}")
    return _json_object(Path(index_download), f"model_index.json of hub model {source}"), sidecar


#: The components whose folder must hold a config and weights (the others: tokenizer, scheduler, processor files).
_WEIGHTED = ("transformer", "text_encoder", "vae")


def _missing_parts(folder: Path, index: dict) -> list[str]:
    """What a pipeline folder lacks of the components its ``model_index.json`` lists: a component's folder, and for
    the weighted ones their ``config.json`` and weights (``*.safetensors``, or ``*.bin``)."""
    missing = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue  # "_class_name", "_diffusers_version"; an optional component left out ([null, null])
        part = folder / name
        if not part.is_dir():
            missing.append(f"{name}/")
        elif name in _WEIGHTED:
            missing += [f"{name}/config.json"] if not (part / "config.json").is_file() else []
            missing += _missing_weights(part, name)
    return missing


def _missing_weights(part: Path, name: str) -> list[str]:
    """A component's weights files that are not there (is_file: a snapshot's link to a missing blob is none): the
    shards its index lists, or any weights file at all."""
    indexes = sorted(part.glob("*.index.json"))
    if not indexes:
        weights = [path for pattern in ("*.safetensors", "*.bin") for path in part.glob(pattern) if path.is_file()]
        return [] if weights else [f"{name}/*.safetensors"]
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):  # malformed: the plan names it
        shards = sorted(set(json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"].values()))
        return [f"{name}/{shard}" for shard in shards if not (part / shard).is_file()][:3]
    return []


def default_model_id(source: str) -> str:
    """A model id from its path or hub id: the last component (``Qwen/Qwen-Image`` → ``Qwen-Image``)."""
    name = Path(source.rstrip("/")).name or source
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", name)


def resolve_model(source: str, ident: str | None = None) -> ModelSpec:
    """Check that ``source`` is a Qwen-Image pipeline this server serves and describe it.

    ``source`` is a folder, a hub id, a hub id at a revision (``ORG/NAME@REVISION``),
    or a random-weight architecture (``random:ORG/NAME[?KEY=VALUE&...]``, see ``random_source.py``).
    """
    if not source.strip():  # --model '' or --model ID=: said so, not "a folder named '' is not a pipeline"
        given = "" if ident is None else f"{ident}="
        raise ModelConfigError(f"--model {given!r} (or QIS_MODELS): the model source is empty (expected [ID=]PATH_OR_HUB_ID)")
    if source.startswith("random:"):
        from .random_source import resolve_random

        return resolve_random(source, ident)
    source, revision = split_revision(source)
    index, sidecar = _read_index(source, revision)
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_KINDS:
        known = ", ".join(PIPELINE_KINDS)
        raise ModelConfigError(f"{source}: pipeline class {class_name!r} is not served (known: {known})")
    unknown = set(sidecar) - _SIDECAR_KEYS
    if unknown:
        raise ModelConfigError(f"{source}/{SIDECAR_NAME}: unknown keys {sorted(unknown)}")
    return ModelSpec(
        id=ident or default_model_id(source),
        source=str(Path(source).expanduser()) if looks_like_path(source) else source,
        pipeline_class=class_name,
        kind=PIPELINE_KINDS[class_name],
        options=dict(sidecar),
        revision=revision,
    )


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
    pairs = [(ident, by_source[source]) for ident, source in settings.repeated_sources()] + _alias_flags(settings)
    owner = {spec.id: spec.id for spec in specs} | {lora.name: spec.id for spec in specs for lora in spec.profile.loras}
    aliases: dict[str, str] = {}
    for alias, name in pairs:
        if not SERVED_NAME.fullmatch(alias):
            raise ModelConfigError(f"--model-alias {alias!r}: an alias is {SERVED_NAME_RULE}")
        if name not in owner:
            raise ModelConfigError(f"--model-alias {alias}: {name} is not a served model or LoRA id (served: {', '.join(owner)})")
        if alias in owner:
            raise ModelConfigError(f"--model-alias {alias}: {alias} is a served model or LoRA id already")
        if aliases.setdefault(alias, name) != name:
            raise ModelConfigError(f"--model-alias {alias} names two models: {aliases[alias]} and {name}")
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
