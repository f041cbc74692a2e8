"""The Ray Serve application's deployments: one per served model (``ModelReplica`` replicas, each on its share of
a GPU), and the ingress that runs the API on a ``RayEngine`` (``engine/ray_serve.py``); how many GPUs each replica
asks for, whether the cluster can place them, and what memory each checks for before it loads.

Importing this module needs ``ray[serve]`` (``pip install 'qwen-image-server[ray]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from ..config import Settings
from ..logs import API_FORMAT, log_to_stderr
from ..models.spec import ModelSpec
from .ray_replica import MemoryNeed, ModelReplica
from .ray_serve import RayEngine, deployment_name

log = logging.getLogger(__name__)


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


def ingress_app(settings: Settings, specs: list[ModelSpec], make_app: AppFactory, app_name: str, log_level: str = "info"):
    """The ingress replica's app: ``make_app`` on a ``RayEngine`` of the application ``app_name``, Serve's
    cancellations read as disconnects; its log lines as the embedded API process's."""
    engine = RayEngine(specs, settings, app_name)
    _INGRESS_ENGINES[app_name] = engine  # for the ingress's ``drain`` method (one app per ingress replica process)
    app = make_app(settings, engine)  # with the request id of every log line (``install_request_id_logging``)
    log_to_stderr(log_level, API_FORMAT)
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


def build_deployments(settings: Settings, specs: list[ModelSpec], make_app: AppFactory, log_level: str = "info"):
    """The Serve application: one deployment per model plus an ingress serving ``make_app(settings, RayEngine)``;
    their log lines at ``log_level`` and above."""
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
        bound.append(
            deployment.bind(spec, device, settings.dtype, settings.cpu_threads, stuck_after, needs.get(spec.id), log_level)
        )

    def build_ingress_app():
        # The application's name is chosen by whoever deploys it (serve run names it "default").
        return ingress_app(settings, specs, make_app, serve.get_replica_context().app_name, log_level)

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
