"""What a served model is: where its weights are, which pipeline it uses, what it can do.

Resolved in the API process before the port opens, from a folder's (or a hub
repository's) ``model_index.json``, so that a missing folder or an unknown
pipeline class is a clear error at start-up. One model at a time: the configured models
are resolved and checked together in ``configured.py``. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config_files import looks_like_path
from .profile import PROFILE_KEYS, SIDECAR_NAME, RunProfile

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
        if folder.exists() and not folder.is_dir():
            raise ModelConfigError(f"{source} is a file, not a model folder (a diffusers pipeline folder)")
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

        # the hub client's own handler also passed its lines (each retry, offline) on to the server's: each came twice
        logging.getLogger("huggingface_hub").handlers.clear()
        index_download = hf_hub_download(source, "model_index.json", revision=revision)
    except Exception as exc:  # offline, unknown repo, gated repo, unknown revision...
        at = f" at revision {revision}" if revision else ""
        unreachable = type(exc).__name__ == "LocalEntryNotFoundError" and not os.environ.get("HF_HUB_OFFLINE")
        offline = " (without a network, HF_HUB_OFFLINE=1 reads the hub cache at once)" if unreachable else ""
        raise ModelConfigError(
            f"cannot read model_index.json of hub model {source}{at}: {type(exc).__name__}: {exc}{offline}"
        ) from exc
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
        lora = " (LoRAs are given with --lora NAME=PATH@MODEL, not in this file)" if "loras" in unknown else ""
        raise ModelConfigError(f"{source}/{SIDECAR_NAME}: unknown keys {sorted(unknown)}{lora}")
    return ModelSpec(
        id=ident or default_model_id(source),
        source=str(Path(source).expanduser()) if looks_like_path(source) else source,
        pipeline_class=class_name,
        kind=PIPELINE_KINDS[class_name],
        options=dict(sidecar),
        revision=revision,
    )
