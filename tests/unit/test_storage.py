"""Stored url images: generated names only, bounded count."""

import os
import time

from qwen_image_server.storage import LocalImageStore


def test_names_are_generated_and_only_they_are_served(tmp_path):
    store = LocalImageStore(tmp_path, max_files=10, ttl_seconds=3600)
    name = store.save(b"abc", "png")
    assert store.path(name).read_bytes() == b"abc"
    (tmp_path / "secret.txt").write_text("x")
    for bad in ("secret.txt", "../secret.txt", name.upper(), name + "/..", "x" * 32 + ".png"):
        assert store.path(bad) is None


def test_oldest_and_expired_files_are_deleted(tmp_path):
    store = LocalImageStore(tmp_path, max_files=3, ttl_seconds=3600)
    names = []
    for i in range(5):
        names.append(store.save(bytes([i]), "png"))
        os.utime(tmp_path / names[-1], (time.time() - 100 + i, time.time() - 100 + i))
    fresh = store.save(b"z", "png")
    assert {p.name for p in tmp_path.iterdir()} == {fresh, names[4], names[3]}
    newest = LocalImageStore(tmp_path, max_files=100, ttl_seconds=50).save(b"n", "webp")
    assert {p.name for p in tmp_path.iterdir()} == {fresh, newest}


def test_a_failed_write_leaves_no_partial_file_and_says_why(tmp_path, monkeypatch):
    from pathlib import Path

    import pytest

    from qwen_image_server.errors import StorageFailed

    store = LocalImageStore(tmp_path, max_files=10, ttl_seconds=3600)
    assert store.check() is None and list(tmp_path.iterdir()) == []  # the start-up probe leaves nothing

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])  # part of it was written when the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(StorageFailed, match=r"^Could not store the image for response_format=url \(No space left on device\)"):
        store.save(b"0123456789", "png")
    assert list(tmp_path.iterdir()) == []
    assert store.check() == (
        f"Could not store the image for response_format=url (No space left on device: {tmp_path}); "
        "response_format=b64_json returns it without storing it"
    )
    monkeypatch.undo()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert f"(Not a directory: {blocked / 'images'})" in LocalImageStore(blocked / "images", 10, 3600).check()


def test_an_expired_image_is_neither_served_nor_kept_on_a_quiet_store(tmp_path):
    """The TTL holds without new images to prune with: an expired file is not served and is deleted when asked
    for, and a store's start-up check deletes what expired (or is over the bound) while the server was down."""
    store = LocalImageStore(tmp_path, max_files=2, ttl_seconds=50)
    old, kept = store.save(b"o", "png"), store.save(b"k", "png")
    os.utime(tmp_path / old, (time.time() - 100, time.time() - 100))
    assert store.open(old) is None and store.path(old) is None
    assert not (tmp_path / old).exists()
    assert store.open(kept).file.read() == b"k"
    names = [kept]
    for i, age in enumerate((300, 10, 20, 30)):  # what a server left: one expired, one over the bound
        name = f"{i:032x}.png"
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
        names.append(name)
    assert LocalImageStore(tmp_path, max_files=2, ttl_seconds=50).check() is None
    assert {p.name for p in tmp_path.iterdir()} == {kept, names[2]}


def test_a_response_keeps_all_its_images_however_small_the_bound(tmp_path):
    """``n`` images in one url response, with ``QIS_IMAGE_MAX_FILES`` below ``n``: none of them is deleted before
    the client has the URLs (the older images go instead)."""
    store = LocalImageStore(tmp_path, max_files=2, ttl_seconds=3600)
    older = store.save(b"old", "png")
    os.utime(tmp_path / older, (time.time() - 10, time.time() - 10))  # older, whatever the clock's resolution
    response = frozenset[str]()
    for i in range(4):
        response |= {store.save(bytes([i]), "png", response)}
    assert {p.name for p in tmp_path.iterdir()} == response and older not in response
    later = store.save(b"later", "png")  # the bound applies again to the next response
    assert len(list(tmp_path.iterdir())) == 2 and (tmp_path / later).exists()


