"""Connection guards on a real server: header and body read timeouts, the connection cap, and shutdown.

Raw sockets on loopback; every read has a socket timeout, so each test ends by itself.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from conftest import post_in_thread

pytestmark = pytest.mark.e2e

GEN = "/v1/images/generations"
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 4.0
CAP = 3


@pytest.fixture(scope="module")
def guarded_tmp(tmp_path_factory):
    """The module server's own temp folder (TMPDIR): its files are told apart from other processes' ones."""
    return tmp_path_factory.mktemp("guarded-tmp")


@pytest.fixture(scope="module")
def guarded(start_server, tiny_t2i, guarded_tmp):
    """The module's server; the last test stops it (two workers take the two requests that its shutdown cuts)."""
    env = {
        "QIS_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "QIS_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "QIS_MAX_CONNECTIONS": str(CAP),
        "QIS_SHUTDOWN_GRACE_SECONDS": "1",
        "QIS_CPU_THREADS": "1",
        "QIS_MAX_STEPS": "1000",
        "TMPDIR": str(guarded_tmp),
    }
    return start_server("--model", f"tiny={tiny_t2i}", "--device", "cpu", "--workers", "2", env=env)


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)  # far beyond the server's timeouts: a hang fails the test instead of blocking it
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (bounded by the socket timeout and a size)."""
    data = b""
    while len(data) < 1 << 20:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the server kept sending")


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def test_partial_head_is_answered_408_and_closed(guarded):
    with _connect(guarded) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    assert _json_body(raw)["error"]["code"] == "request_timeout"


def test_silent_connection_is_closed(guarded):
    with _connect(guarded) as sock:
        assert _read_all(sock) == b""


def test_slow_body_is_answered_408_and_closed(guarded):
    with _connect(guarded) as sock:
        head = f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        sock.sendall(head.encode() + b'{"prompt": "')
        raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    assert _json_body(raw)["error"]["code"] == "request_timeout"
    assert "Traceback" not in guarded.logs(tail=None)
    # counted, though the application never saw the request (the server gives its metrics to its connections)
    metrics = httpx.get(guarded.base_url + "/metrics", timeout=10).text
    assert 'qis_connection_refusals_total{code="request_timeout",status="408"}' in metrics


def _wait_until_served(url: str, attempts: int = 50) -> httpx.Response:
    """GET until a 200 (the server notices closed connections a moment after they close)."""
    for _ in range(attempts):
        r = httpx.get(url, timeout=10)
        if r.status_code == 200:
            return r
        time.sleep(0.1)
    return r


def test_connection_cap_refuses_with_json_503_then_serves_again(guarded):
    holders = [_connect(guarded) for _ in range(CAP)]
    try:
        # Each holder sends a head whose body never comes: it keeps its connection for the body timeout.
        head = f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        for sock in holders:
            sock.sendall(head.encode())
        refused = None
        for _ in range(50):  # bounded: the server registers the holders' connections as it accepts them
            refused = httpx.get(guarded.base_url + "/health", timeout=10)
            if refused.status_code == 503:
                break
            time.sleep(0.1)
        assert refused.status_code == 503, refused.status_code
        assert refused.json()["error"]["code"] == "too_many_connections" and refused.headers["retry-after"] == "1"
    finally:
        for sock in holders:
            sock.close()
    assert _wait_until_served(guarded.base_url + "/health").status_code == 200


def test_stream_longer_than_header_timeout_is_unaffected(guarded):
    # seconds on one CPU thread (the worker runs on the CPU whatever the machine has): several header timeouts
    body = {"prompt": "a long stream", "size": "512x512", "num_inference_steps": 100, "stream": True, "partial_images": 2}
    started = time.monotonic()
    with httpx.stream("POST", guarded.base_url + GEN, json=body, timeout=300) as response:
        assert response.status_code == 200 and response.headers["x-accel-buffering"] == "no"
        text = "".join(response.iter_text())
    assert time.monotonic() - started > HEADER_TIMEOUT, "the stream must outlast the header timeout to test anything"
    assert "image_generation.completed" in text and "event: error" not in text


def test_slow_upload_within_body_timeout_is_served(guarded):
    payload = json.dumps({"prompt": "a slow upload", "size": "256x256", "num_inference_steps": 2}).encode()
    pieces = [payload[i : i + 16] for i in range(0, len(payload), 16)]

    def dribble():
        for piece in pieces[:4]:
            yield piece
            time.sleep(HEADER_TIMEOUT / 2)  # the whole body takes longer than the header timeout
        yield b"".join(pieces[4:])

    headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
    r = httpx.post(guarded.base_url + GEN, content=dribble(), headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def _wait_busy(server, model: str, workers: int, attempts: int = 300) -> None:
    for _ in range(attempts):
        if sum(w["state"] == "busy" for w in server.status()["models"][model]["workers"]) >= workers:
            return
        time.sleep(0.1)
    raise AssertionError("the requests never started running")


# Last in the module: it stops the module's server.
def test_requests_cut_by_shutdown_get_json_503_and_no_traceback(guarded, guarded_tmp):
    server = guarded
    # The forkserver's socket folder (multiprocessing's pymp-* temp folder of the API process)
    folders = glob.glob(os.path.join(guarded_tmp, "pymp-*"))
    assert folders
    long = {"prompt": "a very long job", "size": "512x512", "num_inference_steps": 1000}
    thread, box = post_in_thread(server.base_url + GEN, long, timeout=120)
    stream_box: dict = {}

    def stream():
        with httpx.stream("POST", server.base_url + GEN, json={**long, "stream": True}, timeout=120) as response:
            stream_box["status"] = response.status_code  # the answer has started: its events are to come
            stream_box["text"] = "".join(response.iter_text())

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    _wait_busy(server, "tiny", workers=2)
    # SIGTERM to the whole process group, as systemd's default KillMode, `timeout` or `kill -- -PGID` send it: the
    # workers leave it to the server, which ends them once its grace is over (none dies first and is restarted)
    for pid in server.worker_pids("tiny"):
        os.kill(pid, signal.SIGTERM)
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    streamer.join(timeout=120)
    try:
        # 128 + SIGTERM: the interpreter exited normally (no death by the signal uvicorn raises again), so
        # exit-time cleanups ran, such as removing the forkserver's socket folder
        assert server.process.wait(timeout=60) == 128 + signal.SIGTERM
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise
    response = box["response"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down" and "retry-after" in response.headers
    assert stream_box["status"] == 200
    last = stream_box["text"].strip().split("\n\n")[-1]
    assert last.startswith("event: error") and '"code":"shutting_down"' in last, stream_box["text"][-500:]
    assert '"request_id":"' in last  # as in the error envelope
    log = server.logs(tail=None)
    assert "Traceback" not in log and "shutting down" in log, log[-3000:]
    # the grace period's end is what it documents: a warning, not an error
    (grace_end,) = [line for line in log.splitlines() if "timeout graceful shutdown exceeded" in line]
    assert " WARNING uvicorn.error " in grace_end and "ERROR" not in grace_end, grace_end
    assert "restarting" not in log and "exited (exit code" not in log, log[-3000:]
    assert not [f for f in folders if os.path.exists(f)], "exit-time cleanups ran"
