"""Reading bodies with images (edits, variations): multipart as the ``openai`` SDK sends it, or JSON with base64 images."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ..errors import InvalidRequest, ServerError
from ..serving.images import decode_base64_image
from ..serving.service import Upload

_IMAGE_FIELD = re.compile(r"^images?(\[\d*\])?$")


class RequestTooLarge(ServerError):
    """The request body is larger than the server accepts (413)."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by Content-Length, or while they stream in)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        message = f"request body is larger than {limit} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                from .errors import error_response

                response = error_response(413, message, type_="invalid_request_error", code="request_too_large")
                return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(message)
            return msg

        return await self.app(scope, limited_receive, send)


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], fields: dict) -> M:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def read_image_request(request: Request, model: type[M], max_files: int) -> tuple[M, list[Upload], Upload | None]:
    """The request's fields (validated as ``model``), its images in order, and its mask."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        fields, images, mask = await _read_multipart(request, max_files)
    elif content_type.startswith("application/json"):
        fields, images, mask = await _read_json(request)
    else:
        raise InvalidRequest("send the request as multipart/form-data (like the openai SDK) or as application/json")
    return _validate(model, fields), images, mask


async def _read_multipart(request: Request, max_files: int) -> tuple[dict, list[Upload], Upload | None]:
    try:
        form = await request.form(max_files=max_files + 1, max_fields=200)
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from None
    fields: dict[str, str] = {}
    images: list[Upload] = []
    mask: Upload | None = None
    try:
        for key, value in form.multi_items():
            is_file = isinstance(value, UploadFile)
            if _IMAGE_FIELD.match(key):
                data = await value.read() if is_file else decode_base64_image(value, key)
                images.append(Upload(data, key))
            elif key == "mask":
                mask = Upload(await value.read() if is_file else decode_base64_image(value, key), key)
            elif not is_file:
                fields[key] = value
            else:
                raise InvalidRequest(f"unexpected file in field '{key}'", param=key)
    finally:
        await form.close()
    return fields, images, mask


def _json_image(value: object, param: str) -> Upload:
    if isinstance(value, dict):
        value = value.get("image_url") or value.get("url") or value.get("b64_json")
        if isinstance(value, dict):
            value = value.get("url")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a base64 string or data URL", param=param)
    return Upload(decode_base64_image(value, param), param)


async def _read_json(request: Request) -> tuple[dict, list[Upload], Upload | None]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("Validation error: the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Validation error: the request body must be a JSON object")
    images: list[Upload] = []
    for key in ("image", "images"):
        value = body.pop(key, None)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        images += [_json_image(v, f"{key}[{i}]" if isinstance(value, list) else key) for i, v in enumerate(values)]
    mask_value = body.pop("mask", None)
    mask = _json_image(mask_value, "mask") if mask_value is not None else None
    return body, images, mask
