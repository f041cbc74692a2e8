"""The units of work that flow from the API to the engine and its workers.

Plain picklable dataclasses: they cross process boundaries (and, with Ray,
machine boundaries). Pixels travel as ``numpy`` arrays, results as encoded bytes.
A bottom module: every layer may import it, it imports no layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

Mode = Literal["generate", "edit", "inpaint", "variation"]
OutputFormat = Literal["png", "jpeg", "webp"]
#: The counters of a job's ``stats`` (summed over its pieces; 0 where a run reports none): transformer calls and
#: those the step cache served, prompt encodings and those the prompt cache served.
RUN_COUNTERS = ("transformer_calls", "cached_calls", "prompt_encodings", "prompt_cache_hits")


@dataclass
class Job:
    """One request's worth of work: ``len(seeds)`` images of the same prompt and settings.

    Image ``i`` is made with ``seeds[i]``; the serving layer sets ``seeds[i] = seed + i``.
    """

    mode: Mode
    prompt: str
    seeds: list[int]
    negative_prompt: str = " "  # Qwen-Image needs one (" " is enough) for true CFG
    width: int | None = None  # size the pipeline renders at; None: the pipeline's choice (edit, size=auto)
    height: int | None = None
    out_width: int | None = None  # final size if it differs from the rendered one (center crop / resize)
    out_height: int | None = None
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    images: list[np.ndarray] = field(default_factory=list)  # edit inputs, HxWx3 uint8
    mask: np.ndarray | None = None  # HxW uint8, 255 where the image is to be repainted
    # Mask edits of downscaled inputs: the uploaded image and mask bytes, decoded again by the worker
    # to paste the original back at its full size (serving/inputs.py).
    inpaint_source: tuple[bytes, bytes] | None = None
    output_format: OutputFormat = "png"
    output_compression: int = 100
    strength: float = 0.6  # variations (img2img): how far from the input image to move
    partial_images: int = 0  # previews per image, at evenly spaced denoising steps
    preview_scale: float = 1.0  # previews decoded at this fraction of the side, then enlarged (a quarter of the work at 0.5)
    cache: str | None = None  # step cache policy for this job ("none": off); None: the model's profile
    lora: str | None = None  # the LoRA id the request named (its adapter and preset scheduler); None: the base model
    lora_scale: float | None = None  # the LoRA's strength for this job; None: the one it is served with

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def denoising_steps(self) -> int:
        """How many denoising steps the pipeline runs: a variation (img2img) skips the first ``steps * (1 -
        strength)`` of them, as diffusers' ``get_timesteps`` does; everything else runs all of them."""
        steps = self.num_inference_steps
        if self.mode == "variation":
            return steps - int(max(steps - min(steps * self.strength, steps), 0))
        return steps

    def split(self, batch_size: int) -> list[Job]:
        """The same job cut into pieces of at most ``batch_size`` images, seeds kept in order."""
        return [replace(self, seeds=self.seeds[i : i + batch_size]) for i in range(0, len(self.seeds), batch_size)]


@dataclass
class EncodedImage:
    """One finished image, encoded in the job's output format."""

    seed: int
    data: bytes
    width: int
    height: int


@dataclass
class PartialImage:
    """A preview of image ``index`` (of its job) decoded from the current denoising estimate."""

    index: int
    partial_index: int
    image: EncodedImage


@dataclass
class Task:
    """A piece of a job handed to one worker; ``model`` names the pipeline in a worker that serves several."""

    task_id: int
    job: Job
    model: str = ""


@dataclass
class TaskResult:
    """What a worker sends back for one task; ``started``/``finished`` are epoch seconds of the pipeline run."""

    task_id: int
    images: list[EncodedImage]
    started: float
    finished: float
    worker: str = ""
    prompt_tokens: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # counters of the run (transformer_calls), encode_seconds


@dataclass
class JobResult:
    """A whole job's images in seed order, with when and where they were made."""

    images: list[EncodedImage]
    started: float
    finished: float
    workers: list[str]
    prompt_tokens: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # the tasks' counters and encode seconds, summed

    @classmethod
    def combine(cls, results: list[TaskResult]) -> JobResult:
        """The job's result from its tasks' results, given in seed order."""
        return cls(
            images=[image for result in results for image in result.images],
            started=min(r.started for r in results),
            finished=max(r.finished for r in results),
            workers=sorted({r.worker for r in results}),
            prompt_tokens=results[0].prompt_tokens,
            stats={key: sum(r.stats.get(key, 0) for r in results) for key in dict.fromkeys(k for r in results for k in r.stats)},
        )