def test_only_regular_files_are_served_never_a_link(tmp_path):
    """A link with a stored image's name (someone with write access to the folder) is not followed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not an image")
    store = LocalImageStore(tmp_path / "images", max_files=10, ttl_seconds=3600)
    assert store.check() is None
    link = tmp_path / "images" / f"{'a' * 32}.png"
    link.symlink_to(secret)
    assert store.path(link.name) is None and store.open(link.name) is None
    assert secret.exists()


def test_pruning_never_fails_a_save_a_read_or_the_start(tmp_path, monkeypatch):
    """A file that goes between the listing and its ``stat`` (an expired one deleted by a read on another thread,
    another server pruning a shared folder) is passed over, and a folder that cannot be listed is logged: the
    ``FileNotFoundError`` or ``PermissionError`` reached the save (a 500 for an image that was stored), the read
    and the start-up check."""
    store = LocalImageStore(tmp_path, max_files=1, ttl_seconds=50)
    kept = store.save(b"k", "png")
    gone = tmp_path / f"{'0' * 32}.png"
    gone.write_bytes(b"x")
    listing = os.scandir

    def racing(path):
        entries = list(listing(path))
        gone.unlink(missing_ok=True)  # deleted right after the listing
        return iter(entries)

    monkeypatch.setattr(os, "scandir", racing)
    assert store.check() is None
    assert store.open(kept).file.read() == b"k"
    store.save(b"n", "png")

    def refused(path):
        raise PermissionError(13, "Permission denied")

    calls: list[str] = []
    monkeypatch.setattr(os, "scandir", lambda path: calls.append(path) or refused(path))
    store._count = None  # the next call scans
    assert store.check() == f"cannot list {tmp_path} to delete old images (Permission denied): the folder grows unbounded"
    store.save(b"m", "png")
    store.open(kept)
    assert len(calls) == 1  # not a scan (and a warning) per request: the next when one is due


def test_the_stores_calls_run_with_the_requests_context_and_writes_apart_from_reads():
    """Log lines of a store call carry the request's id, as with ``asyncio.to_thread`` before; reads (``GET
    /images``, no key needed) never take the threads that store images."""
    import asyncio
    import threading

    from qwen_image_server.api.security import request_id_var
    from qwen_image_server.storage import in_store_thread

    def where() -> tuple[str, str]:
        return request_id_var.get(), threading.current_thread().name

    async def run() -> list[tuple[str, str]]:
        request_id_var.set("req-7")
        return [await in_store_thread(where), await in_store_thread(where, write=True)]

    (read_id, read_thread), (write_id, write_thread) = asyncio.run(run())
    assert read_id == write_id == "req-7"
    assert read_thread.startswith("image-store-read") and write_thread.startswith("image-store-write")


def test_reading_keeps_a_response_over_the_bound_and_links_do_not_count(tmp_path):
    """A response that kept more images than the bound (``n`` above it) keeps them when its client fetches them
    (the first GET pruned the store down to the bound: half the URLs were 404s at once); and links with images'
    names, never served, take no place in the bound (three links pushed out three real images)."""
    store = LocalImageStore(tmp_path, max_files=2, ttl_seconds=3600)
    response = frozenset[str]()
    for i in range(4):
        response |= {store.save(bytes([i]), "png", response)}
    for name in sorted(response):
        assert store.open(name).file.read() is not None, name
    assert {p.name for p in tmp_path.iterdir()} == response
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x").write_bytes(b"x")
    for i in range(3):
        (tmp_path / f"{i:032x}.png").symlink_to(other / "x")
    store._count = None  # the next save scans
    last = store.save(b"n", "png")
    real = {p.name for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    assert len(real) == 2 and last in real
