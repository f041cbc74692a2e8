"""LoRAs in the API process: the ``--lora`` flag, presets, and the checks made before the port opens.

``--lora NAME=PATH[:KEY=VALUE,...][@MODEL]`` serves the LoRA file ``PATH`` on the base
model ``MODEL`` (default: the first text-to-image model), under its own model id ``NAME``.
``PATH`` is a local file, or ``hf:ORG/NAME/FILE.safetensors`` for a file of a hub repository
(fetched into the hub cache at start-up, or read from it offline; ``lora_check.fetch_lora``).
Options (each also in the environment's ``QIS_LORAS``, entries separated by ``;``):

- ``fuse=true``: merge the LoRA into the base weights at load; the base id then serves it
  and ``NAME`` is an alias. Default: hot-swapped per request (see ``lora_runtime.py``).
- ``scale=S``: the LoRA's strength (default 1.0).
- ``revision=REV``: a hub LoRA's branch, tag or commit (default: main).
- ``preset=lightning`` (or ``none``), ``steps=N``, ``true_cfg_scale=X`` and scheduler fields
  (``base_shift=...``, ``shift_terminal=none``...): the defaults of requests for this LoRA.

A JSON file next to the LoRA (``PATH`` with the suffix ``.json``) may hold the same
preset knobs: ``{"preset": "lightning", "steps": 4, "true_cfg_scale": 1.0, "scheduler": {...}}``.
Precedence, lowest first: the named built-in preset, the JSON file, the flag.

No torch here: the file is checked by reading its safetensors header.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

from ..limits import LORA_SCALE_LIMITS, TRUE_CFG_SCALE_LIMITS
from .profile import SERVED_NAME, SERVED_NAME_RULE, LoraSpec, ProfileError, parse_bool

#: Built-in presets. ``lightning``: as Qwen-Image-Lightning publishes it (8 steps; set ``steps=4``
#: for the 4-step LoRAs), no true CFG, exponential time shift with base_shift = max_shift = ln 3.
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "lightning": {
        "steps": 8,
        "true_cfg_scale": 1.0,
        "scheduler": {
            "base_shift": math.log(3),
            "max_shift": math.log(3),
            "shift": 1.0,
            "shift_terminal": None,
            "time_shift_type": "exponential",
            "use_dynamic_shifting": True,
        },
    },
}

#: FlowMatchEulerDiscreteScheduler fields a preset may set, with their types.
SCHEDULER_FIELDS: dict[str, type] = {
    "shift": float,
    "base_shift": float,
    "max_shift": float,
    "shift_terminal": float,  # or None
    "base_image_seq_len": int,
    "max_image_seq_len": int,
    "time_shift_type": str,
    "use_dynamic_shifting": bool,
    "invert_sigmas": bool,
    "stochastic_sampling": bool,
    "use_karras_sigmas": bool,
    "use_exponential_sigmas": bool,
    "use_beta_sigmas": bool,
}
_TIME_SHIFT_TYPES = ("exponential", "linear")
#: Scheduler fields with bounds (exclusive), and how a refusal says them.
_BOUNDS: dict[str, tuple[float, float, str]] = {
    "shift": (0.0, math.inf, "above 0"),
    "shift_terminal": (0.0, 1.0, "between 0 and 1 (both excluded), or none"),
    "base_image_seq_len": (0, math.inf, "at least 1"),
    "max_image_seq_len": (0, math.inf, "at least 1"),
}
_FLAG_ONLY = ("fuse", "scale", "revision")
#: How a LoRA file of a hub repository is named: ``hf:ORG/NAME/PATH/IN/REPO.safetensors``.
HUB_PREFIX = "hf:"
_PRESET_KEYS = ("preset", "steps", "true_cfg_scale")
_OPTION = re.compile(r"^[A-Za-z_]+=[^,]*(,[A-Za-z_]+=[^,]*)*$")


class LoraError(ProfileError):
    """A LoRA cannot be served; the message names the LoRA and the file."""


# --- the flag and the preset ------------------------------------------------------------------
def _split_options(value: str) -> tuple[str, str | None]:
    """``PATH:KEY=VALUE,...`` → ``("PATH", "KEY=VALUE,...")``; ``(value, None)`` when no options follow a ':'."""
    head, colon, tail = value.rpartition(":")
    return (head, tail) if colon and head and _OPTION.match(tail) else (value, None)


def parse_lora_flag(text: str) -> LoraSpec:
    """``NAME=PATH[:KEY=VALUE,...][@MODEL]`` → a ``LoraSpec`` whose ``preset`` holds the flag's preset knobs."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ProfileError(f"--lora {text!r}: expected NAME=PATH, NAME=PATH@MODEL or NAME=PATH:KEY=VALUE,...@MODEL")
    name, rest = name.strip(), rest.strip()
    if not SERVED_NAME.fullmatch(name):  # requests name it; QIS_LORAS separates entries with ';', '@' scopes
        raise ProfileError(f"--lora {name!r}: a LoRA's name is {SERVED_NAME_RULE}")
    # The last '@' scopes the LoRA, unless it is part of the path: of the file's name (v@1.safetensors), or of a
    # folder's (/loras/style@v2/x.bin: a '/' after it), save right after a .safetensors file and its options
    # (x.safetensors@Qwen/Qwen-Image: a model id with a '/').
    head, at, tail = rest.rpartition("@")
    scoped = at and head and tail and ".safetensors" not in tail.lower()
    if scoped and "/" in tail:
        scoped = _split_options(head)[0].lower().endswith(".safetensors") and not Path(rest).expanduser().is_file()
    value, model = (head, tail) if scoped else (rest, None)
    path, options = value, {}
    head, listed = _split_options(value)
    # a ':' in the file's own path (an existing file) is not where options begin
    if listed is not None and not Path(value).expanduser().is_file():
        path = head
        options = {key.lower(): raw for key, raw in (item.split("=", 1) for item in listed.split(","))}
    scale, fuse = 1.0, False
    if "scale" in options:
        scale = _number(options.pop("scale"), float, name, "scale")
        _in_request_range(scale, LORA_SCALE_LIMITS, "lora_scale", name, "scale", "--lora")
    if "fuse" in options:
        fuse = _flag_bool(options.pop("fuse"), name, "fuse")
    revision = options.pop("revision", None)
    if revision is not None and (not path.startswith(HUB_PREFIX) or not revision.strip()):
        raise ProfileError(f"--lora {name}: revision= needs a value and a hub LoRA (hf:ORG/NAME/FILE.safetensors)")
    knobs: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    for key, raw in options.items():
        if key in _PRESET_KEYS:
            knobs[key] = raw
        elif key in SCHEDULER_FIELDS:
            scheduler[key] = raw
        else:
            known = ", ".join((*_FLAG_ONLY, *_PRESET_KEYS, *SCHEDULER_FIELDS))
            raise ProfileError(f"--lora {name}: unknown option {key!r} (known: {known})")
    if scheduler:
        knobs["scheduler"] = scheduler
    preset = _check_preset(knobs, name, "--lora")
    return LoraSpec(name=name, path=path, model=model, scale=scale, fuse=fuse, preset=preset, revision=revision)


