"""How a model runs on its device: its *run profile*.

Everything that decides speed and memory for one served model lives here, in one
frozen, picklable value: compile and its warm set, the step cache, FP8, batched
CFG, the attention backend, weight storage, offload, VAE tiling, LoRAs and
deterministic mode. A profile is built
in the API process before anything loads, from (lowest to highest precedence)
defaults, the model folder's sidecar file and the command line / environment, and
travels to the workers on the model's ``ModelSpec``. Workers apply it; request
handlers only read it. No torch here.

Every profile flag may name the model it is for: ``--offload group@qwen-image``
applies to ``qwen-image`` only; ``--offload group`` to every model. A value for a
named model wins over one for all models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..config_scoped import SCOPED_PROFILE_FIELDS

#: Profile settings a model's sidecar file may set, with the same names and values as the flags.
PROFILE_KEYS = ("compile", *SCOPED_PROFILE_FIELDS, "deterministic")

QUANTIZE_MODES = ("none", "fp8", "int4")
CFG_BATCH_MODES = ("auto", "on", "off")
WEIGHTS_DTYPES = ("auto", "fp8")
OFFLOAD_MODES = ("none", "text-encoder", "group", "model", "sequential")
VAE_TILING_MODES = ("off", "on")


class ProfileError(ValueError):
    """A run profile setting is not valid; the message names the setting and the model."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA: a safetensors file (local, or from the hub) applied to a base model, served under its own id
    (see ``lora.py``)."""

    name: str
    path: str
    model: str | None = None  # the base model's id; None: the first text-to-image model
    scale: float = 1.0
    preset: dict = field(default_factory=dict, hash=False, compare=False)  # steps, true_cfg_scale, scheduler
    fuse: bool = False  # merged into the base weights at load instead of hot-swapped per request
    rank: int = 0  # read from the file at start-up
    revision: str | None = None  # a hub LoRA's branch, tag or commit; None: main
    hub: str | None = None  # the ``hf:ORG/NAME/FILE`` it was given as; ``path`` is then its file in the hub cache
    #: the transformer's layers it adapts (``transformer_blocks.0.attn.to_q``...), read from the file at start-up
    layers: tuple[str, ...] = field(default=(), hash=False, compare=False, repr=False)


@dataclass(frozen=True)
class RunProfile:
    """How one model is loaded and run. Defaults reproduce plain diffusers (eager, bf16, resident)."""

    compile: bool = False
    compile_sizes: tuple[str, ...] = ()  # WIDTHxHEIGHT warmed at start-up when compiling; () = the default size
    cache: str | None = None  # step cache policy, every knob spelled out (see ``step_cache.py``); None: off
    quantize: str = "none"  # "fp8": FP8 weights and matmuls for the transformer's linear layers; "int4": 4-bit weights
    cfg_batch: str = "off"  # "on"/"auto": cond + uncond as one batch of two ("auto": when memory allows)
    attention_backend: str | None = None  # diffusers' attention backend name; None: its default
    weights_dtype: str = "auto"  # "fp8": FP8 storage with compute in the run dtype (layerwise casting)
    offload: str = "none"  # none, text-encoder, group, model, sequential
    vae_tiling: str = "off"  # "on": the VAE decodes and encodes images in overlapping tiles (see vae_tiling.py)
    loras: tuple[LoraSpec, ...] = ()
    deterministic: bool = False  # torch's deterministic algorithms, no TF32, no cuDNN autotuning (see determinism.py)

    def summary(self) -> dict[str, Any]:
        """The profile as plain JSON values, for ``/v1/models`` and logs."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "loras":
                value = [
                    {"name": lora.name, "scale": lora.scale, "fuse": lora.fuse} | ({"preset": lora.preset} if lora.preset else {})
                    for lora in value
                ]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def parse_lora(text: str) -> LoraSpec:
    """``NAME=PATH[:KEY=VALUE,...][@MODEL]`` (``--lora``) → a ``LoraSpec``; the file is checked by ``lora_check``."""
    from .lora import parse_lora_flag

    return parse_lora_flag(text)


