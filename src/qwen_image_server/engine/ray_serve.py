"""The Ray Serve engine: the same API on replicas spread over a cluster of GPU machines.

One deployment per served model (one replica per GPU, one pipeline call at a
time per replica, a bounded queue, autoscaling between min and max replicas),
and an ingress deployment that runs the very same FastAPI app as the embedded
engine (``create_app``, passed in by ``ray_app.py``) with a ``RayEngine`` (this
module) behind ``EngineClient``; ``engine/ray_deploy.py`` builds the deployments. Replicas return encoded image bytes. Timeouts and client
disconnects cancel the replica call; the replica (``engine/ray_replica.py``) stops its
pipeline at the next denoising step.

Importing this module needs ``ray[serve]`` (``pip install 'qwen-image-server[ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError

from ..config import Settings
from ..errors import (
    InferenceFailed,
    NotReady,
    QueueFull,
    ShuttingDown,
    TaskCancelled,
    failure_param,
    short_reason,
    task_failure,
)
from ..jobs import Job, JobResult, PartialImage, Task, TaskResult
from ..models.spec import ModelSpec
from .admission import PixelBudget, RetryAfter
from .base import EngineDefaults
from .pieces import split_for, wait_all
from .ray_replica import retrieve_outcome
from .worker_process import public_reason

log = logging.getLogger(__name__)


def deployment_name(index: int, spec: ModelSpec) -> str:
    """A Serve deployment name for a model (Serve names allow fewer characters than model ids)."""
    return f"model{index}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", spec.id)


class RayEngine(EngineDefaults):
    """``EngineClient`` on Ray Serve deployment handles (used inside the ingress replica). It plans no devices: each
    replica checks its model's memory against its own GPU (``ray_replica.py``)."""

    #: Serve's proxy puts every request's id in its X-Request-ID (the client's, or one it makes) and echoes it on the
    #: answer: the app uses that id and leaves the header to the proxy (``api.security.RequestIds``)
    proxy_echoes_request_ids = True

    def __init__(self, models: list[ModelSpec], settings: Settings, app_name: str):
        self.models = models
        self.settings = settings
        self.app_name = app_name
        self.handles: dict = {}
        self._task_ids = iter(range(1, 2**62))
        self._in_flight: dict[str, int] = {spec.id: 0 for spec in models}
        self._retry_after = {
            spec.id: RetryAfter(settings, spec.id, functools.partial(self._replicas, spec.id)) for spec in models
        }
        self._budgets = {spec.id: PixelBudget(settings, spec.id, self._retry_after[spec.id]) for spec in models}
        self._ready_cache: tuple[bool, dict] = (False, {})  # the last reading of Serve's status
        self._polling: threading.Thread | None = None  # reads Serve's status (``_poll_serve_status``)
        self._polled = threading.Lock()  # one thread starts the poller
        self._stop_polling = threading.Event()
        self._was_running = False  # the app has been RUNNING: every replica had loaded once
        self.draining = False  # set by ``drain``: new requests are refused, those in flight run on
        self.cut = False  # set by ``drain(cut=True)``: the jobs in flight are stopped too, answered 503
        self._cuts: set[asyncio.Future] = set()  # one per running job: resolved to stop it
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the jobs run on (``drain`` may come from another)

    async def start(self) -> None:
        for index, spec in enumerate(self.models):
            handle = serve.get_deployment_handle(deployment_name(index, spec), app_name=self.app_name)
            self.handles[spec.id] = handle.options(stream=True, method_name="run")
        self._serve_status()  # the first reading starts now, not at the first probe

    async def close(self) -> None:
        self._stop_polling.set()
        self.handles.clear()

    async def submit(self, model_id: str, job: Job, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        deadline = time.monotonic() + self.settings.task_timeout_for(model_id)
        self.admit(model_id)
        self._loop = asyncio.get_running_loop()
        self._in_flight[model_id] += 1
        try:
            with self._budgets[model_id].hold(job):
                result = await self._run(model_id, job, deadline, on_partial)
            self._retry_after[model_id].observe(result.finished - result.started)
            return result
        finally:
            self._in_flight[model_id] -= 1

    def admit(self, model_id: str) -> None:
        """Refuse at once while draining, or when the model's jobs fill its replicas and queue, or its pixel budget."""
        if self.draining:
            raise ShuttingDown()
        replicas = self._replicas(model_id)
        # The same bound as the embedded engine: as many jobs as replicas run, queue_size wait. (Ray's
        # max_queued_requests, its queue of calls, holds every piece of these jobs: a second guard only.)
        if self._in_flight[model_id] >= replicas + self.settings.queue_size_for(model_id):
            raise QueueFull(retry_after=self._retry_after[model_id]())
        self._budgets[model_id].check()

    def drain(self, on: bool = True, cut: bool = False) -> int:
        """Refuse new requests from now on (503 ``shutting_down``), or (``on=False``) take them again; the jobs
        still in flight here. With ``cut``, stop those too: each is answered 503 ``shutting_down`` (an error event
        on a stream) and its replica calls are cancelled, as the embedded server does at the end of its shutdown
        grace. Otherwise Serve's deletion of the application ends them with its own plain-text 500 "replica died",
        after giving the replicas a grace of their own. Safe from any thread."""
        self.draining = on
        self.cut = on and cut
        in_flight = sum(self._in_flight.values())  # before the cut: the loop may end those jobs before this returns
        if self.cut and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all)
        return in_flight

    def _cut_all(self) -> None:
        for cut in list(self._cuts):
            if not cut.done():
                cut.set_result(None)

    async def _unless_cut(self, work: Coroutine[Any, Any, list[TaskResult]]) -> list[TaskResult]:
        """``work``'s result, or ``ShuttingDown`` as soon as ``drain(cut=True)`` stops the jobs in flight (``work``
        is cancelled then, as when the caller is)."""
        if self.cut:  # no await from here to the registration below: a cut from now on finds this job
            work.close()
            raise ShuttingDown()
        cut = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(work)
        self._cuts.add(cut)
        try:
            await asyncio.wait({running, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._cuts.discard(cut)
            if not running.done():
                running.cancel()
        if not running.done() or running.cancelled():
            raise ShuttingDown()
        return running.result()

    def _replicas(self, model_id: str) -> int:
        """The model's largest replica count: its ``--workers N@MODEL``, else ``ray_max_replicas`` (default --workers)."""
        return max(1, self.settings.replicas_for(model_id)[1])

    async def _run(self, model_id: str, job: Job, deadline: float, on_partial) -> JobResult:
        batch, pieces = split_for(job, self._replicas(model_id), self.settings.max_batch_size)
        streams = [self.handles[model_id].remote(Task(next(self._task_ids), piece)) for piece in pieces]

        async def collect(stream, offset: int) -> TaskResult:
            async for item in stream:
                if isinstance(item, PartialImage):
                    if on_partial is not None:
                        item.index += offset
                        on_partial(item)
                else:
                    return item
            raise InferenceFailed("replica returned no result", retryable=True)

        tasks = [asyncio.ensure_future(collect(stream, i * batch)) for i, stream in enumerate(streams)]
        try:
            results = await self._unless_cut(wait_all(tasks, deadline))
        except BaseException as exc:
            for stream in streams:
                # cancel() fetches the call's outcome first and re-raises a refused call's error
                # (BackPressureError): that must not replace the typed error raised below.
                with contextlib.suppress(Exception):
                    stream.cancel()
            for t in tasks:
                t.cancel()
                # A cancelled stream ends its read with Serve's own error rather than the task's cancellation:
                # retrieved here, or asyncio logs "Task exception was never retrieved" for each piece.
                t.add_done_callback(retrieve_outcome)
            raise _as_server_error(exc, self._retry_after[model_id](), model_id) from None
        return JobResult.combine(results)

    #: Seconds between two readings of Serve's status.
    STATUS_SECONDS = 1.0

    def _serve_status(self) -> tuple[bool, dict]:
        """Whether the app serves, and its deployments' states, as last read from Serve's controller (not ready
        before the first reading). A thread reads them every ``STATUS_SECONDS`` for as long as the engine runs:
        ``/ready`` and ``/metrics`` answer at once instead of holding this replica's event loop, and its other
        requests, while the controller answers, and what they answer is at most that old (a reading started by a
        probe was as old as the probe before it)."""
        if self._polling is None:
            with self._polled:
                if self._polling is None:
                    self._polling = threading.Thread(target=self._poll_serve_status, name="serve status", daemon=True)
                    self._polling.start()
        return self._ready_cache  # one reading's both parts

    def _poll_serve_status(self) -> None:
        while True:
            self._ready_cache = self._serve_status_now()
            if self._stop_polling.wait(self.STATUS_SECONDS):
                return

    def _serve_status_now(self) -> tuple[bool, dict]:
        """Serve's status now. The app serves once it has been RUNNING (every replica loaded) while every deployment
        has a running replica: one replica replaced after a crash (its deployment UNHEALTHY, the app with it) does
        not take the server out of a load balancer's rotation while others serve, as an embedded worker's restart
        does not."""
        try:
            app = serve.status().applications[self.app_name]
            deployments: dict[str, Any] = {
                name: {
                    "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                    "replicas": dict(d.replica_states),
                }
                for name, d in app.deployments.items()
            }
            running = str(app.status.value if hasattr(app.status, "value") else app.status) == "RUNNING"
            self._was_running = self._was_running or running
            serving = bool(deployments) and all(d["replicas"].get("RUNNING", 0) > 0 for d in deployments.values())
            ready = running or (self._was_running and serving)
        except Exception as exc:  # the controller is unreachable
            ready, deployments = False, {"error": f"{type(exc).__name__}: {exc}"}
        return ready, deployments

    def ready(self) -> bool:
        """Serving, and not shutting down: a draining ingress refuses new requests, so a load balancer should stop
        sending them."""
        return not self.draining and self._serve_status()[0]

    def failed(self) -> bool:
        """Some model's deployment failed to deploy (``/ready`` says ``failed``, not ``loading``)."""
        return any(model["state"] == "failed" for model in self.status().values())

    def status(self) -> dict:
        """Per model, as the embedded engine's ``status()`` is keyed (``/ready``'s ``models``, ``/metrics``): its
        deployment's state as ready/loading/failed, this ingress's jobs in flight, the model's queue size and task
        timeout, and its deployment's name, Serve status and replica states (an ``error`` instead, with paths
        removed, when Serve's controller cannot be asked)."""
        deployments = self._serve_status()[1]
        out = {}
        for index, spec in enumerate(self.models):
            name = deployment_name(index, spec)
            deployment = deployments.get(name)
            status = deployment.get("status", "") if isinstance(deployment, dict) else ""
            replicas = deployment.get("replicas", {}) if isinstance(deployment, dict) else {}
            state = _MODEL_STATE.get(status.upper(), "loading")
            if status.upper() in ("UNHEALTHY", "DEPLOY_FAILED") and replicas.get("RUNNING", 0) > 0:
                state = "ready"  # a replica replaced (or a redeploy failed) while the others serve
            out[spec.id] = {
                "kind": spec.kind,
                "ready": state == "ready",
                "state": state,
                "jobs_in_flight": self._in_flight[spec.id],
                "queue_size": self.settings.queue_size_for(spec.id),
                "task_timeout": self.settings.task_timeout_for(spec.id),
                "deployment": name,
                "deployment_status": status or None,
                "replicas": replicas,
            }
            if "error" in deployments:
                out[spec.id]["error"] = public_reason(str(deployments["error"]))
        return out


#: Serve deployment statuses as the model states of ``/metrics`` (anything else: loading).
_MODEL_STATE = {
    "HEALTHY": "ready",
    "UPSCALING": "ready",
    "DOWNSCALING": "ready",
    "UNHEALTHY": "loading",  # a replica died and Serve starts another: an embedded worker's restart says loading
    "DEPLOY_FAILED": "failed",
}


def _as_server_error(exc: BaseException, retry_after: int = 1, model: str = "the model") -> BaseException:
    """Ray's exceptions as this server's typed errors."""
    from ..errors import ServerError

    if isinstance(exc, (ServerError, TaskCancelled, asyncio.CancelledError)):
        return exc
    if isinstance(exc, BackPressureError):  # Ray's caller-side queue (max_queued_requests) is full
        return QueueFull(retry_after=retry_after)
    name = type(exc).__name__
    if name == "DeploymentUnavailableError":  # Serve gave up starting its replicas (DEPLOY_FAILED): no retry comes
        return NotReady(f"Model {model} is unavailable: its deployment's replicas failed to start; see `serve status`")
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name or "Unavailable" in name:
        return InferenceFailed("replica died while running the task", retryable=True)
    if "TaskCancelled" in name:
        return TaskCancelled()
    cause = getattr(exc, "cause", None) or exc
    return task_failure(short_reason(cause, request=True), failure_param(cause))
