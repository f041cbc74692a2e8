"""What the connection guards answer below the application, on the wire: a request head over the limit (in one
piece or several), a request that is not HTTP, the connection cap and the shutdown's cut-off. Each in the JSON
envelope with a request id (the client's ``X-Request-ID`` when it sent a usable one), as every error is.

uvicorn on the fake engine with the connection guards, in a thread of this process; raw sockets with timeouts.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import pytest
from test_http_methods import fake_engine_app, served

LIMIT = 4096


def _exchange(port: int, *pieces: bytes, pause: float = 0.2) -> bytes:
    """Send ``pieces`` (``pause`` apart, and no more once the server has answered, as a client would stop: more
    data on a closed socket may have the answer reset), then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for piece in pieces:
            sock.sendall(piece)
            if select.select([sock], [], [], pause)[0]:
                break
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status.split()[1]), headers, json.loads(body)


def _head(padding: int, request_id: str = "rid-1") -> bytes:
    return (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {request_id}\r\n"
            f"X-Padding: {'p' * padding}\r\n\r\n").encode()  # fmt: skip


@pytest.fixture(scope="module")
def limited(tiny_models, tmp_path_factory):
    with served(fake_engine_app(tiny_models, tmp_path_factory.mktemp("images")), max_head_bytes=LIMIT) as port:
        yield port


@pytest.mark.parametrize("pieces", [1, 3], ids=["one write", "three writes"])
@pytest.mark.parametrize("size", [LIMIT + 200, 3 * LIMIT, 20 * LIMIT])
def test_a_head_over_the_limit_is_431_in_the_envelope_however_it_arrives(limited, size, pieces):
    """h11 refuses a head it still waits for past the limit, but takes one that arrives whole whatever its size:
    both are refused the same way."""
    head = _head(size - len(_head(0)))
    assert len(head) == size
    step = -(-size // pieces)
    status, headers, body = _answer(_exchange(limited, *(head[i : i + step] for i in range(0, size, step))))
    assert status == 431 and body["error"]["code"] == "request_header_too_large", (status, body)
    assert body["error"]["message"] == f"Request head (request line and headers) larger than {LIMIT} bytes"
    assert body["request_id"] == headers["x-request-id"] == "rid-1"


def test_a_head_within_the_limit_is_served(limited):
    head = _head(LIMIT - 300)
    assert len(head) < LIMIT
    raw = _exchange(limited, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]


def test_a_head_within_the_limit_written_tersely_is_served(limited):
    """h11 takes ``Name:value`` headers and bare line feeds: a head of those within the limit is not refused by a
    count of the separators it does not have."""
    head = b"GET /health HTTP/1.1\nHost:x\nConnection:close\n" + b"".join(b"X-H%02d:%s\n" % (i, b"v" * 60) for i in range(60))
    head += b"\n"
    assert LIMIT - 40 < len(head) <= LIMIT
    raw = _exchange(limited, head)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]


