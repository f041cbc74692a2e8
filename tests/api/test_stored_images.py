"""``GET /images/NAME``: a stored image leaves as it is read from its file, in bounded pieces, so that many clients
of a large image (or slow ones) do not hold a copy of it each in the API process; the file is closed however the
answer ends."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from conftest import asgi_call
from qwen_image_server.api.routes import IMAGE_CHUNK
from qwen_image_server.storage import new_name

SIZE = 3 * IMAGE_CHUNK + 1234


@pytest.fixture
def stored(make_api, tiny_t2i, tmp_path):
    """The app of an in-process server, and a stored image of ``SIZE`` random bytes in its image directory."""
    api = make_api({"tiny": tiny_t2i}, image_output_dir=str(tmp_path))
    path = tmp_path / new_name("png")
    path.write_bytes(os.urandom(SIZE))
    return api.client.app, path


def _open_by_this_process(path: Path) -> bool:
    """Whether a file descriptor of this process is ``path`` (also after the file was deleted)."""
    fds = Path("/proc/self/fd")
    targets = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            targets.add(os.readlink(fds / fd))
    return str(path) in targets or f"{path} (deleted)" in targets


def _get(app, path: Path, on_send) -> list[dict]:
    """GET the image's URL from the ASGI app; ``on_send(message, sent)`` runs before each message is taken."""
    return asgi_call(app, "GET", f"/images/{path.name}", [], on_send=on_send)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files from /proc")
