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
