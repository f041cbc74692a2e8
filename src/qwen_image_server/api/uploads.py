"""Reading bodies with images (edits, variations): multipart as the ``openai`` SDK sends it, or JSON with base64 images."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..errors import InvalidRequest, TooManyImages
from ..images import decode_base64_image, is_url
from ..protocol.images import FORM_CONTEXT
from ..serving.inputs import Upload
from .errors import NOT_AN_OBJECT, NOT_JSON, client_gone

_IMAGE_FIELD = re.compile(r"^images?(\[\d*\])?$")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413.

    A body with a Content-Length is judged by it. Any other (chunked, whatever the
    header's spelling) is read here first, up to the limit, and handed on whole, so
    that the 413 does not depend on who reads the body later.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # No Content-Length: a chunked body (however the header is spelled) is counted as it is read.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return await client_gone(scope["method"], scope["path"])(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        from .errors import error_response

        message = f"request body is larger than {self.max_bytes} bytes"
        response = error_response(413, message, type_="invalid_request_error", code="request_too_large")
        await response(scope, receive, send)


class TooManyFiles(TooManyImages):
    """More files in a multipart body than one edit takes (400)."""

    def __init__(self, max_files: int, param: str = "image", takes_mask: bool = True):
        images = f"{max_files} image{'s' if max_files != 1 else ''}"
        mask = "one mask or markup" if takes_mask else "no mask"
        super().__init__(f"too many files: at most {images} and {mask} per request", param=param)


@dataclass
class ImageUploads:
    """A request's files: its images in order, its mask and its markup (OpenAI's overlay that guides an edit)."""

    images: list[Upload]
    mask: Upload | None = None
    markup: Upload | None = None


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], fields: dict, form: bool) -> M:
    """``fields`` as ``model``; a form's text values are read as the numbers and booleans its fields take."""
    try:
        return model.model_validate(fields, context=FORM_CONTEXT if form else None)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(), body=fields) from None


async def read_image_request(
    request: Request,
    model: type[M],
    max_files: int,
    on_model: Callable[[object], None] = lambda named: None,
    takes_mask: bool = True,
) -> tuple[M, ImageUploads]:
    """The request's fields (validated as ``model``) and its files. ``on_model`` gets the model
    the body names (None for none) as soon as its fields are read, before anything in it is refused. ``takes_mask``:
    whether the endpoint takes one (for the message of too many files; a mask it does not take is refused after)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()  # case-insensitive (RFC 9110)
    form = media_type == "multipart/form-data"
    too_many = functools.partial(TooManyFiles, max_files, takes_mask=takes_mask)
    if form:
        # the parts a body may have: its images, a mask and a markup (an edit's; a variation's one more, to be refused)
        fields, files = await _read_multipart(request, max_files + (2 if takes_mask else 1), on_model, too_many)
    elif media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        fields, files = await _read_json(request, on_model, too_many)
    else:
        raise InvalidRequest("send the request as multipart/form-data (like the openai SDK) or as application/json")
    return _validate(model, fields, form), files


async def _read_multipart(request: Request, max_parts: int, on_model, too_many) -> tuple[dict, ImageUploads]:
    # Whether the body's closing delimiter came, watched as the parser reads it: Starlette's parser drops a part cut
    # short without a word, so a truncated upload would otherwise read as one without its image. (An epilogue may
    # follow the delimiter: RFC 2046.)
    boundary = _boundary(request.headers.get("content-type", ""))
    closing = b"--" + boundary + b"--" if boundary else b""
    seen = bytearray()
    closed = not closing
    upstream = request.receive

    async def receive():
        nonlocal closed
        message = await upstream()
        if message["type"] == "http.request" and not closed:
            seen.extend(message.get("body", b""))
            closed = closing in seen
            del seen[: -(len(closing) - 1)]  # what may hold the start of a delimiter the next chunk ends
        return message

    request = Request(request.scope, receive)
    try:
        # A text field may carry a base64 image (README): as large as the body, which BodySizeLimit (outside) caps at
        # QIS_MAX_UPLOAD_BYTES, not Starlette's 1 MiB for a field.
        form = await request.form(max_files=max_parts, max_fields=200, max_part_size=sys.maxsize)
    except (MultiPartException, HTTPException) as exc:  # Starlette turns the former into the latter inside an app
        message = str(getattr(exc, "message", None) or getattr(exc, "detail", ""))
        if message.startswith("Too many files"):
            raise too_many() from None
        if message.startswith("Too many fields"):
            raise InvalidRequest("too many form fields (at most 200)") from None
        raise InvalidRequest(f"malformed multipart body: {message}") from None
    on_model(form.get("model"))
    fields: dict[str, str] = {}
    files = ImageUploads([])
    try:
        if not closed:
            raise InvalidRequest("malformed multipart body: it ends before its closing boundary (the upload was cut short)")
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) and not value.filename and not value.size:
                continue  # what a browser sends for a file input left empty (no file, no name): no file
            if _IMAGE_FIELD.match(key):
                files.images.append(await _form_upload(value, key))
            elif key in ("mask", "markup"):
                if getattr(files, key) is not None:  # a second mask (or markup) part: refused, not one of them picked
                    raise too_many(param=key)
                setattr(files, key, await _form_upload(value, key))
            elif isinstance(value, str):
                fields[key] = value
            else:
                raise InvalidRequest(f"unexpected file in field '{key}'", param=key)
    finally:
        await form.close()
    if len(files.images) > 1:  # several files under one field's name: each named by its place, as a JSON list's are
        files.images = [replace(upload, param=f"{upload.param.partition('[')[0]}[{i}]") for i, upload in enumerate(files.images)]
    return fields, files


def _boundary(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a multipart Content-Type (quoted or not), as bytes."""
    found = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', content_type, re.IGNORECASE)
    return (found.group(1) or found.group(2)).encode("latin-1") if found else None


