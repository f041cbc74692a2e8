"""Request bodies the server cannot read, and requests sent too slowly: each gets a clear 400 (or 408) in the envelope.

A generation's body must be a JSON object sent as application/json; an edit's a multipart form or a JSON
object. In process on the fake engine; the read timeouts on the wire (uvicorn with the connection guards, in a
thread of this process).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time

import httpx
import pytest
from test_errors import EDITS, GENERATIONS, assert_error
from test_http_methods import fake_engine_app, served

NOT_JSON = "Validation error: the request body is not valid JSON"
NOT_AN_OBJECT = "Validation error: the request body must be a JSON object"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def http_client(api):
    return api.client


def _error(response: httpx.Response, message: str | None = None) -> dict:
    error = assert_error(response, 400, param=None, message=message)
    assert error["code"] == "invalid_value", error
    return error


@pytest.mark.parametrize(
    "name,request_args",
    [
        ("form-urlencoded", {"data": {"prompt": "a cat"}}),
        ("multipart", {"data": {"prompt": "a cat"}, "files": {"image": ("a.png", b"x", "image/png")}}),
        ("text/plain", {"content": b'{"prompt": "a cat"}', "headers": {"content-type": "text/plain"}}),
        ("no content type", {"content": b'{"prompt": "a cat"}'}),
        ("xml", {"content": b"<prompt>a cat</prompt>", "headers": {"content-type": "application/xml"}}),
    ],
)
def test_a_generation_body_that_is_not_json_says_to_send_json(http_client, name, request_args):
    error = _error(http_client.post(GENERATIONS, **request_args))
    assert "application/json" in error["message"] and "JSON object" in error["message"], error
    assert "valid dictionary" not in error["message"]


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
@pytest.mark.parametrize("body", [b"[1, 2]", b'"a cat"', b"null", b"5", b"true", b"[]"])
def test_a_json_body_that_is_not_an_object_is_named(http_client, path, body):
    _error(http_client.post(path, content=body, headers=JSON), NOT_AN_OBJECT)


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b"\xff\xfe{}",
        b"[" * 5000 + b"]" * 5000,  # deeper than the parser goes
        b'{"prompt": ' * 5000 + b'"a"' + b"}" * 5000,
        b'{"prompt": "a cat"',  # cut short
        b"{'prompt': 'a cat'}",
    ],
    ids=["latin-1", "bom", "deep-array", "deep-object", "truncated", "single-quotes"],
)
def test_a_body_that_is_not_valid_json_says_so(http_client, path, body):
    _error(http_client.post(path, content=body, headers=JSON), NOT_JSON)


def test_a_valid_utf8_json_generation_still_works(http_client):
    body = json.dumps({"prompt": "café", "num_inference_steps": 2}, ensure_ascii=False).encode()
    response = http_client.post(GENERATIONS, content=body, headers=JSON)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["data"][0]["revised_prompt"] in (None, "café")


def test_field_errors_still_name_their_field(http_client):
    assert_error(http_client.post(GENERATIONS, json={"prompt": "a cat", "n": "two"}), 400, param="n")
    error = assert_error(http_client.post(GENERATIONS, json={}), 400, param="prompt")
    assert error["message"] == "Validation error: 'prompt' is required"


# --- 408: a request too slow to arrive --------------------------------------------------------------

HEADER_TIMEOUT, BODY_TIMEOUT = 0.3, 0.6


@pytest.fixture(scope="module")
def slow_port(tiny_models, tmp_path_factory):
    with served(fake_engine_app(tiny_models, tmp_path_factory.mktemp("images")), HEADER_TIMEOUT, BODY_TIMEOUT) as port:
        yield port


def _timed_out(port: int, data: bytes) -> tuple[dict[str, str], dict]:
    """Send ``data`` and nothing more; the 408 answer's headers and body (then the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    assert status.startswith("HTTP/1.1 408 "), raw[:300]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body) and headers["connection"] == "close"
    return headers, json.loads(body)


