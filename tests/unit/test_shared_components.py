"""Shared components: models of one process with the same text encoder or VAE files hold one copy of it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_image_server.jobs import Job
from qwen_image_server.models.configured import resolve_models
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.shared import ComponentCache, file_hash, fingerprint

JOB = Job(mode="generate", prompt="a lighthouse", seeds=[3], width=256, height=256, num_inference_steps=2)


@pytest.fixture(autouse=True)
def hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("QIS_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))


def _spec(name: str, folder: Path):
    return resolve_models([(name, str(folder))])[0]


def _pixels(runner: PipelineRunner) -> np.ndarray:
    return np.asarray(runner.run(JOB)[0])


def _retrained_text_encoder(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose text encoder has other weights (same shapes, same config)."""
    shutil.copytree(source, target)
    for file in (target / "text_encoder").glob("*.safetensors"):
        tensors = load_file(file)
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + 1.0
        file.unlink()  # a new file (the copy's hash is remembered by path, size and mtime)
        save_file(tensors, file, metadata={"format": "pt"})
    return target


def test_models_with_the_same_text_encoder_and_vae_files_share_one_copy(tiny_t2i, tiny_edit):
    shared = ComponentCache()
    t2i = PipelineRunner(_spec("t2i", tiny_t2i), "cpu", shared=shared)
    edit = PipelineRunner(_spec("edit", tiny_edit), "cpu", shared=shared)
    for name in ("text_encoder", "vae"):
        a, b = getattr(t2i.pipe, name), getattr(edit.pipe, name)
        assert a is b, name
        assert next(a.parameters()).data_ptr() == next(b.parameters()).data_ptr()
    assert t2i.pipe.transformer is not edit.pipe.transformer  # never shared: speed settings change it per model
    assert edit.memory.summary()["shared_components"] == ["text_encoder", "vae"]
    assert "shared_components" not in t2i.memory.summary()
    assert shared.reused == {"edit": ["text_encoder", "vae"]}


def test_different_text_encoder_files_load_two_copies(tiny_t2i, tmp_path):
    other = _retrained_text_encoder(tiny_t2i, tmp_path / "retrained")
    shared = ComponentCache()
    base = PipelineRunner(_spec("base", tiny_t2i), "cpu", shared=shared)
    retrained = PipelineRunner(_spec("retrained", other), "cpu", shared=shared)
    assert base.pipe.text_encoder is not retrained.pipe.text_encoder
    assert base.pipe.vae is retrained.pipe.vae  # the VAE files are still the same
    assert shared.reused == {"retrained": ["vae"]}


def test_a_shared_component_makes_the_same_image_as_its_own_copy(tiny_t2i, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_t2i, copy)
    alone = _pixels(PipelineRunner(_spec("copy", copy), "cpu"))
    shared = ComponentCache()
    PipelineRunner(_spec("first", tiny_t2i), "cpu", shared=shared)
    second = PipelineRunner(_spec("copy", copy), "cpu", shared=shared)
    assert second.pipe.text_encoder is shared.modules[next(k for k in shared.modules if k[0] == "text_encoder")]
    assert np.array_equal(_pixels(second), alone)


def test_components_held_differently_are_not_shared(tiny_t2i):
    folder = tiny_t2i / "text_encoder"
    key = dict(dtype=str(torch.float32), device="cpu", weights_dtype="auto", offload="none")
    plain = ComponentCache.key(folder, "text_encoder", **key)
    assert plain is not None
    assert ComponentCache.key(folder, "text_encoder", **{**key, "weights_dtype": "fp8"}) != plain
    assert ComponentCache.key(folder, "text_encoder", **{**key, "offload": "text-encoder"}) != plain
    assert ComponentCache.key(folder, "text_encoder", **{**key, "dtype": str(torch.bfloat16)}) != plain
    assert ComponentCache.key(folder, "text_encoder", **{**key, "offload": "model"}) is None  # hooks per pipeline
    assert ComponentCache.key(tiny_t2i / "transformer", "transformer", **key) is None


def test_hub_blobs_are_known_by_their_names_and_other_files_hashed_once(tmp_path):
    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    name = "ab" * 32  # not the content's hash: the name is trusted, the file is not read
    (blobs / name).write_bytes(b"weights")
    snapshot = tmp_path / "models--org--name" / "snapshots" / "rev" / "vae"
    snapshot.mkdir(parents=True)
    (snapshot / "diffusion_pytorch_model.safetensors").symlink_to(Path("../../../blobs") / name)
    assert file_hash(snapshot / "diffusion_pytorch_model.safetensors") == name
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"other weights")
    assert file_hash(plain) == hashlib.sha256(b"other weights").hexdigest()
    assert fingerprint(snapshot) is not None and fingerprint(tmp_path / "models--org--name" / "blobs") is None


def test_random_sources_share_a_text_encoder_and_vae_of_the_same_architecture_and_seed():
    """random: sources have no files: the same published component values and seed are the same weights."""
    from qwen_image_server.models.random_source import SMALL_OVERRIDES

    shared = ComponentCache()
    t2i = PipelineRunner(_spec("t2i", f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES}"), "cpu", shared=shared)
    edit = PipelineRunner(_spec("edit", f"random:Qwen/Qwen-Image-Edit-2509?{SMALL_OVERRIDES}"), "cpu", shared=shared)
    other = PipelineRunner(_spec("other", f"random:Qwen/Qwen-Image-Edit-2509?{SMALL_OVERRIDES}&seed=1"), "cpu", shared=shared)
    assert edit.pipe.text_encoder is t2i.pipe.text_encoder and edit.pipe.vae is t2i.pipe.vae
    assert edit.pipe.transformer is not t2i.pipe.transformer
    assert edit.memory.summary()["shared_components"] == ["text_encoder", "vae"]
    assert other.pipe.text_encoder is not t2i.pipe.text_encoder and other.pipe.vae is not t2i.pipe.vae  # another seed
    alone = PipelineRunner(_spec("alone", f"random:Qwen/Qwen-Image-Edit-2509?{SMALL_OVERRIDES}"), "cpu")
    for mine, theirs in zip(
        alone.pipe.text_encoder.state_dict().values(), edit.pipe.text_encoder.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs)  # what was shared is what the model builds on its own
