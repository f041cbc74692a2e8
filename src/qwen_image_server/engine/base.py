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
    #: The requests reach this app through a proxy that names each in ``X-Request-ID`` and echoes it on the answer
    #: (Ray Serve's): the app uses that id and leaves the header to the proxy (``api.security.RequestIds``).
    proxy_echoes_request_ids: bool
    #: Shutting down: new requests are refused while those in flight finish (the Ray ingress's ``drain``; the
    #: embedded server closes its listener instead). ``/ready`` then says ``shutting_down``.
    draining: bool

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

    def failed(self) -> bool:
        """True while some model is down: its workers gave up loading (``/ready`` says ``failed``)."""

    def gpus(self) -> list[dict] | None:
        """Per GPU: planned and live memory and the workers placed there (``/ready``, ``/v1/models``, ``/metrics``);
        None from an engine that does not plan its devices."""

    def host(self) -> dict | None:
        """The machine's memory and what CPU workers keep there, when the engine's plan checked it; else None."""

    def memory(self, model_id: str) -> dict | None:
        """One model's memory estimate and its workers' devices (its ``/v1/models`` card), when planned; else None."""


class EngineDefaults:
    """What an engine answers for what it does not do, mixed in by engines that lack some of it: it plans no devices
    (the Ray engine: each replica checks its own GPU), admits every job until ``submit`` (which then refuses what it
    must), has no model that is down, and answers requests directly (no proxy naming them)."""

    proxy_echoes_request_ids = False
    draining = False

    def admit(self, model_id: str) -> None:
        return None

    def failed(self) -> bool:
        return False

    def gpus(self) -> list[dict] | None:
        return None

    def host(self) -> dict | None:
        return None

    def memory(self, model_id: str) -> dict | None:
        return None