def _check_408(headers: dict[str, str], body: dict, request_id: str | None) -> None:
    error = body["error"]
    assert set(body) == {"error", "detail", "request_id"} and body["detail"] == error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout", error
    assert headers["x-request-id"] == body["request_id"]
    if request_id is None:
        assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"]), body
    else:
        assert body["request_id"] == request_id


HEAD_START = f"POST {GENERATIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
BODY_START = HEAD_START + "Content-Type: application/json\r\nContent-Length: 200\r\n"


def _stalled(port: int, start: str, client_id: str | None, rest: str) -> dict:
    """The 408's body for a request that stops after ``start``, its ``X-Request-ID`` line (when given) and ``rest``."""
    headers, body = _timed_out(port, (start + (f"X-Request-ID: {client_id}\r\n" if client_id else "") + rest).encode())
    _check_408(headers, body, client_id)
    return body


@pytest.mark.parametrize("client_id", [None, "slow-client-7"])
def test_a_slow_head_gets_408_with_a_request_id(slow_port, client_id):
    body = _stalled(slow_port, HEAD_START, client_id, "Content-Type: appl")
    assert body["error"]["message"] == f"Request head not received within {HEADER_TIMEOUT:g} s"


def test_a_slow_head_with_an_unusable_request_id_gets_a_new_one(slow_port):
    headers, body = _timed_out(slow_port, (HEAD_START + "X-Request-ID: two words\r\nAccept: ").encode())
    _check_408(headers, body, None)


@pytest.mark.parametrize("client_id", [None, "slow-body-9"])
def test_a_slow_body_gets_408_with_the_request_s_id(slow_port, client_id):
    body = _stalled(slow_port, BODY_START, client_id, '\r\n{"prompt": "')
    assert body["error"]["message"] == f"Request body not received within {BODY_TIMEOUT:g} s"


# --- a client that leaves while its body is read ------------------------------------------------------------------

VARIATIONS = "/v1/images/variations"
_FORM_START = (
    '--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
    '--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
)


@pytest.fixture(scope="module")
def plain_port(tiny_models, tmp_path_factory):
    with served(fake_engine_app(tiny_models, tmp_path_factory.mktemp("images"))) as port:
        yield port


def _requests_counted(port: int, path: str) -> dict[str, float]:
    """``qis_requests_total`` of ``path`` by status, as /metrics shows it."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("qis_requests_total{") and f'route="{path}"' in line:
            status = re.search(r'status="(\d+)"', line)
            counts[status.group(1) if status else "?"] = float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.parametrize(
    "path,content_type,body_start",
    [
        (EDITS, "multipart/form-data; boundary=XyZ", _FORM_START + "x" * 2000),
        (VARIATIONS, "multipart/form-data; boundary=XyZ", _FORM_START + "x" * 2000),
        (EDITS, "application/json", '{"prompt": "a cat", "image": "' + "A" * 2000),
        (GENERATIONS, "application/json", '{"prompt": "a cat' + " and a dog" * 200),
        (GENERATIONS, "application/json", None),  # chunked: the body limit reads it before the app
    ],
    ids=["edit-multipart", "variation-multipart", "edit-json", "generation-json", "generation-chunked"],
)
def test_a_client_gone_before_its_body_arrived_is_no_server_error(
    plain_port, path: str, content_type: str, body_start: str | None, caplog
):
    """A client that sends part of its body and goes away (a cancelled upload) is counted as gone (499), not as a
    server failure: no 500 in the metrics, no error with a traceback in the log."""
    before = _requests_counted(plain_port, path)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
    if body_start is None:
        data = head + "Transfer-Encoding: chunked\r\n\r\n" + "10\r\n" + '{"prompt": "a c' + "a\r\n"
    else:
        data = head + "Content-Length: 100000\r\n\r\n" + body_start
    with socket.create_connection(("127.0.0.1", plain_port), timeout=10) as sock:
        sock.sendall(data.encode())
    deadline = time.monotonic() + 20
    while (after := _requests_counted(plain_port, path)) == before:
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.05)
    added = {status: count - before.get(status, 0) for status, count in after.items() if count != before.get(status, 0)}
    assert added == {"499": 1}, added
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("qwen_image_server")]
    assert not errors, [r.getMessage() for r in errors]
