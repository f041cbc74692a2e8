"""What stands between the network and the routes: request ids, API keys, and the cross-origin policy.

Small ASGI middlewares, outermost first: ``RequestIds`` names every request (and every
log line about it), ``OriginPolicy`` refuses browser requests from pages the server does
not trust, ``CorsHeaders`` answers the trusted pages' browsers (with ``--cors-origin``),
``ApiKeys`` checks ``Authorization: Bearer``.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .errors import error_response

#: The id of the request being handled, for log lines and error bodies ("-" outside a request).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Paths anyone may call without a key: liveness, readiness (its detail needs a key), and stored
#: images (their names are 128-bit random ids).
OPEN_PATHS = ("/health", "/healthz", "/ready")
OPEN_PREFIXES = ("/images/",)


def install_request_id_logging() -> None:
    """Give every log record a ``qis_request_id`` attribute (the current request's, else "-"). A name of the server's
    own: libraries pass ``extra={"request_id": ...}`` (Ray Serve, in the replica that runs this app), which Python
    refuses when the record already has the attribute."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_adds_request_id", False):
        return

    def record_factory(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.qis_request_id = request_id_var.get()
        return record

    record_factory._adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record_factory)


def client_request_id(value: str | None) -> str:
    """The client's ``X-Request-ID`` when it is short and plain, else a new id."""
    if value and _CLIENT_ID.match(value):
        return value
    return uuid.uuid4().hex


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def scope_request_id(scope) -> str:
    """A request's id from its ASGI scope: the one ``RequestIds`` gave it, else the client's usable ``X-Request-ID``,
    else a new one (for answers given before the application has run: the connection guards')."""
    return scope.get("state", {}).get("request_id") or client_request_id(_header(scope, b"x-request-id"))


class RequestIds:
    """Accept ``X-Request-ID`` (bounded, plain characters) or make one; echo it on the response, unless ``echoed()``
    says a proxy in front does (Ray Serve's echoes the id it passes on: two headers otherwise)."""

    def __init__(self, app, echoed: Callable[[], bool] = lambda: False):
        self.app = app
        self.echoed = echoed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = client_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start" and not self.echoed():
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class OriginPolicy:
    """Refuse (403) requests a browser sends from another site's page, unless that origin is allowed.

    CORS headers alone do not stop a cross-origin ``multipart/form-data`` POST from
    running (browsers send such "simple" requests without asking first); they only
    hide the answer. So a request whose ``Origin`` is neither this server's own nor
    in the allow-list is refused before any work. Clients that are not browsers
    send no ``Origin`` and are not affected.
    """

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = {origin.rstrip("/") for origin in allowed}
        self.any = "*" in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is None or self.any or origin.rstrip("/") in self.allowed or self._same_origin(scope, origin):
            return await self.app(scope, receive, send)
        message = (
            f"cross-origin requests from {origin[:100]} are not allowed; "
            "start the server with --cors-origin ORIGIN to allow a web page to call it"
        )
        response = error_response(403, message, type_="invalid_request_error", code="origin_not_allowed")
        await response(scope, receive, send)

    @staticmethod
    def _same_origin(scope, origin: str) -> bool:
        host = _header(scope, b"host")
        return host is not None and origin in (f"http://{host}", f"https://{host}")


class CorsHeaders(CORSMiddleware):
    """The CORS answers for the origins ``--cors-origin`` allows (``OriginPolicy``, outside it, has refused the
    others with 403): any request header (the openai JavaScript SDK sends ``x-stainless-*`` headers of its own and
    a browser asks about each), the server's own response headers readable (``X-Should-Retry`` among them, which the
    SDKs obey), a page on the internet allowed to call a server on a private network (Chrome asks), and a preflight
    that is refused answered in the error envelope rather than Starlette's plain text."""

    METHODS = ("GET", "HEAD", "POST", "OPTIONS")
    EXPOSED = ("X-Request-ID", "Retry-After", "X-Should-Retry", "X-Run-Start", "X-Run-End", "X-Workers")

    def __init__(self, app, origins: list[str]):
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=self.METHODS,
            allow_headers=["*"],
            expose_headers=self.EXPOSED,
            allow_private_network=True,
            max_age=600,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        origin, method = request_headers["origin"], request_headers["access-control-request-method"]
        refused = [] if self.is_allowed_origin(origin=origin) else [f"origin {origin[:100]}"]
        if method not in self.allow_methods:
            refused.append(f"method {method[:20]} (the API takes {', '.join(self.METHODS)})")
        message = f"CORS preflight refused: {' and '.join(refused) or 'what it asks'} is not allowed"
        return error_response(400, message, type_="invalid_request_error", code="cors_not_allowed")


class ApiKeys:
    """``Authorization: Bearer KEY`` (as the openai SDK sends it) on every route but the open ones.

    Keys are compared in constant time, each against the presented one; they are never logged.
    """

    def __init__(self, app, keys: list[str], open_paths: tuple[str, ...] = ()):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = OPEN_PATHS + tuple(open_paths)  # e.g. /metrics with QIS_PUBLIC_METRICS

    def _open(self, path: str, method: str) -> bool:
        # A CORS preflight carries no credentials.
        return method == "OPTIONS" or path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def _valid(self, presented: str) -> bool:
        candidate = presented.encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorization = _header(scope, b"authorization") or ""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            presented = _header(scope, b"x-api-key") or ""
        valid = bool(presented) and self._valid(presented.strip())
        scope.setdefault("state", {})["authenticated"] = valid
        if valid or self._open(scope.get("path", ""), scope.get("method", "GET")):
            return await self.app(scope, receive, send)
        if not presented:
            message = "Missing API key: send it as 'Authorization: Bearer KEY' (the openai SDK's api_key)"
        else:
            message = "Incorrect API key provided"
        response = error_response(
            401, message, type_="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)
