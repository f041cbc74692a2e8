"""Where ``response_format=url`` images live: a local directory, bounded in count and age.

File names are generated here (random hex + extension); nothing a client sends
ever becomes part of a path, and only names of that shape are ever served.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

NAME_PATTERN = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class LocalImageStore:
    """Stores images in ``directory``; keeps at most ``max_files``, none older than ``ttl_seconds``."""

    def __init__(self, directory: Path, max_files: int, ttl_seconds: float):
        self.directory = Path(directory)
        self.max_files = max_files
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()

    def save(self, data: bytes, extension: str) -> str:
        """Write ``data`` under a new generated name and return the name (blocking: call in a thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_hex(16)}.{extension}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)
        self._prune()
        return name

    def path(self, name: str) -> Path | None:
        """The file of a stored image, or None for any name this store did not generate or has deleted."""
        if not NAME_PATTERN.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def _prune(self) -> None:
        with self._lock:
            try:
                entries = [e for e in os.scandir(self.directory) if NAME_PATTERN.match(e.name)]
            except FileNotFoundError:
                return
            now = time.time()
            dated = sorted(((e.stat().st_mtime, e.path) for e in entries), reverse=True)
            for index, (mtime, path) in enumerate(dated):
                if index >= self.max_files or now - mtime > self.ttl_seconds:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
