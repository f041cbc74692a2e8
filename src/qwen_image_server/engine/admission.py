"""What a model's jobs may hold in the API process: the bytes of their input pixels.

Both engines keep a job's arrays (``Job.images``, ``Job.mask``, the kept uploads of
a mask edit) in the API process from ``submit`` until the job ends. ``PixelBudget``
caps their sum per model (``max_queued_pixel_bytes``): a job that would go over is
refused with ``QueueFull`` (503 with Retry-After), like a full queue. A job larger
than the whole cap is still taken when the model holds nothing else, so that
every request that passed validation can run at some point.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from ..config import Settings
from ..errors import QueueFull
from ..jobs import Job


def retry_after(settings: Settings, model: str) -> int:
    """Seconds a refused client is told to wait (a tenth of the model's task timeout, at least 1)."""
    return max(1, math.ceil(settings.task_timeout_for(model) / 10))


def job_bytes(job: Job) -> int:
    """Bytes of the job's input pixels (and kept uploads) that stay in memory while it is queued or runs."""
    arrays = sum(a.nbytes for a in job.images) + (job.mask.nbytes if job.mask is not None else 0)
    kept = sum(len(data) for data in job.inpaint_source) if job.inpaint_source else 0
    return arrays + kept


class PixelBudget:
    """The input-pixel bytes held by one model's jobs, and the cap on them."""

    def __init__(self, settings: Settings, model: str):
        self.settings = settings
        self.model = model
        self.cap = settings.max_queued_pixel_bytes
        self.held = 0

    def check(self, nbytes: int = 0) -> None:
        """Raise ``QueueFull`` when ``nbytes`` more would go over the cap (a first job is always taken)."""
        if self.held and self.held + nbytes > self.cap:
            raise QueueFull(retry_after=retry_after(self.settings, self.model))
        if not nbytes and self.held >= self.cap:
            raise QueueFull(retry_after=retry_after(self.settings, self.model))

    @contextlib.contextmanager
    def hold(self, job: Job) -> Iterator[None]:
        """Count ``job``'s bytes while the block runs (refused with ``QueueFull`` when they do not fit)."""
        nbytes = job_bytes(job)
        self.check(nbytes)
        self.held += nbytes
        try:
            yield
        finally:
            self.held -= nbytes