def merge_preset(name: str, flag: dict, file: dict) -> dict:
    """The LoRA's final preset: the named built-in one, then the JSON file's knobs, then the flag's."""
    chosen = flag.get("preset", file.get("preset"))
    if chosen not in (None, "none") and chosen not in BUILTIN_PRESETS:
        raise LoraError(f"LoRA {name}: unknown preset {chosen!r} (built in: {', '.join(BUILTIN_PRESETS)}, or none)")
    base = BUILTIN_PRESETS.get(chosen or "none", {})
    out: dict[str, Any] = {"name": chosen} if chosen not in (None, "none") else {}
    scheduler: dict[str, Any] = {}
    for layer in (base, file, flag):
        for key in ("steps", "true_cfg_scale"):
            if key in layer:
                out[key] = layer[key]
        scheduler.update(layer.get("scheduler", {}))
    if scheduler:
        _check_scheduler(name, scheduler)
        out["scheduler"] = scheduler
    return out


#: The scheduler's ways of spacing its sigmas: one at most (diffusers raises at the first call otherwise).
_SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _check_scheduler(name: str, scheduler: dict[str, Any]) -> None:
    """What the scheduler would refuse at a request's call (a 500 for every request of the LoRA), refused at start."""
    spacings = [key for key in _SIGMA_SPACINGS if scheduler.get(key)]
    if len(spacings) > 1:
        raise LoraError(f"LoRA {name}: only one of {', '.join(_SIGMA_SPACINGS)} may be true, got {', '.join(spacings)}")
    if scheduler.get("use_beta_sigmas") and importlib.util.find_spec("scipy") is None:
        raise LoraError(f"LoRA {name}: use_beta_sigmas needs scipy, which is not installed (pip install scipy)")


def read_preset_file(lora: LoraSpec) -> dict:
    """The preset knobs of the JSON file next to the LoRA (``PATH`` with ``.json``), or ``{}``."""
    sidecar = Path(lora.path).expanduser().with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraError(f"LoRA {lora.name}: cannot read its preset file {sidecar}: {exc}") from None
    if not isinstance(data, dict):
        raise LoraError(f"LoRA {lora.name}: its preset file {sidecar} must hold a JSON object")
    return _check_preset(data, lora.name, str(sidecar))


