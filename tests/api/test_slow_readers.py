"""Clients that read their answers slowly, or not at all: a client that reads nothing for ``QIS_SEND_TIMEOUT``
seconds while the server waits to write is cut off; one that keeps reading, however slowly, gets everything.

uvicorn on the fake engine with the connection guards, in a thread of this process. The answer is a large stored
image (``GET /images/NAME``): more than the sockets' buffers hold, so that the server must wait for the client.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from test_http_methods import fake_engine_app, served

from qwen_image_server.storage import new_name

SEND_TIMEOUT = 0.5
SIZE = 12 * 1024 * 1024  # well over what the kernel buffers of both ends of a loopback connection hold (4 + 6 MiB at most)


@pytest.fixture(scope="module")
def stored(tiny_models, tmp_path_factory):
    """The port of a server with a send timeout of ``SEND_TIMEOUT``, and the path of a stored image of ``SIZE``."""
    images = tmp_path_factory.mktemp("images")
    name = new_name("png")
    (images / name).write_bytes(os.urandom(SIZE))
    with served(fake_engine_app(tiny_models, images), send_timeout=SEND_TIMEOUT) as port:
        yield port, f"/images/{name}"


def _get(port: int, path: str, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def _read_to_end(sock: socket.socket, pause: float = 0.0, deadline: float = 60.0) -> int:
    """Bytes read until the server ends the connection (or the whole answer arrived): reading ``pause`` apart."""
    received, head, whole = 0, b"", None
    stop = time.monotonic() + deadline
    sock.settimeout(10)
    while time.monotonic() < stop and (whole is None or received < whole):
        try:
            chunk = sock.recv(4 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += len(chunk)
        if whole is None:
            head += chunk
            top, found, _ = head.partition(b"\r\n\r\n")
            if found:
                fields = {k.strip().lower(): v for k, _, v in (line.partition(b":") for line in top.split(b"\r\n")[1:])}
                whole = len(top) + 4 + int(fields[b"content-length"])
        time.sleep(pause)
    return received


def test_a_client_that_reads_nothing_is_cut_off_after_the_send_timeout(stored):
    port, path = stored
    with _get(port, path, receive_buffer=4096) as sock:
        time.sleep(SEND_TIMEOUT * 3)  # reads nothing, past the timeout (the cut comes within two timeouts)
        received = _read_to_end(sock)
    assert 0 < received < SIZE, received  # the start of the answer (what the buffers held), then the end


def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(stored):
    """Paused between reads for most of the send timeout each time, and longer than it in all: the clock runs only
    while the client reads nothing at all."""
    port, path = stored
    started = time.monotonic()
    with _get(port, path, receive_buffer=2 << 20) as sock:  # a few reads, each well within the timeout
        received = _read_to_end(sock, pause=SEND_TIMEOUT * 0.4)
    assert received > SIZE, received  # head and the whole body
    assert time.monotonic() - started > SEND_TIMEOUT, "the reading must outlast the timeout to test anything"


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_a_client_that_reads_nothing_of_an_answer_written_at_once_is_cut_off(close):
    """A JSON answer (b64 images: megabytes) is written in one piece, so it is complete while the transport still
    holds it; the transport is then closed (``Connection: close``, or the keep-alive or head timeout), and a closing
    transport was taken as done with: the client that read nothing kept the connection, and the API process the
    answer, for as long as it liked."""
    from starlette.responses import Response

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await Response(os.urandom(SIZE), media_type="application/json")(scope, receive, send)

    # the next head's clock (or the keep-alive's) closes the transport before the send clock looks
    with served(app, send_timeout=SEND_TIMEOUT, header_timeout=SEND_TIMEOUT / 5, timeout_keep_alive=1) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with sock:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
            time.sleep(SEND_TIMEOUT * 3)  # reads nothing, past the timeout (the cut comes within two)
            received = _read_to_end(sock, deadline=30)
    assert 0 < received < SIZE, received
