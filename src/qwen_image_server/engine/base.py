"""The interface between the API and whatever runs the pipelines.

The API layer knows only ``EngineClient``. The embedded engine (worker
processes on this machine) implements it; so can a cluster engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..jobs import Job, JobResult, PartialImage
from ..models.spec import ModelSpec


class EngineClient(Protocol):
    """Runs jobs on served models with a bounded queue and a per-task timeout."""

    models: list[ModelSpec]

    async def start(self) -> None:
        """Start workers; returns before they have loaded their models (see ``ready``)."""

    async def close(self) -> None:
        """Stop every worker; pending jobs fail."""

    async def submit(self, model_id: str, job: Job, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        """Run ``job`` on ``model_id``; ``on_partial`` receives previews (``job.partial_images``) as they come.

        Raises ``QueueFull`` at once when the model's queue is full, ``TaskTimeout``
        when the task timeout (counted from this call) passes, ``InferenceFailed``
        when the pipeline or its worker fails, ``NotReady`` when the model cannot
        load. Cancelling the awaiting task (a client that went away) drops the
        job's queued work and stops its running work at the next denoising step.
        """

    def admit(self, model_id: str) -> None:
        """Raise ``QueueFull`` or ``NotReady`` when ``submit`` would refuse any job on ``model_id`` now.

        Cheap: called before a request's uploads are decoded, so that a refused
        request costs no decoding. ``submit`` checks again (and also the job's size).
        """

    def ready(self) -> bool:
        """True once every worker has loaded its model."""

    def status(self) -> dict:
        """Workers per model: state, process id, device (for /ready and operators)."""