def parse_bool(value: Any) -> bool | None:
    """A flag or file value as a boolean (true/false, yes/no, on/off, 1/0); None when it is none of those."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return None


def _as_bool(value: Any, key: str, model: str) -> bool:
    parsed = parse_bool(value)
    if parsed is None:
        raise ProfileError(f"{key} for model {model}: expected on or off (or true, false, 1, 0), got {value!r}")
    return parsed


def _choice(value: Any, choices: tuple[str, ...], key: str, model: str) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ProfileError(f"{key} for model {model}: {value!r} is not one of {', '.join(choices)}")
    return text


def _sizes(value: Any, key: str, model: str) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for item in items:
        text = str(item).strip().lower().replace("×", "x")
        width, sep, height = text.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ProfileError(f"{key} for model {model}: {item!r} is not WIDTHxHEIGHT")
        out.append(f"{int(width)}x{int(height)}")
    return tuple(dict.fromkeys(out))


def _coerce(key: str, value: Any, model: str, name: str | None = None) -> Any:
    """A flag or sidecar value in the profile's own type, or a ``ProfileError`` naming the setting as ``name`` (the
    flag, ``--vae-tiling``, for a flag's value; the sidecar's key by default)."""
    name = name or key
    if key in ("compile", "deterministic"):
        return _as_bool(value, name, model)
    if key == "compile_sizes":
        return _sizes(value, name, model)
    if key == "quantize":
        return _choice(value, QUANTIZE_MODES, name, model)
    if key == "cfg_batch":  # on/off also as every other on/off setting takes them (true, 1, yes...), besides auto
        parsed = parse_bool(value)
        return _choice(value if parsed is None else ("on" if parsed else "off"), CFG_BATCH_MODES, name, model)
    if key == "weights_dtype":
        return _choice(value, WEIGHTS_DTYPES, name, model)
    if key == "offload":
        return _choice(value, OFFLOAD_MODES, name, model)
    if key == "vae_tiling":
        parsed = parse_bool(value)
        return _choice(value if parsed is None else ("on" if parsed else "off"), VAE_TILING_MODES, name, model)
    if key == "cache":
        from .step_cache import CachePolicyError, canonical_policy

        try:
            return canonical_policy(value)
        except CachePolicyError as exc:
            raise ProfileError(f"{name} for model {model}: {exc}") from None
    if key == "attention_backend":
        text = str(value).strip()
        return None if text.lower() in ("", "none", "off") else text
    raise ProfileError(f"unknown profile setting {key!r}")


#: A name a user gives to what a request may name (an alias, a LoRA id): the characters of model ids and hub names;
#: no '@' (scopes settings), ';', ',' or '=' (separate values), no spaces.
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
SERVED_NAME_RULE = "letters, digits and . _ : / + - (at most 128, no '@', ';', ',' or '=')"


#: The model folder's file of server settings (``spec.py`` reads it; errors name it).
SIDECAR_NAME = "qwen_image_server.json"


def split_scoped(value: str) -> tuple[str, str | None]:
    """``VALUE@MODEL`` → ``("VALUE", "MODEL")``; a plain value applies to every model. ``MODEL`` may be an id with a
    '/' (``Qwen/Qwen-Image``). (A LoRA's path has its own rule: ``lora.parse_lora_flag``.)"""
    head, sep, model = value.rpartition("@")
    if sep and head and model:
        return head, model
    return value, None


def scoped_value(values: list[str], model: str) -> str | None:
    """The value of a repeatable flag for ``model``: the last one naming it, else the last unscoped one."""
    named = unscoped = None
    for raw in values:
        value, target = split_scoped(raw)
        if target is None:
            unscoped = value
        elif target == model:
            named = value
    return named if named is not None else unscoped


def scoped_targets(values: list[str]) -> set[str]:
    """The model ids a repeatable flag's values name (to refuse ids that are not served)."""
    return {target for raw in values if (target := split_scoped(raw)[1]) is not None}


def build_profile(model: str, sidecar: dict, flags: dict[str, list[str]], loras: tuple[LoraSpec, ...] = ()) -> RunProfile:
    """The run profile of ``model``: defaults, then its sidecar's profile keys, then the flags.

    ``flags`` maps each profile key to the raw values given on the command line or in
    the environment (each possibly ``VALUE@MODEL``).
    """
    values: dict[str, Any] = {}
    for key in PROFILE_KEYS:
        raw = scoped_value(flags.get(key) or [], model)
        if raw is not None:  # a flag's value replaces the folder's, which then is not read (a bad one included)
            values[key] = _coerce(key, raw, model, "--" + key.replace("_", "-"))
        elif key in sidecar:
            try:
                values[key] = _coerce(key, sidecar[key], model)
            except ProfileError as exc:
                raise ProfileError(f"{exc} (from the model folder's {SIDECAR_NAME}; a flag for it replaces it)") from None
    profile = replace(RunProfile(), **values, loras=tuple(lora for lora in loras if lora.model == model))
    check_profile(model, profile)
    return profile


def check_profile(model: str, profile: RunProfile) -> None:
    """Refuse profiles whose settings cannot run together (``check_compile``; fused LoRAs on FP8-stored weights)."""
    check_compile(model, profile)
    if profile.deterministic and profile.cfg_batch == "auto":
        raise ProfileError(
            f"model {model}: cfg_batch=auto does not combine with deterministic (it batches a request's passes or not "
            "by the memory free when it starts, and batched and unbatched passes round differently: the same seed "
            "could give other pixels); use cfg_batch=on or cfg_batch=off"
        )
    fused = [lora.name for lora in profile.loras if lora.fuse]
    if fused and transformer_fp8_stored(profile):
        raise ProfileError(
            f"model {model}: LoRA {', '.join(fused)} with fuse=true does not combine with weights_dtype=fp8 (the merge "
            "would run on the FP8-stored weights); serve it without fuse (hot-swapped), or use quantize=fp8, which "
            "merges the LoRA before quantizing"
        )


def fp8_stored(profile, component: str) -> bool:
    """Whether ``weights_dtype=fp8`` stores ``component`` (a profile's or a ``MemoryMode``'s) in FP8: the text encoder,
    and the transformer but under ``quantize=int4``, whose 4-bit layers it would not touch; never the VAE (small and
    precision-critical)."""
    if profile.weights_dtype != "fp8":
        return False
    return component == "text_encoder" or (component == "transformer" and profile.quantize != "int4")


def transformer_fp8_stored(profile: RunProfile) -> bool:
    """Whether ``weights_dtype=fp8`` stores the transformer in FP8 (``fp8_stored``)."""
    return fp8_stored(profile, "transformer")


def check_compile(model: str, profile: RunProfile) -> None:
    """Refuse settings that cannot run inside compiled blocks (``compile``), naming the model and the settings.

    Compiled blocks are one graph each (``compile.py``); hooks around a block are fine
    (group and model offload, fbcache), hooks on the layers inside one are not.
    """
    if not profile.compile:
        return
    if transformer_fp8_stored(profile):
        raise ProfileError(
            f"model {model}: compile does not combine with weights_dtype=fp8 (its casting hooks on every linear layer "
            "would run inside the compiled blocks); use quantize=fp8 (FP8 weights and matmuls) with compile"
        )
    if profile.offload == "sequential":
        raise ProfileError(
            f"model {model}: compile does not combine with offload=sequential (accelerate's hooks on every layer would "
            "run inside the compiled blocks); use offload=group or offload=model with compile"
        )
    from .step_cache import compile_conflict, parse_policy

    reason = compile_conflict(parse_policy(profile.cache))
    if reason:
        raise ProfileError(f"cache for model {model}: {reason}")
