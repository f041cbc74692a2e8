"""The Ray Serve engine: the same API on replicas spread over a cluster of GPU machines.

One deployment per served model (one replica per GPU, one pipeline call at a
time per replica, a bounded queue, autoscaling between min and max replicas),
and an ingress deployment that runs the very same FastAPI app as the embedded
engine (``create_app``, passed in by ``ray_app.py``) with a ``RayEngine`` behind
``EngineClient``. Replicas return encoded image bytes. Timeouts and client
disconnects cancel the replica call; the replica (``engine/ray_replica.py``) stops its
pipeline at the next denoising step.

Importing this module needs ``ray[serve]`` (``pip install 'qwen-image-server[ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

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
from .admission import PixelBudget, retry_after
from .base import EngineDefaults
from .pieces import split_for, wait_all
from .ray_replica import MemoryNeed, ModelReplica, retrieve_outcome
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
        self._budgets = {spec.id: PixelBudget(settings, spec.id) for spec in models}
        self._ready_cache: tuple[float, bool, dict] = (0.0, False, {})
        self._reading_status = threading.Lock()  # held while a thread reads Serve's status
        self.draining = False  # set by ``drain``: new requests are refused, those in flight run on
        self.cut = False  # set by ``drain(cut=True)``: the jobs in flight are stopped too, answered 503
        self._cuts: set[asyncio.Future] = set()  # one per running job: resolved to stop it
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the jobs run on (``drain`` may come from another)

    async def start(self) -> None:
        for index, spec in enumerate(self.models):
            handle = serve.get_deployment_handle(deployment_name(index, spec), app_name=self.app_name)
            self.handles[spec.id] = handle.options(stream=True, method_name="run")

    async def close(self) -> None:
        self.handles.clear()

    async def submit(self, model_id: str, job: Job, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        deadline = time.monotonic() + self.settings.task_timeout_for(model_id)
        self.admit(model_id)
        self._loop = asyncio.get_running_loop()
        self._in_flight[model_id] += 1
        try:
            with self._budgets[model_id].hold(job):
                return await self._run(model_id, job, deadline, on_partial)
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
            raise QueueFull(retry_after=retry_after(self.settings, model_id))
        self._budgets[model_id].check()

    def drain(self, on: bool = True, cut: bool = False) -> int:
        """Refuse new requests from now on (503 ``shutting_down``), or (``on=False``) take them again; the jobs
        still in flight here. With ``cut``, stop those too: each is answered 503 ``shutting_down`` (an error event
        on a stream) and its replica calls are cancelled, as the embedded server does at the end of its shutdown
        grace. Otherwise Serve's deletion of the application ends them with its own plain-text 500 "replica died",
        after giving the replicas a grace of their own. Safe from any thread."""
        self.draining = on
        self.cut = on and cut
        if self.cut and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all)
        return sum(self._in_flight.values())

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
            raise InferenceFailed("replica returned no result")

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
            raise _as_server_error(exc, retry_after(self.settings, model_id), model_id) from None
        return JobResult.combine(results)

    def _serve_status(self) -> tuple[bool, dict]:
        """Whether the app runs, and its deployments' states, as last read from Serve's controller (not ready before
        the first reading). A reading older than a second starts a new one in a thread: ``/ready`` and ``/metrics``
        answer at once instead of holding this replica's event loop, and its other requests, while the controller
        answers."""
        if time.monotonic() - self._ready_cache[0] >= 1.0 and self._reading_status.acquire(blocking=False):
            threading.Thread(target=self._read_serve_status, name="serve status", daemon=True).start()
        _, ready, deployments = self._ready_cache  # one reading's both parts
        return ready, deployments

    def _read_serve_status(self) -> None:
        try:
            ready, deployments = self._serve_status_now()
            self._ready_cache = (time.monotonic(), ready, deployments)  # the next reading a second after this one
        finally:
            self._reading_status.release()

    def _serve_status_now(self) -> tuple[bool, dict]:
        try:
            app = serve.status().applications[self.app_name]
            deployments: dict[str, Any] = {
                name: {
                    "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                    "replicas": dict(d.replica_states),
                }
                for name, d in app.deployments.items()
            }
            ready = str(app.status.value if hasattr(app.status, "value") else app.status) == "RUNNING"
        except Exception as exc:  # the controller is unreachable
            ready, deployments = False, {"error": f"{type(exc).__name__}: {exc}"}
        return ready, deployments

    def ready(self) -> bool:
        return self._serve_status()[0]

    def failed(self) -> bool:
        """Some model's deployment is unhealthy or failed to deploy (``/ready`` says ``failed``, not ``loading``)."""
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
            state = _MODEL_STATE.get(status.upper(), "loading")
            out[spec.id] = {
                "kind": spec.kind,
                "ready": state == "ready",
                "state": state,
                "jobs_in_flight": self._in_flight[spec.id],
                "queue_size": self.settings.queue_size_for(spec.id),
                "task_timeout": self.settings.task_timeout_for(spec.id),
                "deployment": name,
                "deployment_status": status or None,
                "replicas": deployment.get("replicas", {}) if isinstance(deployment, dict) else {},
            }
            if "error" in deployments:
                out[spec.id]["error"] = public_reason(str(deployments["error"]))
        return out