@pytest.mark.parametrize(
    ("request_bytes", "read"),
    [
        (b"POST /health HTTP/1.1\r\nContent-Length: 6000\r\n\r\n", False),  # no Host header: not HTTP/1.1
        (b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", False),
        (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),
    ],
    ids=["no host", "unknown transfer coding", "bad chunk size"],
)
def test_a_broken_request_with_a_large_body_is_400_not_431(limited, request_bytes, read):
    """What h11 cannot parse is a 400 whatever follows it in the same read (a body larger than the head limit was
    taken for a head too large). A request whose head was read (a broken body) keeps its X-Request-ID; the
    others get a new id."""
    head, _, rest = request_bytes.partition(b"\r\n\r\n")
    request_bytes = head + b"\r\nX-Request-ID: rid-5\r\n\r\n" + rest + b"x" * 6000
    status, headers, body = _answer(_exchange(limited, request_bytes))
    assert status == 400 and body["error"]["code"] == "invalid_http_request", (status, body)
    assert body["request_id"] == headers["x-request-id"]
    assert (body["request_id"] == "rid-5") == read


def test_a_request_that_is_not_http_is_400_in_the_envelope(limited):
    """(h11 has taken the head it could not parse: the request gets a new id.)"""
    status, headers, body = _answer(_exchange(limited, b"HELLO THERE\r\nX-Request-ID: rid-2\r\n\r\n"))
    assert status == 400 and body["error"]["code"] == "invalid_http_request"
    assert body["error"]["type"] == "invalid_request_error" and body["request_id"] == headers["x-request-id"]
    assert len(body["request_id"]) == 32


def test_the_connection_cap_refusal_carries_the_request_id(tiny_models, tmp_path):
    """One connection allowed: a second one's request is refused with the envelope, Retry-After and its id."""
    with served(fake_engine_app(tiny_models, tmp_path), limit_concurrency=1) as port:
        holder = socket.create_connection(("127.0.0.1", port), timeout=20)
        try:  # a head whose body never comes keeps the one connection busy
            holder.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                refused = httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-Request-ID": "rid-3"}, timeout=10)
                if refused.status_code == 503:
                    break
                time.sleep(0.05)
        finally:
            holder.close()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
    assert refused.json()["request_id"] == refused.headers["x-request-id"] == "rid-3"
    assert refused.headers["retry-after"] == "1"


def test_a_request_cut_off_by_the_shutdown_carries_its_request_id(tiny_models, tmp_path):
    """A job still running when the shutdown's grace ends: 503 ``shutting_down`` with the request's id, which the log
    line about it carries too."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    app = fake_engine_app(tiny_models, tmp_path)
    engine = app.state.service.engine
    boxes: list = []
    with served(app, timeout_graceful_shutdown=0.5, server_box=boxes) as port:
        logging.getLogger("uvicorn.error").addHandler(handler)  # (uvicorn's configuration of its loggers came first)
        engine.pause()  # the job never finishes by itself
        result: dict = {}

        def post() -> None:
            body = {"prompt": "a cat", "num_inference_steps": 2}
            url = f"http://127.0.0.1:{port}/v1/images/generations"
            result["response"] = httpx.post(url, json=body, headers={"X-Request-ID": "rid-4"}, timeout=30)

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        for _ in range(200):
            if engine.jobs:
                break
            time.sleep(0.02)
        assert engine.jobs, "the job never reached the engine"
        boxes[0].should_exit = True
        thread.join(30)
    response = result["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert response.json()["request_id"] == response.headers["x-request-id"] == "rid-4"
    logging.getLogger("uvicorn.error").removeHandler(handler)
    (cut,) = [r for r in records if r.getMessage().endswith("stopped: the server is shutting down")]
    assert cut.qis_request_id == "rid-4"


def test_every_answer_sent_below_the_application_is_counted_in_the_metrics(tiny_models, tmp_path):
    """The answers the connection guards send themselves never reached ``qis_requests_total`` (the application does
    not see them): slow-client and connection-cap refusals were invisible to monitoring. Each is counted by status
    and code in ``qis_connection_refusals_total``."""
    app = fake_engine_app(tiny_models, tmp_path)
    options = {"max_head_bytes": LIMIT, "header_timeout": 0.3, "body_timeout": 0.3, "limit_concurrency": 1}
    with served(app, on_refused=app.state.metrics.count_refusal, **options) as port:
        assert _answer(_exchange(port, _head(20 * LIMIT)))[0] == 431  # refused by h11 while it arrives
        assert _answer(_exchange(port, b"GARBAGE\r\n\r\n"))[0] == 400
        assert _answer(_exchange(port, b"GET /health HTTP/1.1\r\nHost: x", pause=2))[0] == 408  # the head, too slowly
        slow_body = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
        assert _answer(_exchange(port, slow_body, pause=2))[0] == 408
        with socket.create_connection(("127.0.0.1", port), timeout=20):  # holds the one connection the cap allows
            time.sleep(0.1)
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 503
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counted = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("qis_connection_refusals_total{")}  # fmt: skip
    assert counted == {
        'code="request_header_too_large",status="431"': 1.0,
        'code="invalid_http_request",status="400"': 1.0,
        'code="request_timeout",status="408"': 2.0,
        'code="too_many_connections",status="503"': 1.0,
    }, counted
