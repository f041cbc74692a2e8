"""A model's tensors, sized from the headers of its safetensors files without reading any weight.

The 8-byte length and the JSON header of each file give the dtype and shape of every
tensor: of a local folder, of the hub cache's snapshot, or, online, of the hub's files
read by range requests (``huggingface_hub``'s ``parse_safetensors_file_metadata``).
No torch here.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from .spec import ModelSpec

MIB = 1024**2
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
#: Qwen-Image's transformer width (24 heads x 128) and Qwen2.5-VL-7B's sizes: used when a config cannot be read.
REFERENCE_INNER_DIM = 3072
REFERENCE_LAYERS = 60  # Qwen-Image's transformer blocks
REFERENCE_TEXT_ENCODER = {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064}


class UnknownFootprint(Exception):
    """The model's weights cannot be sized from its files (the message says why); nothing is blocked."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors header: what is needed to size it in another dtype."""

    name: str
    dtype: str
    numel: int
    ndim: int


@dataclass(frozen=True)
class ModelTensors:
    """The tensors of a model's components, and the config values the working memory depends on."""

    components: dict[str, tuple[Tensor, ...]]
    inner_dim: int = REFERENCE_INNER_DIM
    layers: int = REFERENCE_LAYERS  # the transformer's blocks
    text_encoder: dict = field(default_factory=lambda: dict(REFERENCE_TEXT_ENCODER))
    origin: str = "safetensors headers"
    counts_only: bool = False  # parameter counts without tensor names: no per-block figures


