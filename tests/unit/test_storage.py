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
