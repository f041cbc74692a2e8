"""``random:ORG/NAME`` model sources: a published Qwen-Image architecture with random weights.

For benchmarks and checks at the real sizes without downloading weights: the
architecture values of ``Qwen/Qwen-Image``, ``Qwen/Qwen-Image-Edit`` and
``Qwen/Qwen-Image-Edit-2509`` ship with the package (``architectures/*.json``) and
the worker builds the modules directly on its device (``random_arch.py``). The
images are noise; the shapes, FLOPs and memory are those of the real models.

Syntax: ``random:ORG/NAME[?KEY=VALUE&KEY=VALUE...]``, e.g.
``random:Qwen/Qwen-Image?layers=2&text_layers=1&vision_depth=1&seed=3``. The keys
(``OVERRIDES``) shrink the architecture for tests and smaller runs, choose the seed
of the weights, or set the model's defaults as a sidecar file would. No torch here,
and nothing is read but the packaged architecture files.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from .spec import PIPELINE_KINDS, ModelConfigError, ModelSpec, default_model_id
from .tiny import _SPECIAL_TOKENS

RANDOM_PREFIX = "random:"
#: The largest seed of random weights (torch's generators take 64-bit seeds; a request's seeds stop at the same).
MAX_SEED = 2**63 - 1
#: How much larger than the real architecture an override may make a value.
MAX_GROWTH = 4
#: The byte-level tokenizer's size (``tiny._make_tokenizer``): 256 bytes and the special tokens.
TOKENIZER_SIZE = 256 + len(_SPECIAL_TOKENS)

#: Architecture overrides: key → (component, path of the config value, what it is).
OVERRIDES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "layers": ("transformer", ("num_layers",), "transformer blocks"),
    "heads": ("transformer", ("num_attention_heads",), "transformer attention heads (width = heads x 128)"),
    "text_layers": ("text_encoder", ("text_config", "num_hidden_layers"), "text encoder layers"),
    "text_hidden": ("text_encoder", ("text_config", "hidden_size"), "text encoder width (also the transformer's text input)"),
    "text_intermediate": ("text_encoder", ("text_config", "intermediate_size"), "text encoder MLP width"),
    "text_heads": ("text_encoder", ("text_config", "num_attention_heads"), "text encoder attention heads"),
    "text_kv_heads": ("text_encoder", ("text_config", "num_key_value_heads"), "text encoder key/value heads"),
    "vocab": ("text_encoder", ("text_config", "vocab_size"), "text encoder vocabulary size"),
    "vision_depth": ("text_encoder", ("vision_config", "depth"), "vision encoder blocks"),
    "vision_hidden": ("text_encoder", ("vision_config", "hidden_size"), "vision encoder width"),
    "vision_intermediate": ("text_encoder", ("vision_config", "intermediate_size"), "vision encoder MLP width"),
    "vision_heads": ("text_encoder", ("vision_config", "num_heads"), "vision encoder attention heads"),
    "vae_dim": ("vae", ("base_dim",), "VAE base channels"),
}
#: Keys that set the model's options (as a sidecar file would), not its architecture.
OPTION_KEYS = ("default_size", "default_steps", "edit_area", "condition_area")
KNOWN_KEYS = ("seed", *OVERRIDES, *OPTION_KEYS)
#: Overrides that shrink every module to a few million parameters: the same code paths, quick on a CPU.
SMALL_OVERRIDES = (
    "layers=1&heads=1&text_layers=1&text_hidden=128&text_heads=1&text_kv_heads=1&text_intermediate=256&vocab=512"
    "&vision_depth=1&vision_hidden=64&vision_heads=1&vision_intermediate=128&vae_dim=8"
)


def is_random_source(source: str) -> bool:
    """True for a ``random:`` model source."""
    return source.startswith(RANDOM_PREFIX)


@functools.cache
def architectures() -> dict[str, dict]:
    """The packaged architectures by published name (``Qwen/Qwen-Image`` → its JSON)."""
    out = {}
    for entry in resources.files(__package__).joinpath("architectures").iterdir():
        if entry.name.endswith(".json"):
            arch = json.loads(entry.read_text(encoding="utf-8"))
            out[arch["name"]] = arch
    return out


#: The packaged architectures' tensors, as their safetensors headers would list them (``random_arch.write_tensor_tables``
#: makes it from the model classes built on the meta device; tests/unit/test_random_sources.py checks it against them).
TENSOR_TABLES = "tensors.json.gz"


@functools.cache
def _tensor_tables() -> dict[str, dict]:
    path = resources.files(__package__).joinpath("architectures", TENSOR_TABLES)
    return json.loads(gzip.decompress(path.read_bytes())) if path.is_file() else {}


#: Overrides that change only how often a component's block repeats (its blocks are all alike): the component's
#: tensors are the packaged ones with that block's rows cut or repeated. The others change widths.
DEPTH_OVERRIDES = {
    "layers": ("transformer", "transformer_blocks."),
    "text_layers": ("text_encoder", "model.language_model.layers."),
    "vision_depth": ("text_encoder", "model.visual.blocks."),
}


def tensor_table(random: RandomSource) -> dict[str, list[list]] | None:
    """The packaged table of ``random``'s tensors (component → ``[name, dtype, numel, ndim]`` rows), or None when its
    overrides change widths (then only building it tells). Reading it needs neither torch nor the model classes:
    sizing a ``random:`` source for the memory plan takes milliseconds instead of the seconds of importing diffusers
    and transformers and building the modules on the meta device. Depth overrides (``DEPTH_OVERRIDES``) repeat or
    cut the block rows of the packaged table."""
    if set(random.overrides) - set(DEPTH_OVERRIDES):
        return None
    entry = _tensor_tables().get(random.name)
    if not entry:
        return None
    table = dict(entry["components"])
    for key, count in random.overrides.items():
        component, prefix = DEPTH_OVERRIDES[key]
        rows = _repeat_block(table[component], prefix, count)
        if rows is None:  # a table whose blocks are named otherwise: building tells
            return None
        table[component] = rows
    return table


def _repeat_block(rows: list[list], prefix: str, count: int) -> list[list] | None:
    """``rows`` with the blocks named ``PREFIX{i}.`` made ``count`` copies of block 0, where the blocks were; None
    when no block is named so."""
    first = [row for row in rows if row[0].startswith(f"{prefix}0.")]
    if not first:
        return None
    blocks = [[f"{prefix}{i}.{name[len(prefix) + 2 :]}", *rest] for i in range(count) for name, *rest in first]
    at = next(i for i, row in enumerate(rows) if row[0].startswith(prefix))
    others = [row for row in rows if not row[0].startswith(prefix)]
    return others[:at] + blocks + others[at:]


@dataclass(frozen=True)
class RandomSource:
    """A parsed ``random:`` source: which architecture, what is changed, and the seed of the weights."""

    name: str
    seed: int = 0
    overrides: dict[str, int] = field(default_factory=dict, hash=False)
    options: dict = field(default_factory=dict, hash=False)

    def architecture(self) -> dict:
        """The architecture with the overrides applied (a copy; the packaged one is left as it is)."""
        arch = copy.deepcopy(architectures()[self.name])
        for key, value in self.overrides.items():
            component, path, _ = OVERRIDES[key]
            target = arch[component]
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        text, vision = arch["text_encoder"]["text_config"], arch["text_encoder"]["vision_config"]
        # The text encoder's width is what the transformer and the vision merger meet.
        arch["transformer"]["joint_attention_dim"] = text["hidden_size"]
        vision["out_hidden_size"] = text["hidden_size"]
        text["max_window_layers"] = text["num_hidden_layers"]
        full = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
        vision["fullatt_block_indexes"] = full or [vision["depth"] - 1]
        return arch


def component_key(source: str, name: str) -> tuple:
    """What makes a component of a ``random:`` source the same as another's: its architecture values and its
    seed (each component gets a seed of its own, so equal values and seed are equal weights). Qwen-Image and
    Qwen-Image-Edit(-2509) publish the same text encoder and VAE. (No torch: the planner compares these too.)"""
    random = parse_random_source(source)
    arch = random.architecture()
    offset = ("transformer", "text_encoder", "vae").index(name)
    return ("random", name, json.dumps(arch[name], sort_keys=True), random.seed * 1000 + offset)


def _positive_int(key: str, value: str, source: str) -> int:
    if not re.fullmatch(r"\d+", value) or int(value) < (0 if key == "seed" else 1):
        raise ModelConfigError(
            f"{source}: {key} must be a {'non-negative' if key == 'seed' else 'positive'} integer, got {value!r}"
        )
    return int(value)


def parse_random_source(source: str) -> RandomSource:
    """``random:ORG/NAME[?KEY=VALUE&...]`` → a ``RandomSource``, or a ``ModelConfigError`` saying what is wrong."""
    if not is_random_source(source):
        raise ModelConfigError(f"{source}: not a {RANDOM_PREFIX} source")
    name, _, query = source[len(RANDOM_PREFIX) :].partition("?")
    known = architectures()
    if name not in known:
        raise ModelConfigError(f"{source}: no architecture named {name!r} (known: {', '.join(sorted(known))})")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ModelConfigError(f"{source}: expected ?KEY=VALUE&KEY=VALUE... after the name") from None
    seed, overrides = 0, {}
    options: dict[str, Any] = {}  # as a folder's sidecar gives them; none by default (the server's defaults apply)
    seen: set[str] = set()
    for key, value in pairs:
        if key not in KNOWN_KEYS:
            raise ModelConfigError(f"{source}: unknown key {key!r} (known: {', '.join(KNOWN_KEYS)})")
        if key in seen:
            raise ModelConfigError(f"{source}: {key} is given twice")
        seen.add(key)
        if key == "default_size":
            if not re.fullmatch(r"\d+x\d+", value):
                raise ModelConfigError(f"{source}: default_size must be WIDTHxHEIGHT, got {value!r}")
            options[key] = value
        elif key in OPTION_KEYS:
            options[key] = _positive_int(key, value, source)
        elif key == "seed":
            seed = _positive_int(key, value, source)
            if seed > MAX_SEED:
                raise ModelConfigError(f"{source}: seed must be at most {MAX_SEED}, got {seed}")
        else:
            overrides[key] = _positive_int(key, value, source)
            component, path, what = OVERRIDES[key]
            own = known[name][component]
            for step in path:
                own = own[step]
            if overrides[key] > MAX_GROWTH * own:  # 99999999 blocks took plan minutes and gigabytes to size
                raise ModelConfigError(
                    f"{source}: {key} ({what}) must be at most {MAX_GROWTH * own}, {MAX_GROWTH} times {name}'s own "
                    f"{own}, got {overrides[key]}"
                )
    parsed = RandomSource(name=name, seed=seed, overrides=overrides, options=options)
    _check_shapes(parsed.architecture(), source)
    return parsed


def _check_shapes(arch: dict, source: str) -> None:
    """Refuse overrides that the model classes cannot be built with, naming the keys to change."""
    text, vision = arch["text_encoder"]["text_config"], arch["text_encoder"]["vision_config"]
    rope_dims = 2 * sum(text["rope_scaling"]["mrope_section"])
    if text["hidden_size"] != rope_dims * text["num_attention_heads"]:
        raise ModelConfigError(
            f"{source}: text_hidden must be text_heads x {rope_dims} (the rotary sections' head size), "
            f"got {text['hidden_size']} with {text['num_attention_heads']} heads"
        )
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise ModelConfigError(
            f"{source}: text_heads ({text['num_attention_heads']}) must be a multiple of text_kv_heads ({text['num_key_value_heads']})"
        )
    if text["vocab_size"] < TOKENIZER_SIZE:
        raise ModelConfigError(f"{source}: vocab must be at least {TOKENIZER_SIZE} (the byte-level tokenizer's size)")
    if vision["hidden_size"] % vision["num_heads"] or (vision["hidden_size"] // vision["num_heads"]) % 4:
        raise ModelConfigError(
            f"{source}: vision_hidden must be vision_heads x a multiple of 4, got {vision['hidden_size']} with {vision['num_heads']} heads"
        )


def resolve_random(source: str, ident: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a ``random:`` source, from the packaged architecture alone (no file of the user's is read)."""
    parsed = parse_random_source(source)
    class_name = architectures()[parsed.name]["pipeline_class"]
    return ModelSpec(
        id=ident or default_model_id(parsed.name),
        source=source,
        pipeline_class=class_name,
        kind=PIPELINE_KINDS[class_name],
        options=dict(parsed.options),
    )
