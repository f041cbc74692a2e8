"""Checking a LoRA file against its base model before the port opens (no torch).

The safetensors header (8 bytes of length, then JSON: each tensor's dtype and shape)
says which layers a LoRA adapts and with which shapes. Those must be linear layers of
the Qwen-Image transformer, with the dimensions its ``transformer/config.json`` gives,
or diffusers would fail later, in a worker, with a less helpful message (a Flux or SDXL
LoRA, or a LoRA for a transformer of another size).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import replace
from pathlib import Path

from .lora import HUB_PREFIX, LoraError, merge_preset, read_preset_file
from .profile import LoraSpec
from .weights_files import positive_size, read_header

#: Keys diffusers' Qwen-Image LoRA format uses (``save_lora_weights``), for the error messages.
EXPECTED_KEYS = "transformer.transformer_blocks.N.attn.to_q.lora_A.weight / .lora_B.weight (diffusers' Qwen-Image LoRA format)"
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")
_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_down.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def transformer_layers(config: dict) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]], int]:
    """The linear layers of a Qwen-Image transformer as ``(top-level, per block, number of blocks)``, each
    name → ``(in_features, out_features)``, from its ``config.json``."""
    inner = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
    patch = int(config.get("patch_size", 2))
    in_channels = int(config.get("in_channels", 64))
    out_channels = int(config.get("out_channels") or in_channels)
    top = {
        "img_in": (in_channels, inner),
        "txt_in": (int(config.get("joint_attention_dim", 3584)), inner),
        "time_text_embed.timestep_embedder.linear_1": (256, inner),
        "time_text_embed.timestep_embedder.linear_2": (inner, inner),
        "norm_out.linear": (inner, 2 * inner),
        "proj_out": (inner, patch * patch * out_channels),
    }
    block = {f"{stream}_mod.1": (inner, 6 * inner) for stream in ("img", "txt")}
    for stream in ("img", "txt"):
        block[f"{stream}_mlp.net.0.proj"] = (inner, 4 * inner)
        block[f"{stream}_mlp.net.2"] = (4 * inner, inner)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        block[f"attn.{name}"] = (inner, inner)
    return top, block, int(config.get("num_layers", 60))


def seems_for(keys: list[str]) -> str:
    """A guess of the architecture a LoRA's keys are for, for the error message."""
    text = " ".join(keys[:500])
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", text):
        return "Flux"
    if re.search(r"joint_blocks", text):
        return "Stable Diffusion 3"
    if re.search(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks", text):
        return "Stable Diffusion / SDXL (a UNet)"
    if re.search(r"(^|[ ._])blocks[._]\d+[._](self_attn|cross_attn|ffn)", text):
        return "Wan (a video model)"
    if re.search(r"lora_te|text_encoder|text_model", text):
        return "a text encoder"
    return "an unknown architecture"


def check_lora_file(lora: LoraSpec, base_id: str, config: dict | None) -> tuple[int, tuple[str, ...]]:
    """Check ``lora``'s file against the base transformer's ``config`` (None: names only); return its rank and the
    layers it adapts."""
    path = Path(lora.path).expanduser()
    where = f"LoRA {lora.name} ({lora.hub or lora.path}) for model {base_id}"
    if not path.exists():
        raise LoraError(f"{where}: file not found")
    if not path.is_file():
        raise LoraError(f"{where}: not a file")
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        raise LoraError(f"{where}: not a safetensors file ({exc}); a LoRA must be a .safetensors file") from None
    top, block, layers = transformer_layers(config or {})
    flat = {name.replace(".", "_"): name for name in top} | {f"transformer_blocks_{{}}_{n.replace('.', '_')}": n for n in block}
    shapes: dict[str, dict[str, list[int]]] = {}
    foreign: list[str] = []
    for key, info in header.items():
        module, part = _split_key(key, flat)
        if part is None:
            foreign.append(key)
            continue
        shapes.setdefault(module, {})[part] = list(info.get("shape", []))
    known = {m for m in shapes if _layer(m, top, block, layers if config else None) is not None}
    unknown = sorted(set(shapes) - known)
    if foreign or unknown or not shapes:
        examples = ", ".join((foreign + unknown)[:3]) or "none"
        what = seems_for(list(header)) if (foreign or unknown) else "nothing (no LoRA weights in it)"
        blocks = [match.group(2) for m in unknown if (match := _BLOCK.match(m))]
        if not foreign and unknown and len(blocks) == len(unknown):
            # only blocks past the last: a deeper model's; else a layer of a block that is no linear layer (a norm)
            what = (
                "a Qwen-Image transformer with more layers"
                if all(name in block for name in blocks)
                else "layers of a Qwen-Image transformer that are not its linear ones (a LoRA adapts linear layers only)"
            )
        raise LoraError(
            f"{where}: it does not fit the Qwen-Image transformer; it seems to be for {what} "
            f"(keys such as {examples}); expected keys like {EXPECTED_KEYS} on the transformer's linear layers"
        )
    rank = 0
    for module, parts in sorted(shapes.items()):
        if "A" not in parts or "B" not in parts:
            raise LoraError(f"{where}: layer {module} has only one of its two LoRA factors (lora_A/lora_down and lora_B/lora_up)")
        a, b = parts["A"], parts["B"]
        fits = len(a) == 2 and len(b) == 2 and a[0] == b[1]
        dims = _layer(module, top, block, layers) if config else None
        if fits and dims is not None:
            fits = a[1] == dims[0] and b[0] == dims[1]
        if not fits:
            expected = f"[r, {dims[0]}] and [{dims[1]}, r]" if dims else "[r, in] and [out, r]"
            raise LoraError(
                f"{where}: layer {module} has LoRA factors of shapes {a} and {b}, but model {base_id}'s transformer "
                f"needs {expected}; it seems to be for a Qwen-Image-like transformer of another size"
            )
        rank = max(rank, a[0])
    return rank, tuple(sorted(shapes))


def _split_key(key: str, flat: dict[str, str]) -> tuple[str, str | None]:
    """A LoRA tensor name → ``(module name in diffusers' transformer, "A" | "B" | "alpha")``, or ``(key, None)``."""
    name = key
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    name = name.replace(".default.", ".")
    if name.startswith("lora_unet_"):  # kohya's flat names: lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight
        module, _, rest = name.removeprefix("lora_unet_").partition(".")
        match = re.match(r"^transformer_blocks_(\d+)_(.+)$", module)
        if match and (template := flat.get("transformer_blocks_{}_" + match.group(2))):
            module = f"transformer_blocks.{match.group(1)}.{template}"
        else:
            module = flat.get(module, module)
        name = f"{module}.{rest}"
    for suffix, part in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return key, None


def _layer(module: str, top: dict, block: dict, layers: int | None) -> tuple[int, int] | None:
    match = _BLOCK.match(module)
    if match:
        if layers is not None and int(match.group(1)) >= layers:
            return None
        return block.get(match.group(2))
    return top.get(module)


def transformer_config(spec) -> dict | None:
    """The base model's ``transformer/config.json`` (a ``random:`` source's packaged architecture); None when it cannot be read (a hub model's offline and not
    cached) or its sizes are not whole numbers: the LoRA's names are still checked, and the model's load says what
    is wrong with its config."""
    try:
        if spec.is_random:  # the packaged architecture, with the source's overrides (layers=..., width...)
            from .random_source import parse_random_source

            return _usable(parse_random_source(spec.source).architecture()["transformer"])
        if not spec.is_hub:
            file = Path(spec.source) / "transformer" / "config.json"
            return _usable(json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else None
        from huggingface_hub import hf_hub_download

        downloaded = hf_hub_download(spec.source, "transformer/config.json", revision=spec.revision)
        return _usable(json.loads(Path(downloaded).read_text(encoding="utf-8")))
    except Exception:  # unreadable, not JSON, offline and not cached
        return None


#: The sizes ``transformer_layers`` reads from a config.
_CONFIG_SIZES = (
    "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "out_channels", "joint_attention_dim",
    "num_layers",
)  # fmt: skip


def _usable(config: object) -> dict | None:
    """``config`` when it is a JSON object whose sizes are positive whole numbers or absent (null), else None."""
    if not isinstance(config, dict):
        return None
    for key in _CONFIG_SIZES:
        value = config.get(key)
        if value is not None and not positive_size(value):
            return None
    return config


def fetch_lora(lora: LoraSpec) -> LoraSpec:
    """A hub LoRA (``hf:ORG/NAME/FILE.safetensors``) as its file in the hub cache: downloaded when it is not there yet
    and the hub can be reached, read from the cache offline (``HF_HUB_OFFLINE=1``). The preset file next to it
    (``FILE.json``) comes along when the repository has one. A local LoRA is returned as it is."""
    if not lora.path.startswith(HUB_PREFIX):
        return lora
    parts = lora.path.removeprefix(HUB_PREFIX).split("/")
    where = f"LoRA {lora.name} ({lora.path}{f' at {lora.revision}' if lora.revision else ''})"
    if len(parts) < 3 or not all(parts):
        raise LoraError(f"{where}: expected hf:ORG/NAME/FILE.safetensors (a file of a hub repository)")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        local = hf_hub_download(repo, filename, revision=lora.revision)
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise LoraError(
            f"{where}: not in the hub cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached{offline}"
        ) from None
    except EntryNotFoundError:
        raise LoraError(f"{where}: the repository {repo} has no file {filename}") from None
    except RevisionNotFoundError:
        raise LoraError(f"{where}: the repository {repo} has no revision {lora.revision}") from None
    except RepositoryNotFoundError:
        raise LoraError(f"{where}: no repository {repo} on the hub, or it needs a token (HF_TOKEN)") from None
    except Exception as exc:  # the network, the disk
        raise LoraError(
            f"{where}: could not fetch it: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        ) from None
    # The preset file lands next to the LoRA in the same snapshot folder, where read_preset_file looks. None in the
    # repository, or offline and not cached: the LoRA has no preset file.
    with contextlib.suppress(Exception):
        hf_hub_download(repo, str(Path(filename).with_suffix(".json")), revision=lora.revision)
    return replace(lora, path=local, hub=lora.path)


def resolve_loras(loras: list[LoraSpec], specs: list) -> list[LoraSpec]:
    """Each LoRA with its preset merged and its file checked; names unique and distinct from model ids."""
    by_id = {spec.id: spec for spec in specs}
    seen: set[str] = set()
    out = []
    for lora in loras:
        if lora.name in by_id:
            raise LoraError(f"--lora {lora.name}: the name is already a served model's id; choose another name")
        if lora.name in seen:
            raise LoraError(f"--lora {lora.name}: given twice; LoRA names must be unique")
        seen.add(lora.name)
        base = by_id[lora.model]
        lora = fetch_lora(lora)
        rank, layers = check_lora_file(lora, base.id, transformer_config(base))
        preset = merge_preset(lora.name, lora.preset, read_preset_file(lora))
        out.append(replace(lora, preset=preset, rank=rank, layers=layers))
    for model in by_id:
        fused = [lora.name for lora in out if lora.model == model and lora.fuse and lora.preset]
        if len(fused) > 1:
            names = ", ".join(fused)
            raise LoraError(
                f"model {model}: fused LoRAs {names} each have a preset; at most one fused LoRA per model may have one"
            )
    return out