#: Serve deployment statuses as the model states of ``/metrics`` (anything else: loading).
_MODEL_STATE = {
    "HEALTHY": "ready",
    "UPSCALING": "ready",
    "DOWNSCALING": "ready",
    "UNHEALTHY": "failed",
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
        return InferenceFailed("replica died while running the task")
    if "TaskCancelled" in name:
        return TaskCancelled()
    cause = getattr(exc, "cause", None) or exc
    return task_failure(short_reason(cause, request=True), failure_param(cause))


#: Builds the ingress's ASGI app around its engine (``api.app.create_app``; passed in, as the engine
#: layer does not import the API).
AppFactory = Callable[[Settings, "RayEngine"], Any]


class CancelledIsDisconnect:
    """ASGI middleware of the ingress. Serve cancels a request whose client went away, and the request's pending
    ``receive()`` then raises Serve's cancellation error instead of returning ``http.disconnect``: an exception
    that reached the catch-all handler (logged as an unexpected error with its traceback, counted as a 500) where
    Starlette and the routes expect the disconnect it is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def receive_or_disconnect():
            try:
                return await receive()
            except (TaskCancelledError, RequestCancelledError):
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect if scope["type"] == "http" else receive, send)


def ingress_app(settings: Settings, specs: list[ModelSpec], make_app: AppFactory, app_name: str):
    """The ingress replica's app: ``make_app`` on a ``RayEngine`` of the application ``app_name``, Serve's
    cancellations read as disconnects."""
    engine = RayEngine(specs, settings, app_name)
    _INGRESS_ENGINES[app_name] = engine  # for the ingress's ``drain`` method (one app per ingress replica process)
    app = make_app(settings, engine)
    app.add_middleware(CancelledIsDisconnect)
    return app


#: The engine of each application whose ingress runs in this process.
_INGRESS_ENGINES: dict[str, RayEngine] = {}


def drain_ingress(app_name: str, on: bool = True, cut: bool = False) -> int:
    """``RayEngine.drain`` of the application's ingress in this process. A module function: the ``Ingress`` class,
    defined in ``build_deployments``, travels to the replica by value, with a copy of any module dict it names."""
    return _INGRESS_ENGINES[app_name].drain(on, cut)


def replica_gpus(settings: Settings, cluster_gpus: Callable[[], tuple[float, str]] | None = None) -> float:
    """GPUs per model replica: ``ray_gpus_per_replica`` when set (a share of one GPU at most: a replica uses one);
    else ``--device cpu`` 0 and ``cuda`` 1; under ``auto``, 1 when there is a GPU to run on: in the Ray cluster, or
    on this machine when Ray has not started yet (``serve run`` builds the application before it starts or joins
    Ray). Ray places the replicas, so a device list of the embedded engine (``cuda:1``, ``cuda:0,cuda:1``) counts as
    ``cuda`` (or ``cpu``), with a warning; one that mixes both is refused. ``cluster_gpus`` (for tests) answers
    ``(GPUs, where they were counted)``."""
    from ..models.spec import ModelConfigError

    device, gpus = settings.device, settings.ray_gpus_per_replica
    if device not in ("auto", "cpu", "cuda"):
        kinds = {entry.split(":")[0] for entry in device.split(",")}
        if len(kinds) > 1:
            raise ModelConfigError(
                f"--device {device}: under --engine ray the replicas of every model are all on GPUs or all on CPUs, "
                "and Ray places them; give --device cuda or cpu"
            )
        log.warning("--device %s: under --engine ray, Ray places the model replicas; taken as %s", device, kinds.pop())
        device = "cuda" if device.startswith("cuda") else "cpu"
    if gpus is not None:
        if gpus > 1:
            raise ModelConfigError(
                f"ray_gpus_per_replica {gpus:g}: a replica runs its pipeline on one GPU; give 1, or a share of one"
            )
        if (device == "cpu" and gpus > 0) or (device == "cuda" and gpus == 0):
            log.warning("ray_gpus_per_replica %g and --device %s disagree: the replicas get %g GPU", gpus, device, gpus)
        return gpus
    if device != "auto":
        return 1 if device == "cuda" else 0
    found, where = (cluster_gpus or _cluster_gpus)()
    chosen = 1 if found > 0 else 0
    log.info("each model replica gets %d GPU (%s has %g; ray_gpus_per_replica chooses otherwise)", chosen, where, found)
    if not chosen:
        log.warning(
            "no GPU in %s: the model replicas run on the CPU. GPU nodes that join later (an autoscaled GPU group) "
            "get none of them: set ray_gpus_per_replica (QIS_RAY_GPUS_PER_REPLICA) to 1 for those",
            where,
        )
    return chosen


def model_gpus(settings: Settings, model: str, every: float) -> float:
    """GPUs per replica of ``model``: its own ``--ray-gpus-per-replica S@MODEL`` (small models sharing a GPU while
    large ones take one each), else ``every`` (``replica_gpus``)."""
    own = settings.own_values("ray_gpus_per_replica")
    if model not in own:
        return every
    log.info("each replica of %s gets %g GPU (its own ray_gpus_per_replica)", model, own[model])
    return float(own[model])


def placement_shortfall(settings: Settings, gpus_of: dict[str, float], cluster: dict | None) -> str | None:
    """The warning when the model replicas to start (each model's least replica count; ``gpus_of``: each model's GPUs
    per replica) ask Ray for more CPUs or GPUs than the cluster has (``cluster``: its resources, None when unknown):
    those that do not fit wait for a node to join, and ``/ready`` says "loading" meanwhile (``--workers
    2@qwen-image-tiny --demo`` on a 2-core machine asked for 3 CPUs). Only totals are compared: shares of GPUs that
    add up within the cluster's may still not pack onto its GPUs, and replicas autoscaling adds later wait as well."""
    if cluster is None:
        return None
    replicas = {model: settings.replicas_for(model)[0] for model in gpus_of}
    need = {
        "CPU": sum(count * settings.ray_cpus_per_replica for count in replicas.values()),
        "GPU": sum(count * gpus_of[model] for model, count in replicas.items()),
    }
    short = [(kind, wanted, cluster.get(kind, 0.0)) for kind, wanted in need.items() if wanted > cluster.get(kind, 0.0)]
    if not short:
        return None
    what = "; ".join(
        f"{wanted:g} {kind}{'s' if wanted != 1 else ''}, the Ray cluster has {have:g}" for kind, wanted, have in short
    )
    return (
        f"the {sum(replicas.values())} model replicas to start ask for more than the cluster holds ({what}): those "
        "that do not fit wait for a node to join, and /ready says loading until then. Fewer --workers, a smaller "
        "QIS_RAY_CPUS_PER_REPLICA (or ray_gpus_per_replica), or more nodes make them fit"
    )


def _cluster_resources() -> dict | None:
    """The resources of the Ray cluster this process is connected to, or None before Ray is started or joined (or
    when the cluster does not say: the warning they serve is not worth a failed start)."""
    import ray

    try:
        return dict(ray.cluster_resources()) if ray.is_initialized() else None
    except Exception as exc:
        log.debug("could not read the Ray cluster's resources: %s", exc)
        return None


def _cluster_gpus() -> tuple[float, str]:
    """The GPUs of the Ray cluster this process is connected to, or of this machine when Ray is not started yet."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0), "the Ray cluster"
    from ..models.machine import discover_gpus

    return len(discover_gpus() or []), "this machine (Ray is not started yet)"


def memory_needs(specs: list[ModelSpec], settings: Settings, share: float = 1.0) -> dict[str, MemoryNeed]:
    """What one GPU replica of each model needs (the memory plan's estimate, from the model's files; a model whose
    files cannot be read here gets no check). Ray places replicas by GPU count, not memory: each replica checks its
    GPU's free memory against this before it loads (``ModelReplica``), as the embedded engine's plan does before
    any worker starts."""
    from ..models.plan_advice import needs as described
    from ..models.plan_footprints import footprints_for
    from ..models.weights_files import UnknownFootprint, read_tensors

    out = {}
    for spec in specs:
        try:
            tensors = read_tensors(spec)
        except UnknownFootprint as exc:
            log.warning("memory estimate of %s unknown (its replicas load without a check): %s", spec.id, exc)
            continue
        fp = footprints_for([spec], {spec.id: tensors}, settings, on_gpu=True)[spec.id]
        out[spec.id] = MemoryNeed(fp.total + fp.load_extra, described(fp), settings.memory_check, share)
    return out


def build_deployments(settings: Settings, specs: list[ModelSpec], make_app: AppFactory):
    """The Serve application: one deployment per model plus an ingress serving ``make_app(settings, RayEngine)``."""
    from ..models.memory_modes import check_memory_modes

    every = replica_gpus(settings)
    gpus_of = {spec.id: model_gpus(settings, spec.id, every) for spec in specs}
    shortfall = placement_shortfall(settings, gpus_of, _cluster_resources())
    if shortfall:
        log.warning(shortfall)
    bound = []
    for index, spec in enumerate(specs):
        gpus = gpus_of[spec.id]
        device = "cuda" if gpus else "cpu"
        check_memory_modes([spec], device)  # on the replicas' device, not on the machine that builds the application
        needs = memory_needs([spec], settings, gpus) if gpus and settings.memory_check != "off" else {}
        low, high = settings.replicas_for(spec.id)
        deployment = serve.deployment(
            name=deployment_name(index, spec),
            ray_actor_options={"num_gpus": gpus, "num_cpus": settings.ray_cpus_per_replica},
            max_ongoing_requests=1,
            # Ray counts calls, one per piece of a job (an image or a batch of them); the engine admits the model's
            # jobs up to replicas + queue size (``RayEngine.admit``): room for every piece of those, so that Ray never
            # refuses what the engine took (an idle model refused n=10 with a queue of 8 so).
            max_queued_requests=(high + settings.queue_size_for(spec.id)) * settings.max_n,
            autoscaling_config={
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": 1,
            },
            health_check_period_s=2,
            health_check_timeout_s=30,
            # A replica Serve stops (a redeploy, a scale-down, an app's deletion) first finishes its running call.
            graceful_shutdown_timeout_s=settings.shutdown_grace_seconds,
        )(ModelReplica)
        stuck_after = settings.stuck_task_seconds_for(spec.id)
        bound.append(deployment.bind(spec, device, settings.dtype, settings.cpu_threads, stuck_after, needs.get(spec.id)))

    def build_ingress_app():
        # The application's name is chosen by whoever deploys it (serve run names it "default").
        return ingress_app(settings, specs, make_app, serve.get_replica_context().app_name)

    class Ingress:
        """The HTTP entry point: the embedded server's FastAPI app on a Ray engine."""

        def __init__(self, *model_handles):
            self.model_handles = model_handles  # keeps the model deployments in this application

        def drain(self, on: bool = True, cut: bool = False) -> int:
            """Refuse new requests (503 ``shutting_down``), or take them again; the requests still in flight. With
            ``cut``, those are stopped and answered 503 too (``RayEngine.drain``)."""
            return drain_ingress(serve.get_replica_context().app_name, on, cut)

    ingress = serve.deployment(
        name="ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_grace_seconds + 5,  # its requests wait for the models'
    )(serve.ingress(build_ingress_app)(Ingress))  # fmt: skip
    return ingress.bind(*bound)
