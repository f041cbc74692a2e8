"""Model files the tests build beside the tiny models (a plugin of tests/conftest.py): a tiny LoRA, hub caches as a
machine that downloaded the repositories once has them, and ``options_server``, the shared server of what models are
given at start (hub ids at revisions, LoRAs and aliases, a step cache, VAE tiling) and of the fuzzing over HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen_image_server.models.tiny import build_tiny_model
from qwen_image_server.models.weights_files import read_header

#: The transformer's layers a tiny LoRA adapts (in every block), as Qwen-Image LoRAs do.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.2")


def unloadable(weights: Path) -> bytes:
    """Make a model's weights file fail to load and return its bytes, to put back: its tensors are cut off, the header
    that sizes them kept (the start checks, which refuse a folder without its weights, pass; a worker's load fails)."""
    data = weights.read_bytes()
    weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    return data


def make_tiny_lora(
    model_dir: Path, out_file: Path, seed: int = 0, rank: int = 4, targets: tuple[str, ...] | None = None, ranks=None
) -> Path:
    """A random LoRA (non-zero A and B) for a tiny model's transformer, in diffusers' Qwen-Image LoRA format: what
    ``make_tiny_lora_with_peft`` writes (names, shapes, dtype, metadata; test_lora_runtime.py compares them), written
    from the transformer's safetensors header with numpy, so that a test process needs no torch, diffusers or peft
    for it (seconds of imports in each process that builds one). ``targets``: the layer names it adapts (default
    ``LORA_TARGETS``); ``ranks``: ``{layer name ending: rank}`` for ranks that differ by layer."""
    import numpy as np
    from safetensors.numpy import save_file

    header = read_header(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in sorted(header):
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer.startswith("transformer_blocks.") and layer.endswith(targets or LORA_TARGETS):
            out_features, in_features = header[name]["shape"]
            r = next((n for ending, n in (ranks or {}).items() if layer.endswith(ending)), rank)
            a = rng.standard_normal((r, in_features), dtype=np.float32) * 0.5
            b = rng.standard_normal((out_features, r), dtype=np.float32) * 0.5
            tensors[f"transformer.{layer}.lora_A.weight"], tensors[f"transformer.{layer}.lora_B.weight"] = a, b
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return out_file


def make_tiny_lora_with_peft(model_dir: Path, out_file: Path, seed: int = 0, rank: int = 4, alpha: int | None = None) -> Path:
    """The same LoRA made as a user makes one: peft adapters on the loaded transformer, saved by diffusers. With
    ``alpha`` (its ``lora_alpha``; default the rank), its config goes into the file as metadata, as peft users save."""
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(LORA_TARGETS)))
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    state = get_peft_model_state_dict(transformer)
    QwenImagePipeline.save_lora_weights(
        out_file.parent, transformer_lora_layers=state, weight_name=out_file.name,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict() if alpha else None,
    )  # fmt: skip
    return out_file


@pytest.fixture(scope="session")
def tiny_lora(tiny_t2i, tmp_path_factory) -> Path:
    """A LoRA file for the tiny text-to-image model (no preset file next to it)."""
    return make_tiny_lora(tiny_t2i, tmp_path_factory.mktemp("lora") / "style.safetensors")


#: Snapshots of the hub LoRA repository ``test-org/tiny-loras`` in ``lora_hub_cache``.
LORA_MAIN_REV, LORA_V2_REV = "1" * 40, "2" * 40
HUB_LORA = "hf:test-org/tiny-loras/lightning/fast.safetensors"


@pytest.fixture(scope="session")
def lora_hub_cache(tiny_t2i, tiny_lora, tmp_path_factory) -> Path:
    """A hub cache (``HF_HUB_CACHE``) holding ``test-org/tiny-loras``, as a machine that downloaded it once has it: at
    ``main``, ``lightning/fast.safetensors`` (the tiny LoRA, rank 4) with its preset file ``lightning/fast.json``; at
    ``v2``, a rank-8 LoRA of that name without one."""
    root = tmp_path_factory.mktemp("lora-hub") / "hub"
    repo = root / "models--test-org--tiny-loras"
    main = repo / "snapshots" / LORA_MAIN_REV / "lightning"
    main.mkdir(parents=True)
    shutil.copy(tiny_lora, main / "fast.safetensors")
    (main / "fast.json").write_text(json.dumps({"preset": "lightning", "steps": 2}))
    (repo / "snapshots" / LORA_V2_REV / "lightning").mkdir(parents=True)
    make_tiny_lora(tiny_t2i, repo / "snapshots" / LORA_V2_REV / "lightning" / "fast.safetensors", seed=3, rank=8)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(LORA_MAIN_REV)
    (repo / "refs" / "v2").write_text(LORA_V2_REV)
    return root


