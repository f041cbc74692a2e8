"""The embedded engine: worker processes on this machine, one device and one pipeline each (or, with
``--share-components``, one process per slot serving every model; see ``worker_process.py``).

All bookkeeping runs on the event loop thread. Each worker has two helper
threads in this process: one blocks on the worker's pipe and hands every
message to the loop (``call_soon_threadsafe``), one sends to it. So the API
never blocks its event loop on a worker. Each model's workers, queue and recovery are its
``ModelPool`` (``model_pool.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable

from ..config import Settings
from ..jobs import Job, JobResult, PartialImage
from ..models.plan_result import Plan
from ..models.planner import checked_plan
from ..models.spec import ModelSpec
from .model_pool import ModelPool
from .worker_process import WorkerProcess


class LocalEngine:
    """``EngineClient`` on worker processes of this machine: ``settings.workers_for(model)`` per model, where the plan put them."""

    proxy_echoes_request_ids = False  # uvicorn serves its requests directly
    draining = False  # uvicorn closes the listener on shutdown, and answers what was accepted before

    def __init__(self, models: list[ModelSpec], settings: Settings, plan: Plan | None = None):
        self.models = models
        self.settings = settings
        self.plan = plan  # the memory plan (``models/planner.py``): a device per worker slot
        self.pools: dict[str, ModelPool] = {}

    async def start(self) -> None:
        if self.plan is None:
            self.plan = await asyncio.to_thread(checked_plan, self.models, self.settings)
        devices = {spec.id: self.plan.devices(spec.id) for spec in self.models}
        shared = self.settings.share_components and len(self.models) > 1
        processes = devices[self.models[0].id] if shared else [d for per_model in devices.values() for d in per_model]
        cpu_workers = sum(d == "cpu" for d in processes)
        threads = self.settings.cpu_threads or (max(1, (os.cpu_count() or 1) // max(1, cpu_workers)) if cpu_workers else 2)
        task_ids = itertools.count(1)
        for spec in self.models:
            self.pools[spec.id] = ModelPool(spec, self.settings, devices[spec.id], threads, task_ids, spawn=not shared)
        if shared:  # slot i of every model is one process, on the device the plan gave that slot
            pools = list(self.pools.values())
            for slot, device in enumerate(processes):
                process = WorkerProcess(pools, slot, device, threads)
                for pool in pools:
                    pool.workers.append(process)

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))

    async def submit(self, model_id: str, job: Job, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        deadline = time.monotonic() + self.settings.task_timeout_for(model_id)
        return await self.pools[model_id].submit(job, deadline, on_partial)

    def admit(self, model_id: str) -> None:
        self.pools[model_id].admit()

    def ready(self) -> bool:
        return bool(self.pools) and all(pool.ready() for pool in self.pools.values())

    def failed(self) -> bool:
        """Some model's workers gave up loading (it is retried every ``worker_retry_seconds``)."""
        return any(pool.broken for pool in self.pools.values())

    def status(self) -> dict:
        return {model_id: pool.status() for model_id, pool in self.pools.items()}

    def gpus(self) -> list[dict]:
        """Per GPU: planned and live memory, and the workers placed there (for ``/ready`` and ``/v1/models``)."""
        if self.plan is None:
            return []
        return self.plan.gpu_report([w.describe(pool) for pool in self.pools.values() for w in pool.workers])

    def host(self) -> dict | None:
        """The machine's memory and what the workers keep there, when the plan checked it (``/ready``, ``/v1/models``)."""
        return self.plan.host_report() if self.plan is not None else None

    def memory(self, model_id: str) -> dict | None:
        """The memory estimate of one model and its workers' devices."""
        return self.plan.model_summary(model_id) if self.plan is not None else None
