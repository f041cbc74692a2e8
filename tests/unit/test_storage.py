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
