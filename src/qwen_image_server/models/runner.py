"""Loading a Qwen-Image pipeline on one device and running jobs with it.

A ``PipelineRunner`` belongs to exactly one owner (a worker process, or a
benchmark in-process): diffusers pipelines keep per-call state on ``self``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..engine.types import Job
from ..errors import TaskCancelled
from .processor import load_processor, torchvision_available
from .spec import ModelSpec

log = logging.getLogger(__name__)

# Areas the edit pipelines resize their inputs to (diffusers' module constants and literals).
_DIFFUSERS_EDIT_AREA = 1024 * 1024
_DIFFUSERS_CONDITION_AREA = 384 * 384
_EDIT_MODULES = ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_plus", "pipeline_qwenimage_edit_inpaint")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on GPUs and float32 on CPU unless told otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


@contextlib.contextmanager
def edit_areas(edit_area: int | None, condition_area: int | None) -> Iterator[None]:
    """Make the edit pipelines resize inputs to other areas than diffusers' ~1 MP (and 384² for the VL encoder).

    The pipelines read these from module globals at call time, so they are swapped
    for the duration of one call. Used for models whose folder asks for it (the tiny
    models); real models keep diffusers' values.
    """
    if not edit_area and not condition_area:
        yield
        return
    import importlib

    mapping = {_DIFFUSERS_EDIT_AREA: edit_area or _DIFFUSERS_EDIT_AREA, _DIFFUSERS_CONDITION_AREA: condition_area or _DIFFUSERS_CONDITION_AREA}
    saved: list[tuple[object, str, object]] = []
    try:
        for name in _EDIT_MODULES:
            module = importlib.import_module(f"diffusers.pipelines.qwenimage.{name}")
            original = module.calculate_dimensions

            def patched(target_area, ratio, _original=original):
                return _original(mapping.get(target_area, target_area), ratio)

            saved.append((module, "calculate_dimensions", original))
            module.calculate_dimensions = patched
            for const in ("VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"):
                if hasattr(module, const):
                    saved.append((module, const, getattr(module, const)))
                    setattr(module, const, mapping[getattr(module, const)])
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


class PipelineRunner:
    """Owns one loaded pipeline (and variants built from its components) on one device."""

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto"):
        from diffusers import DiffusionPipeline

        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        kwargs: dict = {"dtype": self.dtype}
        if spec.can_edit:
            kwargs["processor"] = self._load_processor()
        started = time.perf_counter()
        self.pipe = DiffusionPipeline.from_pretrained(spec.source, **kwargs).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._inpaint = None
        log.info("loaded %s (%s) on %s as %s in %.1fs", spec.id, spec.pipeline_class, self.device, self.dtype, time.perf_counter() - started)

    def _load_processor(self):
        source = Path(self.spec.source)
        if not source.is_dir():
            if torchvision_available():
                return None  # diffusers loads it the standard way
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(self.spec.source, allow_patterns=["processor/*"]))
        return load_processor(source / "processor")

    @property
    def inpaint_pipe(self):
        """The mask-edit variant, sharing this pipeline's loaded components (no second copy of the weights)."""
        if self._inpaint is None:
            from diffusers import QwenImageEditInpaintPipeline

            self._inpaint = QwenImageEditInpaintPipeline.from_pipe(self.pipe)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def run(self, job: Job, should_stop: Callable[[], bool] = lambda: False) -> list[Image.Image]:
        """Run one job and return its images in seed order. Raises ``TaskCancelled`` when ``should_stop()``."""
        if should_stop():
            raise TaskCancelled()

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if should_stop():
                raise TaskCancelled()
            return callback_kwargs

        kwargs: dict = dict(
            prompt=job.prompt,
            num_inference_steps=job.num_inference_steps,
            true_cfg_scale=job.true_cfg_scale,
            negative_prompt=(job.negative_prompt or " ") if job.true_cfg_scale > 1 else None,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in job.seeds],
            num_images_per_prompt=job.n,
            callback_on_step_end=on_step_end,
            output_type="pil",
        )
        pipe = self.pipe
        if job.mode == "generate":
            kwargs.update(width=job.width, height=job.height)
        else:
            images = [Image.fromarray(array) for array in job.images]
            if job.mode == "inpaint":
                pipe = self.inpaint_pipe
                kwargs.update(image=images[0], mask_image=Image.fromarray(job.mask), strength=1.0)
            else:
                kwargs.update(image=images if self.spec.multi_image else images[0], width=job.width, height=job.height)
        options = self.spec.options
        with edit_areas(options.get("edit_area"), options.get("condition_area")), torch.inference_mode():
            result = pipe(**kwargs).images
        if job.mode == "inpaint":
            result = [self._keep_unmasked(image, kwargs["image"], kwargs["mask_image"]) for image in result]
        return [self._fit(image, job) for image in result]

    @staticmethod
    def _keep_unmasked(result: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
        """Paste the original back outside the mask, so that only the masked region changes."""
        size = result.size
        original = original.convert("RGB")
        if original.size != size:
            original = original.resize(size, Image.Resampling.LANCZOS)
        return Image.composite(result.convert("RGB"), original, mask.convert("L").resize(size, Image.Resampling.NEAREST))

    @staticmethod
    def _fit(image: Image.Image, job: Job) -> Image.Image:
        size = (job.out_width, job.out_height)
        if None in size or image.size == size:
            return image
        return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)

