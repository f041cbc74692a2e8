"""The answers the connection guards (``connections.py``) send themselves, below the application: complete HTTP/1.1
responses written to the socket when h11 has no request to answer (a head sent too slowly, too large or not HTTP),
ASGI answers for a request the guards refuse before the application sees it (a head too large, the connection cap,
shutdown), and the request id such answers carry when only part of a head came. Every one is OpenAI's JSON error
envelope and closes the connection.
"""

from __future__ import annotations

import json
import re

from ..protocol.responses import error_envelope
from .security import client_request_id

#: An ``X-Request-ID`` line of a request head that has not been parsed (h11 reads a head only once it is whole).
_REQUEST_ID_LINE = re.compile(rb"\nx-request-id[ \t]*:[ \t]*([^\r\n]*)\r?\n", re.IGNORECASE)


def partial_head_request_id(data: bytes) -> str:
    """The request id of a head that never finished: its ``X-Request-ID`` when a whole, usable one came, else a new one."""
    found = _REQUEST_ID_LINE.search(data)
    return client_request_id(found.group(1).strip().decode("latin-1") if found else None)


def head_too_large_body(limit: int, request_id: str) -> dict:
    """The envelope of a 431 for a request head over the limit: the client's doing."""
    message = f"Request head (request line and headers) larger than {limit} bytes"
    return error_envelope(message, type_="invalid_request_error", code="request_header_too_large", request_id=request_id)


def head_too_large(limit: int, request_id: str) -> bytes:
    """The whole 431 answer, for when h11 refused the head before it was parsed."""
    return raw_response(431, "Request Header Fields Too Large", head_too_large_body(limit, request_id), request_id=request_id)


def head_bytes(scope) -> int:
    """The size of a parsed request head as sent, at least: h11 strips the spaces around header values and takes a
    bare line feed for a line's end, so each header counts its name, ``:``, its value and one byte of line end."""
    target = len(scope.get("raw_path") or b"") + (1 + len(scope["query_string"]) if scope.get("query_string") else 0)
    line = len(scope.get("method", "")) + 1 + target + 1 + len("HTTP/") + len(scope.get("http_version", "1.1")) + 1
    return line + sum(len(name) + 1 + len(value) + 1 for name, value in scope.get("headers", ())) + 1


def timeout_response(message: str, request_id: str) -> bytes:
    """408 for a request sent too slowly: the client's doing (``invalid_request_error``), with its request id."""
    body = error_envelope(message, type_="invalid_request_error", code="request_timeout", request_id=request_id)
    return raw_response(408, "Request Timeout", body, request_id=request_id)


def raw_response(status: int, reason: str, body: dict, retry_after: int | None = None, request_id: str | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for when h11 has no request to answer."""
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = f"content-type: application/json\r\ncontent-length: {len(data)}\r\nconnection: close\r\n"
    if retry_after is not None:
        headers += f"retry-after: {retry_after}\r\n"
    if request_id is not None:
        headers += f"x-request-id: {request_id}\r\n"
    return f"HTTP/1.1 {status} {reason}\r\n{headers}\r\n".encode() + data


def refusal(message: str, code: str, request_id: str) -> dict:
    """The envelope of a refusal on the server's side (``server_error``: the connection cap, shutdown)."""
    return error_envelope(message, type_="server_error", code=code, request_id=request_id)


async def send_json(send, status: int, body: dict, request_id: str, retry_after: int | None = None) -> None:
    """An answer given below the application, with the request's id (and Retry-After), closing the connection."""
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *([(b"retry-after", str(retry_after).encode())] if retry_after is not None else []),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
