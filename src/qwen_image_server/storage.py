"""Where ``response_format=url`` images live: a local directory (default; a shared
mount in a cluster), bounded in count and age, or an S3-compatible object store.

Names are generated here (random hex + extension); nothing a client sends ever
becomes part of a path or key, and only names of that shape are ever served.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from .errors import StorageFailed

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)\Z")  # ``match``: the whole name (``$`` let a newline end it)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Seconds a folder store's write probe (``unusable``) is taken as true.
PROBE_SECONDS = 5.0


def new_name(extension: str) -> str:
    return f"{secrets.token_hex(16)}.{extension}"


#: The threads that write stored images and those that read them (the store's blocking calls): a store that hangs (an
#: object store that stopped answering, a stalled network mount) holds only these, never the threads uploads are
#: decoded on; and the reads of ``GET /images/{name}``, which need no API key, never take the threads that store the
#: images of the requests that have one.
_WRITES = ThreadPoolExecutor(max_workers=8, thread_name_prefix="image-store-write")
_READS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="image-store-read")


T = TypeVar("T")


async def in_store_thread(call: Callable[..., T], *args, write: bool = False) -> T:
    """``call(*args)`` on one of the store's reading threads (writing ones: ``write``), awaited; with the caller's
    context (its request id, for the log lines of the call), as ``asyncio.to_thread`` gives it."""
    context = contextvars.copy_context()
    pool = _WRITES if write else _READS
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(context.run, call, *args))


def discard_later(store: ImageStore, names: frozenset[str]) -> None:
    """Delete ``names`` from ``store`` on its writing threads, not awaited (the images of a response that failed)."""
    for name in names:
        _WRITES.submit(contextvars.copy_context().run, store.delete, name)


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
    """Stores encoded images under generated names (blocking methods: call them with ``in_store_thread``)."""

    def save(self, data: bytes, extension: str, keep: frozenset[str] = frozenset()) -> str:
        """Store ``data``; return its generated name. ``StorageFailed`` when it cannot. Images named in ``keep`` (the
        same response's, stored before this one) stay, whatever a bound on the store's size says."""

    def check(self) -> str | None:
        """Why images cannot be stored (said at start-up), or None when a probe could be stored."""

    def open(self, name: str) -> StoredImage | None:
        """The stored image opened for reading, or None for a name this store did not generate or no longer has.
        ``StorageFailed`` when the store cannot be read."""

    def public_url(self, name: str) -> str | None:
        """A URL clients can fetch directly (a presigned one), or None to serve it at /images/{name}."""

    def delete(self, name: str) -> None:
        """Delete a stored image (one of a response that failed after storing it); a failure is logged, not raised."""

    def unusable(self) -> str | None:
        """Why an image could not be stored now, in a client's words (no path), or None: asked before a url request
        runs, so that one whose image cannot be kept is refused before its job takes a GPU, not after."""


class LocalImageStore:
    """Stores images in ``directory``; keeps at most ``max_files``, none older than ``ttl_seconds``."""

    def __init__(self, directory: Path, max_files: int, ttl_seconds: float):
        self.directory = Path(directory)
        self.max_files = max_files
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._count: int | None = None  # files kept, known after the first scan
        self._scanned_at = 0.0
        self.list_problem: str | None = None  # why the last scan could not list the folder (logged once, when it changes)
        self._probed: tuple[float, str | None] = (-PROBE_SECONDS, None)  # when ``unusable`` last probed, and what it saw

    def save(self, data: bytes, extension: str, keep: frozenset[str] = frozenset()) -> str:
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
        self._prune(added=1, keep=keep | {name})
        return name

    def check(self) -> str | None:
        """Also deletes what expired or is over the bound while the server was down (the first scan)."""
        failed = self._write_probe()
        if failed is not None:  # for the server log: the folder is named (a client's message never names it)
            return StorageFailed(f"{failed.strerror or type(failed).__name__}: {self.directory}").message
        self._prune()
        if self.list_problem:  # stored images could not be counted: the bound and the TTL would not hold
            return f"cannot list {self.directory} to delete old images ({self.list_problem}): the folder grows unbounded"
        return None

    def path(self, name: str) -> Path | None:
        """The file of a stored image, or None for any name this store did not generate, has deleted, or keeps past
        its time (deleted now: a quiet server stores nothing that would prune it): only regular files, no links."""
        if not NAME_PATTERN.match(name):
            return None
        path = self.directory / name
        try:
            info = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        if time.time() - info.st_mtime > self.ttl_seconds:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return path

    def open(self, name: str) -> StoredImage | None:
        # expired files go even when no image is stored (a scan at most every tenth of the TTL); the bound is the
        # saves' to keep: a read right after a response kept more than it (n above it) must not take its images
        self._prune(expired_only=True)
        path = self.path(name)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # pruned meanwhile, or replaced by a link
            return None
        file = os.fdopen(fd, "rb")
        return StoredImage(file, os.fstat(fd).st_size)

    def public_url(self, name: str) -> str | None:
        return None

    def unusable(self) -> str | None:
        # a probe written at most every PROBE_SECONDS (a folder fixed meanwhile is seen again within them)
        now = time.monotonic()
        if now - self._probed[0] >= PROBE_SECONDS:
            failed = self._write_probe()
            self._probed = (now, None if failed is None else failed.strerror or type(failed).__name__)
        return self._probed[1]

    def _write_probe(self) -> OSError | None:
        """Make the folder if need be and write (then delete) an empty file in it: the error, or None."""
        probe = self.directory / f".probe-{secrets.token_hex(8)}.tmp"  # never a served name, never counted
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
        except OSError as exc:
            return exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def delete(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            return
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not delete image %s of a failed response from %s: %s", name, self.directory, exc)
            return
        with self._lock:
            if self._count:
                self._count -= 1

    def _prune(self, added: int = 0, keep: frozenset[str] = frozenset(), expired_only: bool = False) -> None:
        """Delete the oldest files over the bound (not with ``expired_only``) and the expired ones, never those in
        ``keep``; scans only when the bound is passed (``added`` files since the last scan) or an expiry check is
        due. Only regular files count (a link with an image's name is neither served nor counted)."""
        with self._lock:
            if self._count is not None:
                self._count += added
                expiry_due = time.time() - self._scanned_at > min(self.ttl_seconds / 10, 60.0)
                if (self._count <= self.max_files or expired_only) and not expiry_due:
                    return
            # Pruning never fails what called it (a save, a read, the start): a folder that cannot be listed is logged,
            # and a file that goes meanwhile (an expired one deleted by a read, another server on a shared mount) is
            # passed over.
            now = self._scanned_at = time.time()  # (also after a failed listing: the next try waits as long)
            try:
                entries = [e for e in os.scandir(self.directory) if NAME_PATTERN.match(e.name)]
            except FileNotFoundError:
                return
            except OSError as exc:
                self._count = self._count or 0  # the next scan when one is due, not on every call
                problem = exc.strerror or type(exc).__name__
                if problem != self.list_problem:
                    log.warning("could not list %s to delete old images: %s", self.directory, exc)
                    self.list_problem = problem
                return
            self.list_problem = None
            dated = []
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        dated.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name, entry.path))
            dated.sort(reverse=True)
            kept = 0
            bound = len(dated) if expired_only else self.max_files
            for mtime_ns, name, path in dated:
                if name in keep or (kept < bound and now - mtime_ns / 1e9 <= self.ttl_seconds):
                    kept += 1
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._count = kept


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
        timeout: float = 10.0,
    ):
        import boto3  # optional dependency: pip install 'qwen-image-server[s3]'
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.presign = presign
        self.presign_expiry = presign_expiry
        # botocore's own defaults (60 s to connect, 60 s between bytes, up to 5 legacy attempts) held a request on a
        # bucket that stopped answering for over 3 minutes. Presigned URLs are signed with SigV4, which every
        # region and S3-compatible store accepts (botocore picks the deprecated SigV2 for some regions).
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "total_max_attempts": 2},  # the first try and one more
            signature_version="s3v4",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        named = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if presign and endpoint_url is None and not named and self.client.meta.region_name == "us-east-1":
            log.warning(
                "presigned URLs are signed (SigV4) for us-east-1, as no region is set: a bucket in another region "
                "refuses them; set QIS_S3_REGION to the bucket's region"
            )
        self._access_denied_logged = False

    def save(self, data: bytes, extension: str, keep: frozenset[str] = frozenset()) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        name = new_name(extension)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, ContentType=MEDIA_TYPES[extension])
        except (ClientError, BotoCoreError) as exc:
            log.error("could not store an image in bucket %s: %s", self.bucket, exc)
            raise StorageFailed(_s3_reason(exc, "the bucket refused it")) from None
        return name

    def check(self) -> str | None:
        return None  # a probe object would stay in the bucket; a failed upload is reported per request

    def open(self, name: str) -> StoredImage | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not NAME_PATTERN.match(name):
            return None
        try:
            stored = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except (ClientError, BotoCoreError) as exc:
            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            if code in ("NoSuchKey", "404"):
                return None  # never stored, or expired by the bucket's lifecycle rules
            if code in ("AccessDenied", "403"):
                # What S3 answers for a key it does not have when the credentials may not list the bucket (a
                # least-privilege policy): taken as a missing image, logged without alarm (anyone may ask for names)
                level = logging.INFO if self._access_denied_logged else logging.WARNING  # the first: maybe a policy
                self._access_denied_logged = True
                log.log(level, "bucket %s refused image %s (AccessDenied): answered as not found (a missing key, "
                        "or credentials without s3:GetObject)", self.bucket, name)  # fmt: skip
                return None
            log.error("could not read image %s from bucket %s: %s", name, self.bucket, exc)
            raise StorageFailed(_s3_reason(exc, "the bucket refused to send it"), reading=True) from None
        return StoredImage(stored["Body"], int(stored["ContentLength"]))

    def public_url(self, name: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not self.presign:
            return None
        try:  # may fetch credentials (instance metadata, STS): blocking, on a store thread
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + name}, ExpiresIn=self.presign_expiry
            )
        except (ClientError, BotoCoreError) as exc:
            log.error("could not presign image %s of bucket %s: %s", name, self.bucket, exc)
            raise StorageFailed(_s3_reason(exc, "the bucket's credentials failed")) from None

    def unusable(self) -> str | None:
        return None  # known only by storing (a probe object would stay in the bucket)

    def delete(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not NAME_PATTERN.match(name):
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not delete image %s of a failed response from bucket %s: %s", name, self.bucket, exc)


def _s3_reason(exc: Exception, refused: str) -> str:
    """A client's short reason for an object store's error: its error code, never the bucket's name."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as ReachError

    if isinstance(exc, ClientError):
        return f"{refused}: {exc.response.get('Error', {}).get('Code', 'error')}"
    if isinstance(exc, ReachError | HTTPClientError):  # no connection, a timeout, a connection cut
        return f"the object store could not be reached: {type(exc).__name__}"
    return f"the object store's client failed: {type(exc).__name__}"  # no credentials, a setting it refused


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
            timeout=settings.s3_timeout,
        )
    return LocalImageStore(settings.image_output_dir, settings.image_max_files, settings.image_ttl_seconds)
