"""A worker still running a task it was told to stop, ``stuck_task_seconds`` later: the embedded engine kills it
(the real-process case, a frozen worker, is in tests/e2e/test_engine_behaviour.py); a Ray replica fails Serve's
health check, and Serve replaces it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time

import pytest
from worker_fakes import FakeWorkerProcess, stub_runner

from qwen_image_server.config import Settings
from qwen_image_server.engine.model_pool import ModelPool
from qwen_image_server.engine.worker import Cancel, RunTask
from qwen_image_server.errors import TaskTimeout
from qwen_image_server.jobs import Job, Task
from qwen_image_server.models.spec import ModelSpec


def _run_to_timeout(
    stops: bool, stuck_task_seconds: float, own: list[str] | None = None, forkserver_gone: bool = False
) -> FakeWorkerProcess:
    """Model ``m``'s task times out on a fake worker; ``own``: ``--stuck-task-seconds S@MODEL`` values."""

    async def run() -> FakeWorkerProcess:
        spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
        settings = Settings(stuck_task_seconds=stuck_task_seconds, model_stuck_task_seconds=own or [])
        pool = ModelPool(spec, settings, devices=[], threads=1, task_ids=itertools.count(), spawn=False)
        worker = FakeWorkerProcess(pool, stops=stops)
        worker.forkserver_gone = forkserver_gone
        pool.workers.append(worker)  # type: ignore[arg-type]
        with pytest.raises(TaskTimeout):
            await pool.submit(Job(mode="generate", prompt="p", seeds=[1]), time.monotonic() + 0.05)
        assert [type(m) for m in worker.sent] == [RunTask, Cancel]
        await asyncio.sleep(0.3)  # past the watchdog's 0.1 s
        return worker

    return asyncio.run(run())


def test_a_worker_that_does_not_stop_its_task_is_killed():
    assert _run_to_timeout(stops=False, stuck_task_seconds=0.1).killed


def test_a_stuck_worker_is_killed_after_its_forkserver_died():
    """Once the forkserver that started a worker is gone, ``Process.is_alive()`` says the worker ended (exit code
    255) while it runs on: a stuck one was never killed, and every later request to its model timed out."""
    assert _run_to_timeout(stops=False, stuck_task_seconds=0.1, forkserver_gone=True).killed


def test_a_worker_that_stops_its_task_is_left_alone():
    worker = _run_to_timeout(stops=True, stuck_task_seconds=0.1)
    assert not worker.killed and worker.running is None and worker.state == "idle"


def test_zero_never_kills():
    assert not _run_to_timeout(stops=False, stuck_task_seconds=0).killed


def test_a_model_of_its_own_stuck_seconds_follows_them():
    assert _run_to_timeout(stops=False, stuck_task_seconds=0, own=["0.1@m"]).killed
    assert not _run_to_timeout(stops=False, stuck_task_seconds=0.1, own=["0@m", "0@other"]).killed


@pytest.mark.parametrize("stops", [False, True], ids=["stuck", "stops"])
def test_a_ray_replica_is_unhealthy_while_a_task_told_to_stop_still_runs(monkeypatch, stops):
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine import ray_replica

    started, release = threading.Event(), threading.Event()

    class Runner:  # what the replica uses of a PipelineRunner
        last_stats: dict = {}
        last_prompt_tokens = 0

        def __init__(self, spec, device, dtype, warm=True):
            pass

        def warm_up(self):
            pass

        def run(self, job, should_stop, on_partial):
            started.set()
            while not release.is_set() and not (stops and should_stop()):
                time.sleep(0.01)
            return []

    stub_runner(monkeypatch, Runner)
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cpu", "auto", None, stuck_task_seconds=0.2)

    async def run() -> list[bool]:
        healthy = []

        def check() -> None:
            try:
                replica.check_health()
                healthy.append(True)
            except RuntimeError:
                healthy.append(False)

        call = asyncio.ensure_future(replica.run(Task(1, Job(mode="generate", prompt="p", seeds=[1]))).__anext__())
        assert await asyncio.to_thread(started.wait, 10)
        await asyncio.sleep(0.3)
        check()  # running past the limit, but nobody asked it to stop
        call.cancel()  # the caller went away (or timed out): the task is told to stop
        with contextlib.suppress(asyncio.CancelledError):
            await call
        check()  # just told
        await asyncio.sleep(0.3)
        check()  # past the limit: stuck, unless it stopped
        release.set()
        while replica._running is not None or replica._stop_asked:
            await asyncio.sleep(0.01)
        check()  # its pipeline ended: healthy again
        return healthy

    assert asyncio.run(run()) == [True, True, stops, True]


def test_a_job_that_ended_leaves_nothing_of_its_images_in_the_pool():
    """A job ended by its timeout (or a client gone) gives its images back at once, not at the next full garbage
    collection nor ``stuck_task_seconds`` (300 by default) later: the stuck-task timer kept every cancelled running
    job's uploads alive for that long, outside the pixel budget, and a cancelled job still queued behind a busy
    worker kept its pieces in the queue until that worker was free. (Checked with the collector off: freed by
    reference counting alone.)"""
    import gc
    import weakref

    import numpy as np

    async def run() -> list[weakref.ref]:
        spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="edit")
        pool = ModelPool(spec, Settings(), devices=[], threads=1, task_ids=itertools.count(), spawn=False)
        worker = FakeWorkerProcess(pool, stops=False)  # never answers its Cancel: the timer stays armed
        pool.workers.append(worker)  # type: ignore[arg-type]
        refs = []
        jobs = []
        for _ in range(2):  # the first runs (and is stuck), the second waits in the queue
            image = np.zeros((64, 64, 3), np.uint8)
            refs.append(weakref.ref(image))
            jobs.append(
                asyncio.ensure_future(
                    pool.submit(Job(mode="edit", prompt="p", seeds=[1], images=[image]), time.monotonic() + 0.05)
                )
            )
            del image
        for job in jobs:
            with pytest.raises(TaskTimeout):
                await job
        del jobs, job
        assert worker.running is not None  # still "running" the first, as far as the pool knows
        worker.running = None  # what the worker's answer would do, however late
        worker.sent.clear()  # what the fake keeps of its messages (a real worker's go down its pipe)
        return refs

    gc.disable()
    try:
        refs = asyncio.run(run())
        assert [ref() is None for ref in refs] == [True, True]
    finally:
        gc.enable()
