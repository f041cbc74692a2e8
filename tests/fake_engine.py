"""An ``EngineClient`` that makes images at once, for in-process API tests.

``FakeEngine`` keeps the contract of the real engines (``engine/base.py``): a bounded
queue per model (``queue_size`` waiting jobs beyond ``workers`` running ones, refused
with ``QueueFull`` and the same Retry-After), the input-pixel budget, the task
timeout, cancellation when the caller goes away, previews, and ``NotReady`` for a
model marked broken. Its images are a pure function of the job: a colour drawn from
the prompt, seed and settings, blended with the input for edits and variations and
painted only inside the mask for mask edits, at the job's size, encoded in the job's
format by the server's own encoder. So the API's whole path (validation, sizes,
seeds, formats, url storage, streaming, errors, the queue's 503) runs in
milliseconds, without a worker process or a model.

Tests steer it: ``pause()`` holds running jobs until ``resume()``; ``fail_next`` makes
the next job of a model fail; ``broken`` marks a model failed; ``loading`` keeps
``ready()`` false. ``jobs`` records every ``(model_id, Job)`` submitted and
``cancelled`` the ones whose caller went away.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from qwen_image_server.config import Settings
from qwen_image_server.engine.admission import PixelBudget, RetryAfter
from qwen_image_server.engine.base import EngineDefaults
from qwen_image_server.errors import InferenceFailed, NotReady, QueueFull, TaskTimeout
from qwen_image_server.images import encode_image
from qwen_image_server.jobs import EncodedImage, Job, JobResult, PartialImage
from qwen_image_server.models.spec import ModelSpec

POLL_SECONDS = 0.005


def job_colour(job: Job, seed: int) -> tuple[int, int, int]:
    """The colour of image ``seed`` of ``job``: every setting that changes a real image changes it."""
    key = repr(
        (
            job.mode,
            job.prompt,
            job.negative_prompt,
            seed,
            job.num_inference_steps,
            job.true_cfg_scale,
            job.strength,
            job.lora,
            job.lora_scale,
        )
    )
    digest = hashlib.sha256(key.encode()).digest()
    return digest[0], digest[1], digest[2]


def rendered_size(job: Job) -> tuple[int, int]:
    """What the pipeline renders: the job's size, else (an edit with ``size=auto``) the first input's, in multiples of 16."""
    if job.width and job.height:
        return job.width, job.height
    height, width = job.images[0].shape[:2] if job.images else (1024, 1024)
    return max(16, width // 16 * 16), max(16, height // 16 * 16)


def fake_image(job: Job, seed: int) -> Image.Image:
    """Image ``seed`` of ``job`` at its final size."""
    width, height = rendered_size(job)
    colour = np.array(job_colour(job, seed), np.float32)
    pixels = np.broadcast_to(colour, (height, width, 3)).copy()
    if job.images:
        source = np.asarray(Image.fromarray(job.images[0]).resize((width, height)), np.float32)
        if job.mask is not None:
            mask = np.asarray(Image.fromarray(job.mask).resize((width, height), Image.Resampling.NEAREST)) > 127
            pixels = np.where(mask[..., None], pixels, source)
        else:
            weight = job.strength if job.mode == "variation" else 0.5
            pixels = source * (1 - weight) + pixels * weight
    image = Image.fromarray(pixels.astype(np.uint8))
    if job.out_width and job.out_height and (job.out_width, job.out_height) != (width, height):
        left, top = (width - job.out_width) // 2, (height - job.out_height) // 2
        image = image.crop((left, top, left + job.out_width, top + job.out_height))
    return image


def encoded(job: Job, seed: int, image: Image.Image) -> EncodedImage:
    data = encode_image(image, job.output_format, job.output_compression)
    return EncodedImage(seed=seed, data=data, width=image.width, height=image.height)


class _Model:
    def __init__(self, spec: ModelSpec, settings: Settings):
        self.spec = spec
        self.retry_after = RetryAfter(settings, spec.id)
        self.budget = PixelBudget(settings, spec.id, self.retry_after)
        self.running = 0
        self.waiting = 0
        self.broken: str | None = None
        self.fail_next: Exception | None = None


class FakeEngine(EngineDefaults):
    """``EngineClient`` whose jobs finish at once (or when a test resumes them); see the module docstring."""

    def __init__(self, models: list[ModelSpec], settings: Settings):
        self.models = models
        self.settings = settings
        self._models = {spec.id: _Model(spec, settings) for spec in models}
        self.jobs: list[tuple[str, Job]] = []
        self.cancelled: list[tuple[str, Job]] = []
        self.loading = False
        self.closed = False
        self._paused = False

    # --- what tests steer -------------------------------------------------------------
    def pause(self) -> None:
        """Running jobs wait (and so fill the queue) until ``resume``."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def fail_next(self, model_id: str, error: Exception | None = None) -> None:
        """The next job of ``model_id`` fails with ``error`` (an ``InferenceFailed`` by default)."""
        self._models[model_id].fail_next = error or InferenceFailed("RuntimeError: the pipeline failed")

    def mark_broken(self, model_id: str, reason: str | None) -> None:
        """``model_id``'s workers failed to load (``None``: loaded again)."""
        self._models[model_id].broken = reason

    def queued(self, model_id: str) -> int:
        return self._models[model_id].waiting

    def running(self, model_id: str) -> int:
        return self._models[model_id].running

    # --- EngineClient -------------------------------------------------------------------
    async def start(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    def admit(self, model_id: str) -> None:
        model = self._models[model_id]
        if model.broken:
            raise NotReady(f"Model {model_id} is unavailable: its workers failed to load ({model.broken}); see the server log")
        if model.waiting >= self.settings.queue_size_for(model_id):
            raise QueueFull(retry_after=model.retry_after())
        model.budget.check()

    async def submit(self, model_id: str, job: Job, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        self.admit(model_id)
        model = self._models[model_id]
        deadline = time.monotonic() + self.settings.task_timeout_for(model_id)
        self.jobs.append((model_id, job))
        with model.budget.hold(job):
            try:
                return await self._run(model, job, deadline, on_partial)
            except asyncio.CancelledError:
                self.cancelled.append((model_id, job))
                raise

    async def _run(self, model: _Model, job: Job, deadline: float, on_partial) -> JobResult:
        model.waiting += 1
        try:
            while model.running >= self.settings.workers:
                await self._tick(deadline)
        finally:
            model.waiting -= 1
        model.running += 1
        try:
            started = time.time()
            if on_partial is not None:
                for index, seed in enumerate(job.seeds):
                    for partial_index in range(job.partial_images):
                        preview = fake_image(job, seed).reduce(2)
                        on_partial(PartialImage(index, partial_index, encoded(job, seed, preview)))
                        await asyncio.sleep(0)
            while self._paused:
                await self._tick(deadline)
            if model.fail_next is not None:
                error, model.fail_next = model.fail_next, None
                raise error
            images = [encoded(job, seed, fake_image(job, seed)) for seed in job.seeds]
            return JobResult(
                images=images,
                started=started,
                finished=time.time(),
                workers=[f"{model.spec.id}#0"],
                prompt_tokens=len(job.prompt.encode()),  # like the tiny models' byte-level tokenizer: a token a byte
                stats={"transformer_calls": float(job.num_inference_steps * job.n)},
            )
        finally:
            model.running -= 1

    async def _tick(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TaskTimeout()
        await asyncio.sleep(POLL_SECONDS)

    def ready(self) -> bool:
        return not self.loading and not any(m.broken for m in self._models.values())

    def failed(self) -> bool:
        return any(m.broken for m in self._models.values())

    def status(self) -> dict:
        out = {}
        for model_id, m in self._models.items():
            state = "failed" if m.broken else ("loading" if self.loading else "ready")
            worker_state = "busy" if m.running else "idle"
            out[model_id] = {
                "kind": m.spec.kind,
                "ready": state == "ready",
                "state": state,
                "queued_jobs": m.waiting,
                "queue_size": self.settings.queue_size_for(model_id),
                "task_timeout": self.settings.task_timeout_for(model_id),
                "worker_restarts": 0,
                "held_pixel_bytes": m.budget.held,
                "error": m.broken,
                "workers": [
                    {"name": f"{model_id}#{slot}", "state": worker_state, "pid": os.getpid(), "device": "cpu"}
                    for slot in range(self.settings.workers)
                ],
            }
        return out