async def _form_upload(value: UploadFile | str, key: str) -> Upload:
    """An image form field: an uploaded file, or a base64 (or data URL) string, or an http(s) URL (fetched where the
    settings allow: ``serving/fetch.py``). A part without a filename is a text field: a client that sent the image's
    bytes so (httpx's and the SDK's ``(None, bytes)``) is told how to send a file."""
    if isinstance(value, UploadFile):
        return Upload(await value.read(), key)
    if is_url(value):
        return Upload(b"", key, url=value.strip())
    hint = f": it came as a text field (a part without a filename); send an image file with a filename (curl -F '{key}=@photo.png') or its base64"
    return Upload(decode_base64_image(value, key, hint), key)


def _json_image(value: object, param: str) -> Upload:
    if isinstance(value, dict):
        if "file_id" in value and not any(key in value for key in ("image_url", "url", "b64_json")):
            raise InvalidRequest(
                f"'{param}': file_id references (OpenAI's Files API) are not served here; send the image itself as a "
                'base64 string, a data URL or {"image_url": "data:..."}',
                param=param,
            )
        value = value.get("image_url") or value.get("url") or value.get("b64_json")
        if isinstance(value, dict):
            value = value.get("url")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a base64 string, a data URL or an http(s) URL", param=param)
    if is_url(value):
        return Upload(b"", param, url=value.strip())
    return Upload(decode_base64_image(value, param), param)


async def _read_json(request: Request, on_model, too_many) -> tuple[dict, ImageUploads]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep for the parser
        raise InvalidRequest(NOT_JSON) from None
    if not isinstance(body, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    on_model(body.get("model"))
    images: list[Upload] = []
    for key in ("image", "images"):
        value = body.pop(key, None)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        images += [_json_image(v, f"{key}[{i}]" if isinstance(value, list) else key) for i, v in enumerate(values)]
    files = ImageUploads(images)
    for key in ("mask", "markup"):
        value = body.pop(key, None)
        if isinstance(value, list):  # the forms ``image`` takes, a list included: of one mask (or markup)
            if len(value) > 1:
                raise too_many(param=key)
            value = value[0] if value else None
        setattr(files, key, _json_image(value, key) if value is not None else None)
    return body, files
