"""Components shared by the models of one process: one copy of a text encoder or VAE that several models use.

Qwen-Image and Qwen-Image-Edit(-2509) ship the same Qwen2.5-VL-7B text encoder (15 GB
in bf16) and the same VAE. Loaded by two pipelines in one process they would take that
memory twice. ``ComponentCache`` keeps what this process loaded, keyed by what the
component *is*: the content hash of its weight files and config (``fingerprint``) and
how it is held (dtype, device, FP8 storage, offload). A second model whose component has
the same key gets the same module object: the same tensor storage.

Only the text encoder and the VAE are shared. The transformer is what the speed settings
change per model (LoRA adapters, FP8 linear layers, compilation, cache hooks), and model
or sequential CPU offload keep their hook chains per pipeline, so a pipeline under those
modes shares nothing.

Content hashes: a hub cache's snapshot files link to blobs named by their SHA-256, which
is read from the link, for free; other files are hashed once and the hash is kept in
``~/.cache/qwen-image-server/fingerprints.json`` by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SHAREABLE = ("text_encoder", "vae")
#: Offload modes whose hooks live on the modules themselves (installed once, whichever pipeline uses them).
SHARING_OFFLOADS = ("none", "text-encoder", "group")
_BLOB = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 16 * 1024 * 1024
_lock = threading.Lock()


def hashes_file() -> Path:
    """Where file hashes are kept between starts (``QIS_FINGERPRINT_CACHE`` overrides)."""
    override = os.environ.get("QIS_FINGERPRINT_CACHE")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwen-image-server")) / "fingerprints.json"


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content: a hub blob's own name, else computed once and remembered."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        if _BLOB.match(target.name) and target.parent.name == "blobs":
            return target.name
    real = path.resolve()
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    store = hashes_file()
    with _lock:
        known = _read(store)
        if key in known:
            return known[key]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        known = _read(store)
        known[key] = value
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(store)
        except OSError as exc:  # a read-only home: hash again next time
            log.debug("cannot keep file hashes in %s: %s", store, exc)
    return value


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def fingerprint(folder: Path) -> str | None:
    """The content hash of a component folder: its config and weight files. ``None`` when it has no weight files."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".json"))
    )
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_hash(path)}\n".encode())
    return digest.hexdigest()


@dataclass
class ComponentCache:
    """The shareable components loaded in this process, by content and treatment; see the module docstring."""

    modules: dict[tuple, object] = field(default_factory=dict)
    #: ``{model id: [component names it got from another model]}``, for logs and the worker's ready info.
    reused: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def key(folder: Path | None, name: str, *, dtype: str, device: str, weights_dtype: str, offload: str) -> tuple | None:
        """What makes two loaded components interchangeable; ``None`` when this one is never shared."""
        if folder is None or not folder.is_dir():
            return None
        return ComponentCache.content_key(
            fingerprint(folder), name, dtype=dtype, device=device, weights_dtype=weights_dtype, offload=offload
        )

    @staticmethod
    def content_key(content: object, name: str, *, dtype: str, device: str, weights_dtype: str, offload: str) -> tuple | None:
        """The key of a component whose weights ``content`` identifies (a files' hash, or a ``random:`` source's
        architecture and seed) held this way; ``None`` when it is never shared."""
        if content is None or name not in SHAREABLE or offload not in SHARING_OFFLOADS:
            return None
        fp8 = weights_dtype == "fp8" and name == "text_encoder"
        offloaded = name == "text_encoder" and offload in ("text-encoder", "group")
        return (name, content, dtype, device, fp8, offloaded)

    def get(self, model: str, key: tuple | None):
        """The component another model of this process loaded with the same key, else ``None``."""
        module = self.modules.get(key) if key is not None else None
        if module is not None:
            self.reused.setdefault(model, []).append(key[0])  # type: ignore[index]  # not None: found
            log.info("model %s shares the %s already loaded in this process", model, key[0])  # type: ignore[index]
        return module

    def put(self, key: tuple | None, module) -> None:
        if key is not None:
            self.modules.setdefault(key, module)


def component_folder(source: str, revision: str | None, name: str) -> Path | None:
    """The folder of component ``name`` of a model folder or hub id (fetched like diffusers would, else found in the
    hub cache); ``None`` for ``random:`` sources or when it cannot be found."""
    if source.startswith("random:"):
        return None
    local = Path(source) / name
    if Path(source).is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, allow_patterns=[f"{name}/*"])) / name
    except Exception as exc:  # offline without a cache, a gated repo...: load it unshared
        log.info("cannot locate %s of %s to compare it with other models: %s", name, source, exc)
        return None


def cached_component_folder(source: str, revision: str | None, name: str) -> Path | None:
    """Like ``component_folder``, without downloading: a model folder's, else the hub cache's (for the planner)."""
    if source.startswith("random:"):
        return None
    if Path(source).is_dir():
        return Path(source) / name
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, allow_patterns=[f"{name}/*"], local_files_only=True)) / name
    except Exception:  # not in the cache: counted whole
        return None
