"""Request and response shapes of the Images API: OpenAI's fields plus the seeds' extensions.

Schemas only: what a value means is decided in ``serving/``.
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..limits import LORA_SCALE_LIMITS, TRUE_CFG_SCALE_LIMITS

ResponseFormat = Literal["b64_json", "url"]
OutputFormatName = Literal["png", "jpeg", "webp"]
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]

#: Seed 002's aspect-ratio shortcuts.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1140),
    "3:4": (1140, 1472),
}

# Fields of OpenAI's API that are accepted and have no effect on this server.
IGNORED_OPENAI_FIELDS = (
    "user", "style", "moderation", "input_fidelity", "safety_identifier", "complexity", "frame_count", "frame_duration_ms",
    "svg",
)  # fmt: skip


#: The validation context of a multipart form's fields (``api/uploads.py``): every value of a form is text, so text is
#: read as the number or boolean a field takes. A JSON body has numbers and booleans of its own: there ``"n": "2"``,
#: ``"stream": "true"`` or ``"guidance_scale": true`` is refused, as OpenAI's API refuses it, instead of being read as
#: 2, true and 1.0 (pydantic's lax mode would).
FORM_CONTEXT = {"form": True}

_JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "a number", float: "a number"}
#: For each field type whose JSON value is a number or a boolean: what it should be, and the JSON types refused for it.
_JSON_KINDS: dict[type, tuple[str, tuple[type, ...]]] = {
    int: ("a valid integer", (str, bool)),
    float: ("a valid number", (str, bool)),
    bool: ("a valid boolean", (str, int, float)),
}


def _json_kind(annotation: object) -> tuple[str, tuple[type, ...]] | None:
    """What a field of ``annotation`` (``int``, ``float | None``...) takes in JSON, when that is a number or a boolean."""
    types = {arg for arg in (typing.get_args(annotation) or (annotation,)) if arg is not type(None)}
    return _JSON_KINDS.get(types.pop()) if len(types) == 1 else None


@functools.cache
def _json_kinds(model: type[BaseModel]) -> dict[str, tuple[str, tuple[type, ...]] | None]:
    """``_json_kind`` of each field of a request model, worked out once per model rather than per value."""
    return {name: _json_kind(field.annotation) for name, field in model.model_fields.items()}


#: Schema keys that describe the field, not the values it takes: they stay outside ``anyOf``.
_FIELD_KEYS = ("title", "description", "default", "examples")


def _null_is_accepted(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The published schema says what validation does: every field with a default also takes null (as OpenAI's do)."""
    for name, prop in schema.get("properties", {}).items():
        field = model.model_fields.get(name)
        if field is None or field.is_required() or "anyOf" in prop:  # anyOf: already ``X | None``
            continue
        values = {key: value for key, value in prop.items() if key not in _FIELD_KEYS}
        schema["properties"][name] = {
            **{key: value for key, value in prop.items() if key in _FIELD_KEYS},
            "anyOf": [values, {"type": "null"}],
        }


class _CommonRequest(BaseModel):
    """Fields shared by generations, edits and variations.

    ``null`` in any field means what leaving the field out means (its default; for a required
    ``prompt``: missing), as in OpenAI's API, where every optional field is nullable. Numbers must be
    finite: NaN and Infinity (which Python's JSON reads) are refused, naming the field.
    """

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False, allow_inf_nan=False, json_schema_extra=_null_is_accepted)

    model: str | None = None
    prompt: str = ""
    n: int = Field(default=1, ge=1)
    size: str | None = None
    aspect_ratio: str | None = None
    # No lower bound here: the side limits are the server's (``serving/sizes.py``), with one message for every size.
    width: int | None = None
    height: int | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormatName = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Quality | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    # Qwen-Image's scheduler (shift_terminal) turns a single step into NaN sigmas: two is the minimum.
    num_inference_steps: int | None = Field(default=None, ge=2)
    true_cfg_scale: float | None = Field(default=None, ge=TRUE_CFG_SCALE_LIMITS[0], le=TRUE_CFG_SCALE_LIMITS[1])
    guidance_scale: float | None = Field(default=None, ge=TRUE_CFG_SCALE_LIMITS[0], le=TRUE_CFG_SCALE_LIMITS[1])
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # OpenAI's fields that change nothing here, checked as OpenAI checks them (``user``: its safety identifier's old name)
    user: str | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None
    prompt_rewrite: bool | None = None  # seed 002's prompt rewriting; default: the server's setting
    lora_scale: float | None = Field(
        default=None, ge=LORA_SCALE_LIMITS[0], le=LORA_SCALE_LIMITS[1]
    )  # a LoRA id's strength for this request
    cache: str | None = None  # step cache policy for this request ("none": off); default: the model's

    def effective_safety_identifier(self) -> str | None:
        """What OpenAI echoes as ``safety_identifier``: the request's, or its ``user`` (the old name) when that is
        missing or empty; None when neither is given."""
        declared = "safety_identifier" in type(self).model_fields  # elsewhere (variations) an unknown field's value
        return (getattr(self, "safety_identifier", None) if declared else None) or self.user or None

    def ignored_openai_fields(self) -> list[str]:
        """The OpenAI fields of this endpoint that were given and change nothing (another endpoint's are extras)."""
        return [name for name in IGNORED_OPENAI_FIELDS if name in type(self).model_fields and getattr(self, name) is not None]

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: object, info: ValidationInfo) -> object:
        """A number or boolean field given another JSON type in a JSON body: refused (see ``FORM_CONTEXT``)."""
        kind = _json_kinds(cls).get(info.field_name) if info.field_name else None
        if kind is not None and type(value) in kind[1] and not (info.context or {}).get("form"):  # type(): a bool is an int
            raise PydanticCustomError("json_type", f"Input should be {kind[0]}, got {_JSON_TYPE_NAMES[type(value)]}")
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, value: object) -> object:
        return "jpeg" if value == "jpg" else value  # lower case, as OpenAI's values are


class _ImageRequest(_CommonRequest):
    """Generations and edits: a prompt is required."""

    prompt: str = Field(min_length=1)
    # OpenAI's fields that change nothing here: its safety identifier and complexity, and the settings of its GIF and
    # SVG outputs (``frame_count``, ``frame_duration_ms``, ``svg``), which this server does not make (``output_format``
    # gif or svg is a 400)
    safety_identifier: str | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = Field(default=None, ge=2, le=16)
    frame_duration_ms: int | None = Field(default=None, ge=0)
    svg: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


class GenerationRequest(_ImageRequest):
    """``POST /v1/images/generations``."""


class EditRequest(_ImageRequest):
    """``POST /v1/images/edits`` (the images themselves are parsed separately)."""

    input_fidelity: Literal["high", "low"] | None = None


class VariationRequest(_CommonRequest):
    """``POST /v1/images/variations``: the text-to-image model's img2img form.

    ``prompt`` is optional here (none: the model varies the image freely) and
    ``strength`` (0-1, how far from the input to move) is an extension.
    """

    strength: float = Field(default=0.6, gt=0.0, le=1.0)