# --- reading headers -------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, dict]:
    """Tensor name → ``{"dtype", "shape", ...}`` from a safetensors file's header (its first 8 bytes give the JSON
    header's length; the ``__metadata__`` entry is left out). ValueError, saying what is wrong, when the file is not
    a safetensors file; OSError when it cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError("no safetensors header at its start")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("its header is not safetensors JSON") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(_is_tensor_entry(v) for v in tensors.values()):
        raise ValueError("its header is not safetensors JSON")
    return tensors


def whole_number(value: object) -> TypeGuard[int]:
    """An int that is not a bool (JSON's true and false load as bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_size(value: object) -> TypeGuard[int]:
    """A whole number above 0: what a config's sizes (heads, layers, widths) must be."""
    return whole_number(value) and value > 0


def _is_tensor_entry(info: object) -> bool:
    """A header entry with a dtype name and a shape of sizes."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not isinstance(info.get("shape"), list):
        return False
    return all(whole_number(n) and n >= 0 for n in info["shape"])


def tensors_of_header(header: dict[str, dict]) -> list[Tensor]:
    """``Tensor`` entries of a header read by ``read_header``."""
    return [Tensor(name, info["dtype"], _numel(info["shape"]), len(info["shape"])) for name, info in header.items()]


def _file_tensors(path: Path) -> list[Tensor]:
    """The tensors of one weights file; UnknownFootprint, naming the file, when it is not a readable safetensors file."""
    try:
        return tensors_of_header(read_header(path))
    except (OSError, ValueError) as exc:
        raise UnknownFootprint(f"{path}: not a safetensors file ({exc})") from None


def weight_files(names: list[str]) -> list[str]:
    """The files diffusers loads from one component folder: the non-variant index's shards, else its single file.

    ``names`` are the folder's file names; variants such as ``model.fp16.safetensors`` are left out
    unless nothing else is there.
    """
    for stem in _WEIGHT_STEMS:
        if f"{stem}.safetensors.index.json" in names:
            return [f"{stem}.safetensors.index.json"]
        if f"{stem}.safetensors" in names:
            return [f"{stem}.safetensors"]
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    return indexes[:1] or sorted(n for n in names if n.endswith(".safetensors"))


def _component_names(folder: Path) -> list[str]:
    return _components_of(_json(folder / "model_index.json"))


def _components_of(index: dict) -> list[str]:
    """The components a ``model_index.json`` names with a library (``"vae": ["diffusers", "..."]``)."""
    return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list) and value and value[0]]


def _json(path: Path) -> dict:
    """A JSON object file's content; {} when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sizes(config: dict, keys) -> dict[str, int] | None:
    """``config``'s values of ``keys`` when each is a positive whole number; None otherwise."""
    out: dict[str, int] = {}
    for key in keys:
        value = config.get(key)
        if not positive_size(value):
            return None
        out[key] = value
    return out


def _configs(transformer: dict, text_encoder: dict) -> dict:
    """``inner_dim``, the transformer's ``layers`` and the text encoder's sizes from the two configs, reference values
    where missing or not sizes."""
    out: dict = {}
    heads = _sizes(transformer, ("num_attention_heads", "attention_head_dim"))
    if heads:
        out["inner_dim"] = heads["num_attention_heads"] * heads["attention_head_dim"]
    if positive_size(transformer.get("num_layers")):
        out["layers"] = transformer["num_layers"]
    text = text_encoder.get("text_config")
    text_sizes = _sizes(text if isinstance(text, dict) and text else text_encoder, REFERENCE_TEXT_ENCODER)
    if text_sizes:
        out["text_encoder"] = text_sizes
    return out


def _shards(index: Path) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` names; UnknownFootprint when it is not such an index."""
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(s, str) for s in weight_map.values()):
        raise UnknownFootprint(f"{index}: not a safetensors index (no weight_map of tensor names to files)")
    return sorted(set(weight_map.values()))


def read_folder(folder: Path, origin: str = "safetensors headers") -> ModelTensors:
    """The tensors of a diffusers folder (a local one or a hub snapshot), from headers only."""
    components: dict[str, tuple[Tensor, ...]] = {}
    for name in _component_names(folder):
        sub = folder / name
        if not sub.is_dir():
            continue
        files = weight_files([p.name for p in sub.iterdir()])
        tensors: list[Tensor] = []
        for file in files:
            if file.endswith(".index.json"):
                shards = _shards(sub / file)
                missing = [s for s in shards if not (sub / s).is_file()]
                if missing:
                    raise UnknownFootprint(f"{sub}: shards of {file} are missing ({', '.join(missing[:3])})")
                for shard in shards:
                    tensors += _file_tensors(sub / shard)
            else:
                tensors += _file_tensors(sub / file)
        if tensors:
            components[name] = tuple(tensors)
    if not components:
        raise UnknownFootprint(f"{folder}: no safetensors weights found")
    configs = _configs(_json(folder / "transformer" / "config.json"), _json(folder / "text_encoder" / "config.json"))
    return ModelTensors(components, origin=origin, **configs)


def read_hub(repo: str, revision: str | None = None, cache_dir: str | Path | None = None) -> ModelTensors:
    """The tensors of a hub model: from the hub cache's snapshot when it holds the weights, else online headers."""
    from huggingface_hub import constants, snapshot_download

    try:
        found = snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=["model_index.json"]
        )
        snapshot = Path(found)
    except Exception:
        snapshot = None
    if snapshot is not None and (snapshot / "model_index.json").is_file():
        try:
            return read_folder(snapshot, origin="safetensors headers (hub cache)")
        except UnknownFootprint:
            pass  # a partial download: try the hub itself
    if constants.HF_HUB_OFFLINE:
        raise UnknownFootprint(f"{repo}: offline, and the hub cache does not hold its weights")
    try:
        return _read_hub_online(repo, revision)
    except UnknownFootprint:
        raise
    except Exception as exc:  # network, auth, missing files
        raise UnknownFootprint(f"{repo}: cannot read its safetensors headers from the hub: {type(exc).__name__}: {exc}") from None


def _read_hub_online(repo: str, revision: str | None, timeout: float = 5.0) -> ModelTensors:
    """Headers by HTTP range requests (a few kilobytes per file), configs as small downloads."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    files = api.list_repo_files(repo, revision=revision)
    index = json.loads(Path(hf_hub_download(repo, "model_index.json", revision=revision)).read_text(encoding="utf-8"))
    names = _components_of(index if isinstance(index, dict) else {})
    paths: dict[str, list[str]] = {}
    for name in names:
        chosen = weight_files([f.split("/", 1)[1] for f in files if f.startswith(f"{name}/") and f.count("/") == 1])
        for file in chosen:
            if file.endswith(".index.json"):
                index_file = Path(hf_hub_download(repo, f"{name}/{file}", revision=revision))
                weight_map = json.loads(index_file.read_text()).get("weight_map", {})
                paths.setdefault(name, []).extend(f"{name}/{shard}" for shard in sorted(set(weight_map.values())))
            else:
                paths.setdefault(name, []).append(f"{name}/{file}")

    def header(path: str) -> list[Tensor]:
        meta = api.parse_safetensors_file_metadata(repo, path, revision=revision, timeout=timeout)
        return [Tensor(t, info.dtype, _numel(info.shape), len(info.shape)) for t, info in meta.tensors.items()]

    with ThreadPoolExecutor(max_workers=8) as pool:  # a few kilobytes each: latency, not bandwidth
        headers = {name: list(pool.map(header, files_of)) for name, files_of in paths.items()}
    components = {name: tuple(t for part in parts for t in part) for name, parts in headers.items() if parts}
    if not components:
        raise UnknownFootprint(f"{repo}: no safetensors weights on the hub")

    def config(component: str) -> dict:
        try:
            return json.loads(Path(hf_hub_download(repo, f"{component}/config.json", revision=revision)).read_text())
        except Exception:
            return {}

    return ModelTensors(components, origin="safetensors headers (hub)", **_configs(config("transformer"), config("text_encoder")))


def _numel(shape) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel


def from_counts(counts: dict) -> ModelTensors:
    """Parameter counts per component (``{"transformer": 20.4e9, ...}``), for sources without files."""
    try:
        components: dict[str, tuple[Tensor, ...]] = {
            name: (Tensor(name, "BF16", int(float(n)), 2),) for name, n in counts.items()
        }
    except (TypeError, ValueError):
        raise UnknownFootprint(f"parameter_counts must map components to numbers, got {counts!r}") from None
    return ModelTensors(components, origin="parameter counts", counts_only=True)


def _packaged_random_tensors(source: str) -> ModelTensors | None:
    """A ``random:`` source's tensors from the packaged table (``random_source.tensor_table``), or None."""
    from .random_source import parse_random_source, tensor_table

    random = parse_random_source(source)
    table = tensor_table(random)
    if table is None:
        return None
    components = {name: tuple(Tensor(*row) for row in rows) for name, rows in table.items()}
    return architecture_tensors(random.architecture(), components)


def architecture_tensors(arch: dict, components: dict[str, tuple[Tensor, ...]]) -> ModelTensors:
    """A ``random:`` source's tensors (from its packaged table or its modules built on the meta device), with its
    architecture's config values for the working-memory estimate."""
    return ModelTensors(components, origin="architecture (random weights)", **_configs(arch["transformer"], arch["text_encoder"]))


def read_tensors(spec: ModelSpec, cache_dir: str | Path | None = None) -> ModelTensors:
    """The tensors of a served model, from wherever its files are; ``UnknownFootprint`` when that cannot be done.

    A ``random:ORG/NAME`` source has no files: its tensors come from its packaged architecture's tensor table, or,
    with overrides, from the architecture built on the meta device (``random_arch.model_tensors``), unless its spec
    gives ``options["parameter_counts"]``.
    """
    if spec.source.startswith("random:"):
        counts = spec.options.get("parameter_counts")
        if counts:
            return from_counts(counts)
        from .spec import ModelConfigError

        try:
            packaged = _packaged_random_tensors(spec.source)
            if packaged is not None:
                return packaged
            from .random_arch import model_tensors

            return model_tensors(spec.source)
        except ModelConfigError as exc:
            raise UnknownFootprint(f"{exc} (and its spec gives no parameter_counts)") from None
        except Exception as exc:  # values the rules let through but the model classes refuse: the worker says so
            raise UnknownFootprint(f"{spec.source}: its modules could not be built to size them: {exc}") from None
    if spec.is_hub:
        return read_hub(spec.source, spec.revision, cache_dir)
    return read_folder(Path(spec.source))