def _check_preset(data: dict, name: str, where: str) -> dict:
    """Preset knobs in their own types, or a ``LoraError`` naming the LoRA, the place and the knob."""
    unknown = sorted(set(data) - {*_PRESET_KEYS, "scheduler"})
    if unknown:
        known = ", ".join((*_PRESET_KEYS, "scheduler"))
        raise LoraError(f"LoRA {name} ({where}): unknown preset keys {unknown} (known: {known})")
    out: dict[str, Any] = {}
    if "preset" in data:
        out["preset"] = str(data["preset"]).strip().lower()
    if "steps" in data:
        out["steps"] = _number(data["steps"], int, name, "steps", where)
        if out["steps"] < 2:  # as a request's num_inference_steps: one step gives the scheduler NaN sigmas (a black image)
            raise LoraError(f"LoRA {name} ({where}): steps must be at least 2, as a request's num_inference_steps")
    if "true_cfg_scale" in data:
        out["true_cfg_scale"] = _number(data["true_cfg_scale"], float, name, "true_cfg_scale", where)
        _in_request_range(out["true_cfg_scale"], TRUE_CFG_SCALE_LIMITS, "true_cfg_scale", name, "true_cfg_scale", where)
    scheduler = data.get("scheduler", {})
    if not isinstance(scheduler, dict):
        raise LoraError(f"LoRA {name} ({where}): scheduler must be an object of scheduler fields")
    checked = {}
    for key, value in scheduler.items():
        if key not in SCHEDULER_FIELDS:
            raise LoraError(f"LoRA {name} ({where}): unknown scheduler field {key!r} (known: {', '.join(SCHEDULER_FIELDS)})")
        checked[key] = _scheduler_value(key, value, name, where)
    if checked:
        out["scheduler"] = checked
    return out


def _in_request_range(value: float, limits: tuple[float, float], field: str, name: str, key: str, where: str) -> None:
    """A LoRA's configured ``key`` is refused outside what a request's ``field`` accepts (it is that field's default)."""
    low, high = limits
    if not low <= value <= high:
        raise LoraError(f"LoRA {name} ({where}): {key} must be between {low} and {high}, as a request's {field}, got {value:g}")


def _scheduler_value(key: str, value: Any, name: str, where: str) -> Any:
    kind = SCHEDULER_FIELDS[key]
    if key == "shift_terminal" and (value is None or str(value).strip().lower() in ("none", "null", "")):
        return None
    if key in _BOUNDS:  # outside them the scheduler's sigmas are NaN or infinite: a black image, or a division by 0
        number, (low, high, says) = _number(value, kind, name, key, where), _BOUNDS[key]
        if not low < number < high:
            raise LoraError(f"LoRA {name} ({where}): {key} must be {says}, got {number:g}")
        return number
    if kind is bool:
        return _flag_bool(value, name, key, where)
    if kind is str:
        text = str(value).strip().lower()
        if key == "time_shift_type" and text not in _TIME_SHIFT_TYPES:
            raise LoraError(
                f"LoRA {name} ({where}): time_shift_type must be one of {', '.join(_TIME_SHIFT_TYPES)}, got {value!r}"
            )
        return text
    return _number(value, kind, name, key, where)


def _number(value: Any, kind: type, name: str, key: str, where: str = "--lora"):
    """``value`` as an int or a finite float; an integer knob takes whole numbers only (4.7 steps was cut to 4)."""
    number: Any = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            number = float(value) if kind is float else _whole(value)
    if number is None or (kind is float and not math.isfinite(number)):
        kind_name = "n integer" if kind is int else " number"
        raise LoraError(f"LoRA {name} ({where}): {key} must be a{kind_name}, got {value!r}")
    return number


def _whole(value: Any) -> int | None:
    """An int from an int, a whole float (4.0) or a string of digits; None for anything else (4.7, "4.5")."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return int(value)


def _flag_bool(value: Any, name: str, key: str, where: str = "--lora") -> bool:
    parsed = parse_bool(value)
    if parsed is None:
        raise LoraError(f"LoRA {name} ({where}): {key} must be true or false, got {value!r}")
    return parsed


def preset_for(profile, lora_name: str | None) -> dict:
    """The preset a request runs with: its LoRA's, else (base id) the preset of a fused LoRA, else ``{}``."""
    for lora in profile.loras:
        if lora.name == lora_name:
            return lora.preset
    return next((lora.preset for lora in profile.loras if lora.fuse and lora.preset), {})


def lora_card(lora: LoraSpec, base) -> dict:
    """What ``/v1/models`` says of a LoRA id besides OpenAI's fields."""
    return {
        "kind": base.kind,
        "base_model": base.id,
        "parent": base.id,
        "lora": {
            "scale": lora.scale,
            "mode": "fused" if lora.fuse else "hot-swap",
            **({"hub": lora.hub, "revision": lora.revision or "main"} if lora.hub else {}),
        },
        "preset": lora.preset,
    }
