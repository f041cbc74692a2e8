"""HTTP semantics around the routes: HEAD answers as GET does without a body, and a trailing slash redirects.

In process on the fake engine, and on the wire through uvicorn (with the server's connection guards) in a
thread of this process, since the server, not only the app, decides what a HEAD answer carries.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn
from serve_process import free_port

from conftest import T2I, asgi_call
from qwen_image_server.api.app import create_app
from qwen_image_server.api.connections import guarded_protocol
from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured

KEY, ALLOWED = "sk-head-test", "https://page.example"
FAST = {"num_inference_steps": 2}
#: GET routes whose body is the same from one call to the next (``/metrics`` counts the calls themselves).
STABLE_GET_PATHS = [
    "/health",
    "/healthz",
    "/ready",
    "/v1/models",
    f"/v1/models/{T2I}",
    "/",
    "/playground",
    "/playground/settings",
    "/playground/app.js",
    "/openapi.json",
]


@pytest.fixture(scope="module")
def http_client(api):
    return api.client


@pytest.fixture(scope="module")
def keyed(make_api, tiny_t2i):
    return make_api({T2I: tiny_t2i}, api_keys=[KEY], cors_origins=[ALLOWED]).client


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _stored_image_path(client, headers: dict[str, str] | None = None) -> str:
    body = {"prompt": "a cat", "response_format": "url", **FAST}
    response = client.post("/v1/images/generations", json=body, headers=headers)
    assert response.status_code == 200, response.text[:300]
    return "/images/" + response.json()["data"][0]["url"].rsplit("/images/", 1)[1]


def _same_as_get(client, path: str, headers: dict[str, str] | None = None, *, same_length: bool = True) -> None:
    get, head = client.get(path, headers=headers), client.head(path, headers=headers)
    assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["x-request-id"]
    if same_length:
        assert int(head.headers["content-length"]) == len(get.content), path
    else:
        assert int(head.headers["content-length"]) > 0


# --- HEAD in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STABLE_GET_PATHS)
def test_head_answers_like_get(http_client, path):
    _same_as_get(http_client, path)


def test_head_on_metrics_and_stored_images(http_client):
    _same_as_get(http_client, "/metrics", same_length=False)  # the GET itself changes the counters
    image = _stored_image_path(http_client)
    _same_as_get(http_client, image)
    assert http_client.head(image).headers["content-type"] == "image/png"


def test_head_errors_answer_like_get(http_client):
    for path in ("/images/nothing-here.png", f"/v1/models/{T2I}-missing", "/no/such/path", "/playground/nope.js"):
        get, head = http_client.get(path), http_client.head(path)
        assert head.status_code == get.status_code == 404, path
        assert head.content == b"" and head.headers["content-type"] == "application/json"


def test_head_on_a_post_route_stays_405(http_client):
    response = http_client.head("/v1/images/generations")
    assert response.status_code == 405 and response.content == b""
    assert response.headers["allow"] == "POST" and response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    get = http_client.get("/v1/images/generations").json()  # the envelope HEAD leaves out
    assert get["error"]["message"] == "Method GET is not allowed on /v1/images/generations"


def test_a_405_on_a_get_route_lists_head_as_allowed(http_client):
    """Every GET route answers HEAD too (README), so its 405 says so, as RFC 9110 wants of ``Allow``."""
    for path in ("/healthz", "/v1/models", f"/v1/models/{T2I}", "/metrics", "/ready"):
        response = http_client.post(path)
        assert response.status_code == 405, path
        assert response.headers["allow"] == "GET, HEAD", path
        assert http_client.head(path).status_code == 200, path


def test_head_keeps_api_keys_cors_and_request_ids(keyed):
    refused = keyed.head("/v1/models")
    assert refused.status_code == 401 and refused.content == b""
    assert refused.headers["www-authenticate"] == "Bearer" and refused.headers["content-type"] == "application/json"
    _same_as_get(keyed, "/v1/models", _auth())
    _same_as_get(keyed, "/health")  # open without a key, as for GET
    _same_as_get(keyed, _stored_image_path(keyed, _auth()))
    mine = keyed.head("/health", headers={"X-Request-ID": "head-probe-1"})
    assert mine.headers["x-request-id"] == "head-probe-1"
    allowed = keyed.head("/v1/models", headers={**_auth(), "Origin": ALLOWED})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    other = keyed.head("/v1/models", headers={**_auth(), "Origin": "https://elsewhere.example"})
    assert other.status_code == 403 and other.content == b""
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "HEAD", "Access-Control-Request-Headers": "authorization"}
    answer = keyed.options("/v1/models", headers=preflight)
    assert answer.status_code == 200 and "HEAD" in answer.headers["access-control-allow-methods"]


@pytest.mark.parametrize(
    "path,headers,status",
    [
        ("/health", [], 200),
        ("/v1/models", [(b"authorization", f"Bearer {KEY}".encode())], 200),
        ("/v1/models", [], 401),  # a middleware's own answer
        ("/v1/models", [(b"origin", b"https://elsewhere.example")], 403),
        ("/v1/images/generations", [(b"authorization", f"Bearer {KEY}".encode())], 405),
    ],
)
def test_the_app_itself_sends_no_body_to_head(keyed, path, headers, status):
    sent = asgi_call(keyed.app, "HEAD", path, headers)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == status
    assert int(dict(start["headers"])[b"content-length"]) > 0  # the GET body's length
    assert all(m.get("body", b"") == b"" for m in sent if m["type"] == "http.response.body")


# --- trailing slashes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,target",
    [
        ("/v1/models/", "/v1/models"),
        (f"/v1/models/{T2I}/", f"/v1/models/{T2I}"),
        (f"/v1/models/{T2I}//", f"/v1/models/{T2I}"),
        ("/health/", "/health"),  # Starlette's own redirect, which the models routes now match
    ],
)
def test_a_trailing_slash_redirects_to_the_path_without_it(http_client, path, target):
    for method in ("GET", "HEAD"):
        redirect = http_client.request(method, path, follow_redirects=False)
        assert redirect.status_code == 307, (method, path, redirect.text[:200])
        assert redirect.headers["location"] == f"http://testserver{target}"
    followed = http_client.get(path)
    assert followed.status_code == 200 and followed.json() == http_client.get(target).json()


def test_an_unknown_model_with_a_trailing_slash_is_named_without_it(http_client):
    response = http_client.get("/v1/models/no-such-model/")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"] == "Model not found: no-such-model"
    assert (error["code"], error["param"]) == ("model_not_found", "model")  # OpenAI's answer to an unknown model


# --- on the wire ---------------------------------------------------------------------------------


@contextlib.contextmanager
def served(
    app,
    header_timeout: float | None = 10,
    body_timeout: float | None = 120,
    send_timeout: float | None = 60,
    max_head_bytes: int | None = None,
    server_box: list | None = None,
    on_refused=None,
    **config,
):
    """``app`` behind uvicorn with the server's connection guards, in a thread; yields the port. ``max_head_bytes``
    limits request heads as ``QIS_MAX_HEADER_BYTES`` does; ``config``: more of uvicorn's options (as
    ``uvicorn_options`` gives them: ``limit_concurrency``, ``timeout_graceful_shutdown``); ``server_box`` receives
    the uvicorn server."""
    port = free_port()
    protocol = guarded_protocol(header_timeout, body_timeout, send_timeout, max_head_bytes, on_refused)
    if max_head_bytes is not None:
        config["h11_max_incomplete_event_size"] = max_head_bytes
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, ws="none", log_level="warning", **config)
    server = uvicorn.Server(config)
    if server_box is not None:
        server_box.append(server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def fake_engine_app(tiny_models, tmp_path, **overrides):
    """A fresh app on the fake engine, for a server of its own (its lifespan starts the engine)."""
    from fake_engine import FakeEngine

    entries = [f"{name}={folder}" for name, folder in tiny_models.items()]
    settings = Settings(models=entries, image_output_dir=str(tmp_path), **overrides)
    return create_app(settings, FakeEngine(resolve_configured(settings), settings))


class Wire:
    """Responses read one by one from a socket, as a client on a keep-alive connection reads them."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""

    def _fill(self, until) -> None:
        while not until():
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed early: {self.data[:200]!r}"
            self.data += chunk

    def response(self, head_only: bool = False) -> tuple[bytes, dict[str, str], bytes]:
        """Status line, headers, and the body its Content-Length announces (none for an answer to HEAD)."""
        self._fill(lambda: b"\r\n\r\n" in self.data)
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {k.decode().lower(): v.decode().strip() for k, _, v in (line.partition(b":") for line in lines)}
        length = 0 if head_only else int(headers.get("content-length", "0"))
        self._fill(lambda: len(self.data) >= length)
        body, self.data = self.data[:length], self.data[length:]
        return status, headers, body


def test_head_on_the_wire_has_the_get_length_and_no_body(tiny_models, tmp_path):
    with (
        served(fake_engine_app(tiny_models, tmp_path)) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        wire = Wire(sock)
        for path in ("/health", "/v1/models", "/ready", "/"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            get_status, get_headers, body = wire.response()
            # HEAD, then GET on the same keep-alive connection: a stray body would be read as the next response
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head_status, head_headers, _ = wire.response(head_only=True)
            assert head_status == get_status and head_status.startswith(b"HTTP/1.1 200"), (path, head_status)
            assert int(head_headers["content-length"]) == len(body) > 0
            assert head_headers["content-type"] == get_headers["content-type"]
            status, _, after = wire.response()
            assert status.startswith(b"HTTP/1.1 200") and after == b'{"status":"ok"}', wire.data[:200]
        sock.sendall(b"HEAD /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = wire.response(head_only=True)
        assert status.startswith(b"HTTP/1.1 405") and headers["allow"] == "POST"
        rest = wire.data
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b""  # closed with nothing after the head
