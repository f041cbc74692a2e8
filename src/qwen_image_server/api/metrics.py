"""Prometheus metrics at ``/metrics``: requests, their latency, the jobs' time split, and the engine's state.

Each app has its own ``CollectorRegistry`` (the factory may build several apps in
one process), never the global one. Request counts come from an ASGI middleware
that sits outside every other one, so refusals made by middlewares (401, 403, 413)
and unexpected errors (500) are counted too. Engine gauges are read from the
engine when scraped. Every label value is bounded: route templates (``other`` for
unknown paths), served model and LoRA ids (``other`` for any other name, ``none``
when the request named none), status codes, and the engine's own worker names,
devices and states. No prompt or other free text ever becomes a label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match

from ..engine.base import EngineClient
from ..jobs import RUN_COUNTERS, JobResult
from ..serving.service import Prepared

log = logging.getLogger(__name__)

OTHER = "other"  # a path no route serves, or a model name the server does not serve
NONE = "none"  # a request that named no model (or that is not about one)
MODEL_STATES = ("ready", "loading", "failed")
WORKER_STATES = ("loading", "idle", "busy", "restarting", "failed")
GIB = 1024**3

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_ENCODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Worker memory fields (GiB, as the workers report them) and the ``kind`` label each becomes.
_WORKER_MEMORY = {
    "allocated": ("cuda_allocated_gib", "allocated_gib"),
    "reserved": ("cuda_reserved_gib", "reserved_gib"),
    "peak": ("cuda_peak_gib",),
}


def _job_histogram(registry: CollectorRegistry, part: str, help_text: str, buckets=None) -> Histogram:
    return Histogram(f"qis_job_{part}_seconds", help_text, ["model"], buckets=buckets or _JOB_BUCKETS, registry=registry)


#: The help text of each of ``jobs.RUN_COUNTERS`` as a Prometheus counter.
_RUN_COUNTER_HELP = {
    "transformer_calls": "Transformer calls of the pipelines (two per step with true CFG)",
    "cached_calls": "Transformer calls served from the step cache",
    "prompt_encodings": "Passes of the text encoder",
    "prompt_cache_hits": "Prompt encodings served from the workers' prompt caches",
}


class Metrics:
    """One app's registry and metrics, with the label rules that keep every label value bounded."""

    def __init__(self, engine: EngineClient):
        # No ``*_created`` series beside each counter and histogram (a timestamp per label set: a third of a scrape's
        # lines, and none of the documented metrics); prometheus_client's switch is for the whole process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        models = engine.models
        self.model_ids = frozenset(spec.id for spec in models) | frozenset(
            lora.name for spec in models for lora in spec.profile.loras
        )
        #: Another name of a model or LoRA id (``--model-alias``) counts as that id: one model's requests in one series.
        self.aliases = {alias: name for spec in models for alias, name in spec.aliases}
        r = self.registry
        self.requests = Counter("qis_requests", "HTTP requests", ["route", "model", "status"], registry=r)
        self.latency = Histogram(
            "qis_request_duration_seconds",
            "HTTP request latency to the last byte",
            ["route", "model", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_seconds = _job_histogram(r, "queue", "Seconds a job waited for a worker (until its first pipeline start)")
        self.pipeline_seconds = _job_histogram(r, "pipeline", "Seconds of a job's pipeline runs (first start to last end)")
        self.encode_seconds = _job_histogram(r, "encode", "Seconds encoding a job's images (pieces summed)", _ENCODE_BUCKETS)
        self.images = Counter("qis_images", "Images produced", ["model"], registry=r)
        self.refusals = Counter(
            "qis_connection_refusals",
            "Answers a connection got before the application (slow or oversized heads, broken HTTP, the connection cap)",
            ["status", "code"],
            registry=r,
        )
        self.url_fetches = Counter(
            "qis_image_url_fetches",
            "Input images given by URL: fetched, refused before any fetch (not under an allowed prefix, malformed) or failed",
            ["outcome"],
            registry=r,
        )
        self.url_bytes = Counter("qis_image_url_bytes", "Bytes of input images fetched by URL", registry=r)
        for outcome in ("fetched", "refused", "failed"):
            self.url_fetches.labels(outcome)
        #: The jobs' run counters (the responses' ``stats``), each a counter named after it.
        self.run_counters = {key: Counter(f"qis_{key}", _RUN_COUNTER_HELP[key], ["model"], registry=r) for key in RUN_COUNTERS}
        for model in sorted(self.model_ids):  # present at 0 from the start, so that rate() works from the first job
            for counter in (self.images, *self.run_counters.values()):
                counter.labels(model)
        r.register(EngineCollector(engine))

    def model_label(self, name: object) -> str:
        """A served model or LoRA id as itself, an alias as the id it names; no name as ``none``; any other name as
        ``other``."""
        if name is None or name == "":
            return NONE
        name = self.aliases.get(name, name) if isinstance(name, str) else name
        return name if isinstance(name, str) and name in self.model_ids else OTHER

    def count_refusal(self, status: int, code: str) -> None:
        """One answer a connection got before the application (``connections.GuardedH11Protocol``); its code is one
        of that module's few."""
        self.refusals.labels(str(status), code).inc()

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model, str(status)).observe(seconds)

    def observe_job(self, prepared: Prepared, result: JobResult, stats: dict) -> None:
        """Called by the service for every finished job (plain and streamed)."""
        model = self.model_label(prepared.job.lora or prepared.spec.id)
        self.images.labels(model).inc(len(result.images))
        self.pipeline_seconds.labels(model).observe(stats.get("pipeline_seconds", result.finished - result.started))
        if "queue_seconds" in stats:
            self.queue_seconds.labels(model).observe(stats["queue_seconds"])
        if "encode_seconds" in stats:
            self.encode_seconds.labels(model).observe(stats["encode_seconds"])
        for key, counter in self.run_counters.items():
            counter.labels(model).inc(max(0, stats.get(key, 0)))

    def observe_fetch(self, outcome: str, size: int) -> None:
        """Called by the service for each input image given by URL (``serving/fetch.py``)."""
        self.url_fetches.labels(outcome).inc()
        self.url_bytes.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(routes: Iterable, scope) -> str:
    """The path template of the route serving ``scope`` (also when only the method differs), else ``other``."""
    full, partial = _match(routes, scope, "")
    return full or partial or OTHER


def _match(routes: Iterable, scope, prefix: str) -> tuple[str | None, str | None]:
    """(template of the route that fully matches, of the first that matches but for the method); into included routers."""
    partial = None
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included router: look at its own routes
        if inner is not None:
            extra = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            path = scope.get("path", "")
            if not path.startswith(extra):
                continue
            full, inner_partial = _match(inner.routes, {**scope, "path": path[len(extra) :]}, prefix + extra)
            if full:
                return full, None
            partial = partial or inner_partial
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot judge this scope
            continue
        if match == Match.FULL and hasattr(route, "path"):
            return prefix + route.path, None
        if match == Match.PARTIAL and partial is None and hasattr(route, "path"):
            partial = prefix + route.path
    return None, partial


class RequestMetrics:
    """ASGI middleware (the outermost): counts and times every HTTP request, whoever answers it.

    The model label is what the route noted in ``request.state.model`` (the name the
    request gave, then the model that ran it), mapped by ``Metrics.model_label``.
    """

    def __init__(self, app, metrics: Metrics, routes: list):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_template(self.routes, scope)
        started = time.perf_counter()
        status: int | None = None
        finished = False  # the answer's last byte went out
        cut: int | None = None  # what ended the request early: 499 a client gone, 500 an error

        async def send_status(message):
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            cut = 499  # the client went away
            raise
        except BaseException:
            cut = 500  # Starlette's outermost handler answers 500
            raise
        finally:
            state = scope.get("state", {})
            model = self.metrics.model_label(state.get("model"))
            code = status or cut or 500
            if status == 200 and state.get("outcome"):  # a stream that ended in an error event: counted as that error
                code = state["outcome"]
            elif status == 200 and not finished:  # a stream (its 200 sent first) whose client went away mid-way
                code = cut or 499
            self.metrics.observe_request(route, model, code, time.perf_counter() - started)


class EngineCollector:
    """Gauges read from the engine at scrape time: model states, queues, workers, restarts and GPU memory.

    Reads ``engine.status()`` (per model: ``state``, ``queue_size``, ``task_timeout``; the embedded engine's also
    ``queued_jobs``, ``worker_restarts`` and ``workers`` with their reported ``memory``, the Ray engine's
    ``jobs_in_flight``), and ``engine.gpus()`` where there is one.
    """

    def __init__(self, engine: EngineClient):
        self.engine = engine
        self.models = [spec.id for spec in engine.models]

    def _status(self) -> dict:
        return {m: s for m, s in self.engine.status().items() if m in self.models}

    def collect(self):
        try:
            status = self._status()
            gpus = self.engine.gpus() or []
        except Exception:  # a scrape never fails because the engine could not answer
            log.exception("reading the engine's state for /metrics failed")
            return

        def gauge(name: str, help_text: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, labels=["model", *labels])

        state = gauge("qis_model_state", "1 for the model's state (ready, loading or failed), else 0", "state")
        queue = gauge("qis_queue_depth", "Jobs waiting for a worker (not all of their images handed out)")
        queue_size = gauge("qis_queue_size", "Jobs that may wait for a worker before the next is refused (503)")
        timeout = gauge("qis_task_timeout_seconds", "Seconds a job gets from acceptance before its 504")
        running = gauge("qis_running_tasks", "Tasks (pieces of jobs) running on the model's workers")
        workers = gauge("qis_workers", "The model's workers in each state", "state")
        in_flight = gauge("qis_jobs_in_flight", "Jobs accepted and not finished (queued or running)")
        restarts = CounterMetricFamily(
            "qis_worker_restarts", "Workers that exited unexpectedly (restarted, or their model marked failed)", labels=["model"]
        )
        memory = gauge(
            "qis_worker_gpu_memory_bytes", "GPU memory of a worker, as it last reported it (at load, after its first job)",
            "worker", "device", "kind",
        )  # fmt: skip
        for model, s in status.items():
            for name in MODEL_STATES:
                state.add_metric([model, name], 1.0 if s.get("state") == name else 0.0)
            if "queued_jobs" in s:
                queue.add_metric([model], s["queued_jobs"])
            if "queue_size" in s:
                queue_size.add_metric([model], s["queue_size"])
            if "task_timeout" in s:
                timeout.add_metric([model], s["task_timeout"])
            if "jobs_in_flight" in s:
                in_flight.add_metric([model], s["jobs_in_flight"])
            if "worker_restarts" in s:
                restarts.add_metric([model], s["worker_restarts"])
            described = s.get("workers")
            if not isinstance(described, list):
                continue
            running.add_metric([model], sum(w.get("state") == "busy" for w in described))
            for name in WORKER_STATES:
                workers.add_metric([model, name], sum(w.get("state") == name for w in described))
            for w in described:
                reported = w.get("memory") or {}
                for kind, keys in _WORKER_MEMORY.items():
                    value = next((reported[k] for k in keys if isinstance(reported.get(k), (int, float))), None)
                    if value is not None:
                        memory.add_metric([model, str(w.get("name", "")), str(w.get("device", "")), kind], value * GIB)
        yield from (state, queue, queue_size, timeout, running, workers, in_flight, restarts, memory)
        yield from _gpu_families(gpus)


def _gpu_families(gpus: list[dict]):
    """Per GPU of the memory plan: its total, planned use, and used memory as the workers last saw it."""
    fields = {
        "total_gib": ("qis_gpu_total_bytes", "GPU memory in all"),
        "planned_gib": ("qis_gpu_planned_bytes", "GPU memory the plan gives the workers placed here"),
        "used_gib": ("qis_gpu_used_bytes", "GPU memory in use, as the last worker here to report saw it"),
    }
    for key, (name, help_text) in fields.items():
        family = GaugeMetricFamily(name, help_text, labels=["device"])
        for gpu in gpus:
            if isinstance(gpu.get(key), (int, float)):
                family.add_metric([str(gpu.get("device", ""))], gpu[key] * GIB)
        yield family


def install_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Add ``GET /metrics``; the caller passes ``metrics.observe_job`` to the service and adds ``RequestMetrics``
    as the outermost middleware."""
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus' text format (needs an API key when keys are set, unless ``QIS_PUBLIC_METRICS``)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
