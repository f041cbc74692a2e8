"""Response shapes of the Images API: bodies, stream events and the one error envelope.

OpenAI's fields plus this server's extensions (``seed`` per image, ``stats``, the
``detail`` and ``request_id`` of the error envelope). The serving layer builds these
models; the routes only serialise them (``body()``), so each shape is written once.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from ..limits import QualityLevel


class ErrorObject(BaseModel):
    """OpenAI's ``error`` object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_envelope(
    message: str, *, type_: str, code: str | None = None, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """The body of every error response: OpenAI's ``error``, seed 002's ``detail`` (the same message) and the request id."""
    body: dict[str, Any] = {
        "error": ErrorObject(message=message, type=type_, param=param, code=code).model_dump(),
        "detail": message,
    }
    if request_id:
        body["request_id"] = request_id
    return body


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OutputTokensDetails(BaseModel):
    """The output's tokens: image tokens only (the models write no text)."""

    text_tokens: int = 0
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage: prompt text tokens and input images' latent patches in, output latent patches out."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ImageData(BaseModel):
    """One image of a response: ``b64_json`` or ``url``, the prompt it was made from (none for a variation made
    without one) and its seed."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int

    @model_serializer(mode="wrap")
    def _without_the_unset_one(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class Echo(BaseModel):
    """The settings actually used, as OpenAI echoes them."""

    output_format: str
    size: str
    quality: QualityLevel  # the level of the steps that ran (limits.quality_of)
    background: Literal["opaque"] = "opaque"
    safety_identifier: str | None = None  # the request's (or its ``user``), as OpenAI echoes it; left out when none

    #: Fields left out of the body when they are None.
    _left_out_when_none: ClassVar[tuple[str, ...]] = ("safety_identifier",)

    @model_serializer(mode="wrap")
    def _without_missing_echoes(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for key in self._left_out_when_none:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ImagesResponse(Echo):
    """The body of a generation, edit or variation; ``stats`` says what the run did and how long it took."""

    created: int
    data: list[ImageData]
    usage: Usage
    stats: dict[str, int | float]


class PartialImageEvent(Echo):
    """``<kind>.partial_image``: a preview of image ``image_index`` while it is denoised."""

    type: str
    b64_json: str
    partial_image_index: int
    created_at: int
    image_index: int
    seed: int


class CompletedEvent(Echo):
    """``<kind>.completed``: one finished image, with the whole request's ``stats``."""

    type: str
    b64_json: str
    created_at: int
    usage: Usage
    stats: dict[str, int | float]
    image_index: int
    seed: int
    revised_prompt: str | None = None  # left out when there is none (a variation made without a prompt)

    _left_out_when_none: ClassVar[tuple[str, ...]] = ("revised_prompt", "safety_identifier")


class ErrorEvent(BaseModel):
    """An error after the stream started: the last event. ``request_id`` as in the error envelope of an answer that
    is not a stream."""

    type: Literal["error"] = "error"
    error: ErrorObject
    request_id: str | None = None
