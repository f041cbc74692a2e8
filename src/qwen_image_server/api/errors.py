"""Every error becomes OpenAI's envelope, plus a top-level ``detail`` for seed 002's clients.

Registered once in the app factory; routes never catch errors themselves.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..errors import ServerError
from ..protocol.responses import ErrorObject, error_envelope

log = logging.getLogger(__name__)


def error_object(exc: ServerError) -> ErrorObject:
    """OpenAI's ``error`` object for a typed error."""
    return ErrorObject(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)


def _with_head(allow: str) -> str:
    """A 405's ``Allow`` with HEAD where GET is allowed: ``HeadRequests`` answers HEAD on every GET route, outside
    the router that lists the methods."""
    methods = [method.strip() for method in allow.split(",") if method.strip()]
    if "GET" in methods and "HEAD" not in methods:
        methods.insert(methods.index("GET") + 1, "HEAD")
    return ", ".join(methods)


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    body = error_envelope(message, type_=type_, code=code, param=param, request_id=current_request_id(request_id))
    return JSONResponse(body, status_code=status, headers=headers)


def current_request_id(fallback: str | None = None) -> str | None:
    """The id of the request being answered (``RequestIds``), else ``fallback``."""
    from .security import request_id_var

    current = request_id_var.get()
    return fallback if current == "-" else current


NOT_JSON = "Validation error: the request body is not valid JSON"
NOT_AN_OBJECT = "Validation error: the request body must be a JSON object"  # (generations here, edits in uploads.py)
#: pydantic's error types for a value that is not an object where a model (or a dict) is expected.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Validation error", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return NOT_JSON, None
    if param is None and first.get("type") in _NOT_AN_OBJECT:  # the body as a whole is not an object
        if isinstance(first.get("input"), (bytes, bytearray)):  # not read as JSON: its Content-Type is not JSON's
            return f"{NOT_AN_OBJECT}, sent with Content-Type: application/json", None
        return NOT_AN_OBJECT, None
    if first.get("type") == "missing":
        if param is None:  # the whole body is missing
            return "Validation error: the request has no body; send a JSON object", None
        return f"Validation error: '{param}' is required", param
    return f"Validation error: {param}: {msg}" if param else f"Validation error: {msg}", param


#: The image routes, and whether their default model is the edit model (a request that names none runs on it).
_IMAGE_ROUTES = {"/v1/images/generations": False, "/v1/images/edits": True, "/v1/images/variations": False}


def note_model(request: Request, named: object, edit: bool, images: int = 1) -> None:
    """``request.state.model``, the model an image request is counted under (the metrics): the one it named, else
    the one that serves such requests by default (an edit model for edits; of several ``images``, an edit-plus one),
    whatever the outcome."""
    if named is not None and named != "":
        request.state.model = named  # a name that is no served id (a number too) is counted as ``other``
        return
    service = getattr(request.app.state, "service", None)
    default = service.default_model(edit=edit, images=images) if service is not None else None
    request.state.model = default.id if default is not None else None


def _note_refused_model(request: Request, body: object) -> None:
    """``note_model`` for a request its schema refused before its route ran."""
    edit = _IMAGE_ROUTES.get(request.url.path)
    if edit is not None and getattr(request.state, "model", None) is None:
        note_model(request, body.get("model") if isinstance(body, dict) else None, edit)


def log_failure(request: Request, exc: ServerError, how: str = "") -> None:
    """A failure of the server's (5xx) in the log, one line (``how``: `` (stream)`` for a stream's error event)."""
    if exc.status_code >= 500:
        log.warning("%s %s%s -> %s: %s", request.method, request.url.path, how, exc.status_code, exc.message)


def client_gone(method: str, path: str) -> Response:
    """The answer to a client that went away before its whole body arrived (a cancelled upload): no one reads it,
    nothing failed here. 499, as for a client gone during the run, so that the metrics do not count a 500 (or 400)."""
    log.info("%s %s: the client went away before its body arrived", method, path)
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    """Map typed errors, validation errors, HTTP errors and anything unexpected to the envelope."""

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        log_failure(request, exc)
        return error_response(
            exc.status_code, exc.message, type_=exc.error_type, code=exc.code, param=exc.param, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _note_refused_model(request, exc.body)
        message, param = _validation_message(exc)
        return error_response(400, message, type_="invalid_request_error", code="invalid_value", param=param)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        return client_gone(request.method, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's "error parsing the body" around a body never sent
            return client_gone(request.method, request.url.path)
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI's "There was an error parsing the body": a JSON body that is not UTF-8 (UnicodeDecodeError) or
            # nests deeper than the parser goes (RecursionError); malformed JSON is a validation error (above)
            return error_response(400, NOT_JSON, type_="invalid_request_error", code="invalid_value")
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and headers and "Allow" in headers:
            headers = {**headers, "Allow": _with_head(headers["Allow"])}
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, type_=type_, code=None, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this one outside the middlewares, after RequestIds has let go of the id: take it from the scope.
        request_id = request.scope.get("state", {}).get("request_id")
        log.exception("unexpected error on %s %s (request %s)", request.method, request.url.path, request_id)
        headers = {"X-Request-ID": request_id} if request_id else None
        message = "Internal server error"
        return error_response(500, message, type_="server_error", code="internal_error", headers=headers, request_id=request_id)