def test_a_stored_image_leaves_in_bounded_pieces_even_when_pruned_meanwhile(stored):
    app, path = stored
    data = path.read_bytes()
    opened_while_sent = []

    def on_send(message, sent):
        if message["type"] == "http.response.start":
            path.unlink()  # the store prunes it as the answer starts: the open file is still read to its end
        opened_while_sent.append(_open_by_this_process(path))

    start, *body = _get(app, path, on_send)
    assert start["status"] == 200
    assert dict(start["headers"])[b"content-length"] == str(SIZE).encode()
    assert dict(start["headers"])[b"content-type"] == b"image/png"
    assert b"".join(message["body"] for message in body) == data
    assert len(body) > 1 and max(len(message["body"]) for message in body) <= IMAGE_CHUNK
    assert [message.get("more_body", False) for message in body] == [True] * (len(body) - 1) + [False]
    assert all(opened_while_sent[1:])  # read from the one open file after the unlink...
    assert not _open_by_this_process(path)  # ...which is closed once the answer ended


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files from /proc")
def test_the_file_is_closed_when_the_client_goes_away_midway(stored):
    app, path = stored

    def on_send(message, sent):
        if len(sent) == 2:  # the connection broke after the first piece
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        _get(app, path, on_send)
    assert not _open_by_this_process(path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the open files from /proc")
def test_reading_stops_when_the_client_leaves(stored):
    """uvicorn drops what is sent to a client that left without raising: the image was read to its end (a whole S3
    object fetched) for no one. The answer now stops at the disconnect and closes the file."""
    import asyncio

    app, path = stored
    first_piece_sent = asyncio.Event()
    asked = 0

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        if asked == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_piece_sent.wait()
        return {"type": "http.disconnect"}

    def on_send(message, sent):
        if message["type"] == "http.response.body":
            first_piece_sent.set()

    start, *body = asgi_call(app, "GET", f"/images/{path.name}", [], receive=receive, on_send=on_send)
    assert start["status"] == 200 and 1 <= len(body) < SIZE // IMAGE_CHUNK
    assert not _open_by_this_process(path)


def test_head_sends_the_head_without_reading_the_image(stored):
    app, path = stored
    start, *body = asgi_call(app, "HEAD", f"/images/{path.name}", [])
    assert start["status"] == 200 and dict(start["headers"])[b"content-length"] == str(SIZE).encode()
    assert body == [{"type": "http.response.body", "body": b""}]  # one empty piece: nothing was read and dropped


def test_a_stream_asking_for_urls_stores_nothing_and_gets_b64_images(make_api, tiny_t2i, tmp_path):
    """A stream's events carry ``b64_json`` (OpenAI's): ``response_format=url`` there stored every image for nothing
    (counted against the store's bound, pushing out other clients' images) and could fail the stream on the store."""
    import json

    http = make_api({"tiny": tiny_t2i}, image_output_dir=str(tmp_path)).client
    body = {"prompt": "a river", "response_format": "url", "stream": True, "n": 2, "num_inference_steps": 2}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    completed = [e for e in events if e["type"] == "image_generation.completed"]
    assert len(completed) == 2 and all(e["b64_json"] for e in completed)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("server", "bind", "expected"),
    [
        (("10.1.2.3", 8000), "0.0.0.0", "http://10.1.2.3:8000/"),  # the address the connection came in on
        (("::1", 8000), "::1", "http://[::1]:8000/"),
        (None, "::", "http://[::]:8000/"),  # no address from the server: the bind address, as a URL can hold it
        (("fe80::1%eth0", 8000), "::", "http://[fe80::1]:8000/"),
    ],
)
def test_without_a_usable_host_header_urls_name_the_address_the_client_reached(server, bind, expected):
    """No ``Host`` (HTTP/1.0) or a forged one: image URLs are built from the connection's own address, in brackets for
    IPv6 (``http://::1:8000/`` is no URL), not from the bind address (``0.0.0.0`` is no address to fetch from)."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from qwen_image_server.api.routes import _base_url

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"host", b"evil.example/x?")], "scheme": "http"}
    if server:
        scope["server"] = server
    service = SimpleNamespace(settings=SimpleNamespace(host=bind, port=8000))
    assert _base_url(Request(scope), service) == expected


def _stored_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def _eventually(check, seconds: float = 10.0) -> bool:
    """``check()`` within ``seconds`` (the store's deletes run on its threads, not awaited by the request)."""
    import time

    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_response_whose_later_image_cannot_be_stored_leaves_none_and_is_not_retried(make_api, tiny_t2i, tmp_path):
    """``n=3`` on a disk that fills after the first image: the 500 left that image behind, a file no client had the
    name of, holding the space for its whole TTL (and in a bucket without lifecycle rules, for ever). The answer
    also let OpenAI's SDK run the whole request twice more, into the same full disk."""
    from conftest import failing_store_saves

    api = make_api({"tiny": tiny_t2i}, image_output_dir=str(tmp_path))
    store = api.client.app.state.service.store
    real_save = store.save
    saves = failing_store_saves(store, 2, "No space left on device")
    body = {"prompt": "a full disk", "response_format": "url", "n": 3, "num_inference_steps": 2}
    r = api.client.post("/v1/images/generations", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "storage_failed", r.text[:300]
    assert r.headers["x-should-retry"] == "false"
    assert len(saves) == 2 and _eventually(lambda: _stored_names(tmp_path) == set()), _stored_names(tmp_path)
    store.save = real_save
    r = api.client.post("/v1/images/generations", json={**body, "n": 2})  # the next one is stored, and kept
    assert r.status_code == 200 and len(_stored_names(tmp_path)) == 2


def test_a_name_with_a_trailing_newline_is_no_image_name(stored):
    """The name pattern ended in ``$``, which also matches before a final newline: a file so named in the folder (a
    shared mount) was served as a 500 ``KeyError: 'png\\n'`` and counted and pruned as the server's own."""
    app, path = stored
    odd = path.with_name(path.name + "\n")
    odd.write_bytes(b"not ours")
    start = asgi_call(app, "GET", f"/images/{path.name}\n", [])[0]
    assert start["status"] == 404 and odd.exists()


def test_a_store_that_fails_while_an_image_is_sent_ends_the_answer_with_one_log_line(stored, monkeypatch, caplog):
    """A bucket that stalls in the middle of an image (or a file cut short) raised out of the app once the answer had
    started: two full tracebacks in the log per request (the app's and uvicorn's), and ``GET /images`` needs no key.
    The answer now ends short (its Content-Length tells the client) with one warning naming the image."""
    from qwen_image_server.storage import LocalImageStore, StoredImage

    app, path = stored
    real_open = LocalImageStore.open

    class Stalls:
        def __init__(self, file):
            self.file, self.reads = file, 0

        def read(self, size: int) -> bytes:
            self.reads += 1
            if self.reads == 2:
                raise TimeoutError("Read timeout on endpoint URL")
            return self.file.read(size)

        def close(self) -> None:
            self.file.close()

    def open_stalling(store, name):
        opened = real_open(store, name)
        return opened and StoredImage(Stalls(opened.file), opened.size)

    monkeypatch.setattr(LocalImageStore, "open", open_stalling)
    with caplog.at_level("WARNING"):
        start, *body = _get(app, path, lambda message, sent: None)
    assert start["status"] == 200 and [len(m["body"]) for m in body] == [IMAGE_CHUNK]
    assert body[-1]["more_body"] is True  # not completed: the connection ends short
    lines = [r for r in caplog.records if r.name.startswith("qwen_image_server")]
    assert [(r.levelname, r.exc_info) for r in lines] == [("WARNING", None)], [r.getMessage() for r in lines]
    assert lines[0].getMessage() == (
        f"stopped sending image {path.name} after {IMAGE_CHUNK} of {SIZE} bytes: TimeoutError: Read timeout on endpoint URL"
    )


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("images.example:8443", "http://images.example:8443/"),
        ("qwen_image:8000", "http://qwen_image:8000/"),  # a compose service's name
        ("10.0.0.5", "http://10.0.0.5/"),
        ("[::1]:8000", "http://[::1]:8000/"),
        ("h:0080", "http://h:80/"),
        # no host a client could fetch from: the connection's own address
        ("-", "http://10.1.2.3:8000/"),
        ("...", "http://10.1.2.3:8000/"),
        ("[:]", "http://10.1.2.3:8000/"),
        ("h:99999", "http://10.1.2.3:8000/"),
        ("h:00000", "http://10.1.2.3:8000/"),
        ("-a.example", "http://10.1.2.3:8000/"),
        ("999.1.1.1", "http://10.1.2.3:8000/"),
        ("[fe80::1%eth0]", "http://10.1.2.3:8000/"),
    ],
)
def test_image_urls_use_the_host_header_only_when_it_is_a_host_a_client_could_fetch_from(host, expected):
    """The Host check took anything of letters, digits, dots and dashes, and any five digits for a port: ``-``,
    ``...``, ``[:]`` and ``h:99999`` became image URLs no client could fetch."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from qwen_image_server.api.routes import _base_url

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"host", host.encode())], "scheme": "http"}
    scope["server"] = ("10.1.2.3", 8000)
    service = SimpleNamespace(settings=SimpleNamespace(host="0.0.0.0", port=8000))
    assert _base_url(Request(scope), service) == expected


def test_a_url_request_to_a_folder_that_cannot_be_written_is_refused_before_its_job_runs(make_api, tiny_t2i, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    """The start only warned of a folder that cannot be written: every url request then ran its whole job (minutes of
    a GPU) and was refused once its image could not be kept. It is refused before the job, the folder named in no
    answer; a folder fixed meanwhile serves again (the probe is taken as true for ``PROBE_SECONDS``)."""
    from qwen_image_server import storage

    monkeypatch.setattr(storage, "PROBE_SECONDS", 0.0)
    blocker = tmp_path / "afile"
    blocker.write_text("a file where the folder's parent should be")
    api = make_api({"tiny": tiny_t2i}, image_output_dir=str(blocker / "images"))
    body = {"prompt": "kept nowhere", "response_format": "url", "num_inference_steps": 2}
    jobs = len(api.engine.jobs)
    r = api.client.post("/v1/images/generations", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "storage_failed", r.text[:300]
    assert "Not a directory" in r.json()["error"]["message"] and str(tmp_path) not in r.text
    assert r.headers["x-should-retry"] == "false"
    assert len(api.engine.jobs) == jobs  # no job ran
    assert api.client.post("/v1/images/generations", json={**body, "response_format": "b64_json"}).status_code == 200
    blocker.unlink()  # fixed
    assert api.client.post("/v1/images/generations", json=body).status_code == 200
