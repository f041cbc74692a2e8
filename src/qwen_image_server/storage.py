"""Where ``response_format=url`` images live: a local directory (default; a shared
mount in a cluster), bounded in count and age, or an S3-compatible object store.

Names are generated here (random hex + extension); nothing a client sends ever
becomes part of a path or key, and only names of that shape are ever served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import StorageFailed

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def new_name(extension: str) -> str:
    return f"{secrets.token_hex(16)}.{extension}"


class Readable(Protocol):
    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class StoredImage:
    """A stored image opened for reading: ``size`` bytes from ``file``, which the reader closes. An open local file
    stays readable when the store prunes it meanwhile."""

    file: Readable
    size: int


class ImageStore(Protocol):
    """Stores encoded images under generated names (blocking methods: call them in a thread)."""

    def save(self, data: bytes, extension: str) -> str:
        """Store ``data``; return its generated name. ``StorageFailed`` when it cannot."""

    def check(self) -> str | None:
        """Why images cannot be stored (said at start-up), or None when a probe could be stored."""

    def open(self, name: str) -> StoredImage | None:
        """The stored image opened for reading, or None for a name this store did not generate or no longer has."""

    def public_url(self, name: str) -> str | None:
        """A URL clients can fetch directly (a presigned one), or None to serve it at /images/{name}."""


class LocalImageStore:
    """Stores images in ``directory``; keeps at most ``max_files``, none older than ``ttl_seconds``."""

    def __init__(self, directory: Path, max_files: int, ttl_seconds: float):
        self.directory = Path(directory)
        self.max_files = max_files
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._count: int | None = None  # files kept, known after the first scan
        self._scanned_at = 0.0

    def save(self, data: bytes, extension: str) -> str:
        """Write ``data`` under a new generated name and return the name (blocking: call in a thread). A write that
        fails (a full disk) leaves no partial file behind."""
        name = new_name(extension)
        tmp = self.directory / f".{name}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("could not store an image in %s: %s", self.directory, exc)
            raise StorageFailed(exc.strerror or type(exc).__name__) from None
        self._prune()
        return name

    def check(self) -> str | None:
        probe = self.directory / f".probe-{secrets.token_hex(8)}.tmp"  # never a served name, never counted
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
        except OSError as exc:  # for the server log: the folder is named (a client's message never names it)
            return StorageFailed(f"{exc.strerror or type(exc).__name__}: {self.directory}").message
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def path(self, name: str) -> Path | None:
        """The file of a stored image, or None for any name this store did not generate or has deleted."""
        if not NAME_PATTERN.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def open(self, name: str) -> StoredImage | None:
        path = self.path(name)
        try:
            file = path.open("rb") if path else None
        except FileNotFoundError:  # pruned meanwhile
            return None
        return StoredImage(file, os.fstat(file.fileno()).st_size) if file else None

    def public_url(self, name: str) -> str | None:
        return None

    def _prune(self) -> None:
        """Delete the oldest and expired files; scans only when the bound or an expiry check is due."""
        with self._lock:
            if self._count is not None:
                self._count += 1
                expiry_due = time.time() - self._scanned_at > min(self.ttl_seconds / 10, 60.0)
                if self._count <= self.max_files and not expiry_due:
                    return
            try:
                entries = [e for e in os.scandir(self.directory) if NAME_PATTERN.match(e.name)]
            except FileNotFoundError:
                return
            now = self._scanned_at = time.time()
            dated = sorted(((e.stat().st_mtime, e.path) for e in entries), reverse=True)
            self._count = min(len(dated), self.max_files)
            for index, (mtime, path) in enumerate(dated):
                if index >= self.max_files or now - mtime > self.ttl_seconds:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


class S3ImageStore:
    """An S3-compatible bucket (AWS, MinIO, Ceph...). Expiry is the bucket's lifecycle rules' job."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str = "",
        presign: bool = False,
        presign_expiry: int = 3600,
    ):
        import boto3  # optional dependency: pip install 'qwen-image-server[s3]'

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.presign = presign
        self.presign_expiry = presign_expiry
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    def save(self, data: bytes, extension: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        name = new_name(extension)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, ContentType=MEDIA_TYPES[extension])
        except (ClientError, BotoCoreError) as exc:
            log.error("could not store an image in bucket %s: %s", self.bucket, exc)
            if isinstance(exc, ClientError):
                raise StorageFailed(f"the bucket refused it: {exc.response.get('Error', {}).get('Code', 'error')}") from None
            raise StorageFailed(f"the object store could not be reached: {type(exc).__name__}") from None
        return name

    def check(self) -> str | None:
        return None  # a probe object would stay in the bucket; a failed upload is reported per request

    def open(self, name: str) -> StoredImage | None:
        if not NAME_PATTERN.match(name):
            return None
        try:
            stored = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except self.client.exceptions.NoSuchKey:
            return None
        return StoredImage(stored["Body"], int(stored["ContentLength"]))

    def public_url(self, name: str) -> str | None:
        if not self.presign:
            return None
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + name}, ExpiresIn=self.presign_expiry
        )


def make_store(settings) -> ImageStore:
    """The store the settings ask for: S3 when a bucket is set, else the local directory."""
    if settings.s3_bucket:
        return S3ImageStore(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None,
            prefix=settings.s3_prefix,
            presign=settings.s3_presign,
            presign_expiry=settings.s3_presign_expiry,
        )
    return LocalImageStore(settings.image_output_dir, settings.image_max_files, settings.image_ttl_seconds)
