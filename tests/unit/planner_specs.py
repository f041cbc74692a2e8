"""Model specs and GPUs for the memory plan's tests (test_planner.py, test_planner_refusals.py): full-size models
without files (``random:`` with parameter counts) and injected GPUs."""

from __future__ import annotations

from qwen_image_server.models.footprint import GIB
from qwen_image_server.models.machine import Gpu
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.spec import ModelSpec

FULL_SIZE = {"transformer": 20.4e9, "text_encoder": 8.3e9, "vae": 0.13e9}  # Qwen-Image's parameters
H100 = Gpu("cuda:0", "NVIDIA H100 80GB HBM3", int(79.1 * GIB), int(79.6 * GIB))


def full_model(ident: str, kind: str = "text-to-image", counts: dict | None = FULL_SIZE, **profile) -> ModelSpec:
    """A full-size model without files: ``random:`` with parameter counts."""
    cls = {"text-to-image": "QwenImagePipeline", "edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline"}[kind]
    options = {"parameter_counts": counts} if counts else {}
    return ModelSpec(ident, f"random:Qwen/{ident}", cls, kind, options=options, profile=RunProfile(**profile))


def small_model(ident: str, params: float = 1e9) -> ModelSpec:
    return full_model(ident, counts={"transformer": params * 0.7, "text_encoder": params * 0.3})


def gpu_probe(*gpus: Gpu):
    return lambda: list(gpus)


def fake_gpu(index: int, gib: float) -> Gpu:
    return Gpu(f"cuda:{index}", "test GPU", int(gib * GIB), int(gib * GIB))