#: Snapshots of the hub model ``test-org/tiny-edit`` in ``hub_cache``.
EDIT_MAIN_REV, EDIT_V2_REV = "0" * 39 + "1", "0" * 39 + "2"


@pytest.fixture(scope="session")
def hub_cache(lora_hub_cache, tiny_edit, tmp_path_factory) -> Path:
    """A hub cache holding ``lora_hub_cache``'s ``test-org/tiny-loras`` and ``test-org/tiny-edit``: at ``main`` the
    shared tiny edit model, at ``v2`` another one (other weights)."""
    root = Path(shutil.copytree(lora_hub_cache, tmp_path_factory.mktemp("hub") / "hub"))
    repo = root / "models--test-org--tiny-edit"
    shutil.copytree(tiny_edit, repo / "snapshots" / EDIT_MAIN_REV)
    build_tiny_model(repo / "snapshots" / EDIT_V2_REV, "edit", seed=7)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(EDIT_MAIN_REV)
    (repo / "refs" / "v2").write_text(EDIT_V2_REV)
    return root


def offline_env(hub_cache: Path) -> dict[str, str]:
    """The environment of a process that reads ``hub_cache`` offline (the hub's settings are read at import)."""
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(hub_cache.parent / "hf-home")}


#: Every id ``options_server`` answers to: its models, LoRA ids and aliases.
OPTIONS_SERVER_IDS = {
    "tiny", "dall-e-3", "quick", "style", "fast", "hub", "cached", "tiled", "compiled", "tiny-edit", "edit-v2",
    "tiny-edit-plus",
}  # fmt: skip

#: ``options_server``'s request limits, low so that no fuzzed request runs long (test_fuzz_server.py): 4 steps at most
#: (the tiny models' default), 2 images, sides from 64 (the step cache tests' size) to 512.
OPTIONS_SERVER_LIMITS = {"QIS_MAX_STEPS": "4", "QIS_MAX_N": "2", "QIS_MIN_IMAGE_SIDE": "64", "QIS_MAX_IMAGE_SIDE": "512"}


@pytest.fixture(scope="session")
def options_server(start_server, tiny_t2i, tiny_edit_plus, tiny_lora, hub_cache, tmp_path_factory):
    """One server for what models are given at start (tests/e2e: test_lora_server, test_hub_models,
    test_step_cache_server, test_compile_server) and for the fuzzing over HTTP (test_fuzz_server), one worker each:
    - ``tiny``, the first text-to-image model, with LoRAs (``style``; ``fast`` with the Lightning preset; ``hub``
      from the hub cache) and aliases (``dall-e-3`` of ``tiny``, ``quick`` of ``fast``);
    - ``cached`` with a first-block step cache, ``tiled`` with VAE tiling, and ``compiled``, compiled
      (``--compile on@compiled``, warmed at 256x256 before the server is ready) with batched CFG and a step cache (the
      tiny weights in folders of their own: a source given twice would be one model with two names);
    - the hub id ``test-org/tiny-edit`` and ``edit-v2``, the same at revision ``v2``, read from the hub cache offline;
    - ``tiny-edit-plus``, the tiny edit-plus model (the fuzzed bodies' third model name).
    Requests within ``OPTIONS_SERVER_LIMITS``."""
    copies = tmp_path_factory.mktemp("options")
    cached, tiled, compiled = (shutil.copytree(tiny_t2i, copies / name) for name in ("cached", "tiled", "compiled"))
    return start_server(
        "--model", f"tiny={tiny_t2i}",
        "--lora", f"style={tiny_lora}",
        "--lora", f"fast={tiny_lora}:preset=lightning,steps=2",
        "--lora", f"hub={HUB_LORA}:revision=v2",  # a hub LoRA, from the hub cache offline
        "--model-alias", "dall-e-3=tiny", "--model-alias", "quick=fast",
        "--model", f"cached={cached}", "--cache", "fbcache:threshold=1@cached",
        "--model", f"tiled={tiled}", "--vae-tiling", "on@tiled",
        "--model", f"compiled={compiled}", "--compile", "on@compiled", "--compile-sizes", "256x256@compiled",
        "--cfg-batch", "on@compiled", "--cache", "fbcache@compiled",
        "--model", "test-org/tiny-edit",
        "--model", "edit-v2=test-org/tiny-edit@v2",
        "--model", f"tiny-edit-plus={tiny_edit_plus}",
        env={**offline_env(hub_cache), "QIS_CPU_THREADS": "1", **OPTIONS_SERVER_LIMITS},
    )  # fmt: skip
