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
from collections.abc import Callable, Iterator

from ..config import Settings
from ..errors import QueueFull
from ..jobs import Job

#: The longest wait a refusal asks for: OpenAI's SDKs wait what Retry-After says up to 60 s, and ignore a longer one.
MAX_RETRY_AFTER = 60


class RetryAfter:
    """Seconds a client refused by a model's full queue (or its pixel budget) is told to wait: about until the model's
    next job ends and one that waits starts, from how long its recent jobs ran (an exponential mean) over its
    workers; before any job has ended, a tenth of its task timeout. From 1 to 60 s. (The tenth of the task timeout
    alone told clients 60 s by default, however short the model's jobs: the SDK waited a minute for a queue that
    had cleared in ten seconds.)"""

    def __init__(self, settings: Settings, model: str, workers: Callable[[], int] = lambda: 1):
        self.first = math.ceil(settings.task_timeout_for(model) / 10)
        self.workers = workers
        self.mean: float | None = None

    def observe(self, seconds: float) -> None:
        """A job of the model ran ``seconds`` (its first start to its last end)."""
        self.mean = seconds if self.mean is None else 0.7 * self.mean + 0.3 * seconds

    def __call__(self) -> int:
        wait = self.first if self.mean is None else math.ceil(self.mean / max(1, self.workers()))
        return min(MAX_RETRY_AFTER, max(1, wait))


def job_bytes(job: Job) -> int:
    """Bytes of the job's input pixels (and kept uploads) that stay in memory while it is queued or runs."""
    arrays = sum(a.nbytes for a in job.images) + (job.mask.nbytes if job.mask is not None else 0)
    kept = sum(len(data) for data in job.inpaint_source) if job.inpaint_source else 0
    return arrays + kept


class PixelBudget:
    """The input-pixel bytes held by one model's jobs, and the cap on them."""

    def __init__(self, settings: Settings, model: str, retry_after: Callable[[], int] | None = None):
        self.cap = settings.max_queued_pixel_bytes
        self.retry_after = retry_after or RetryAfter(settings, model)
        self.held = 0

    def check(self, nbytes: int = 0) -> None:
        """Raise ``QueueFull`` when ``nbytes`` more would go over the cap (a first job is always taken)."""
        if (self.held and self.held + nbytes > self.cap) or (not nbytes and self.held >= self.cap):
            raise QueueFull(retry_after=self.retry_after())

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
