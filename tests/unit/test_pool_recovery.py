"""A model's workers that cannot load (``engine/model_pool.py`` ``ModelPool``), on fake worker processes: the model is
failed only when none of its workers can serve; one worker that gives up (its GPU full, or broken) leaves the others
serving, and is tried again later. (The real-process case of a whole model failing: tests/e2e/test_recovery.py.)"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

from worker_fakes import FakeWorkerProcess

from qwen_image_server.config import Settings
from qwen_image_server.engine.model_pool import ModelPool
from qwen_image_server.engine.worker import Failed, LoadFailed, Ready
from qwen_image_server.errors import NotReady
from qwen_image_server.jobs import Job
from qwen_image_server.models.spec import ModelSpec


def _job() -> Job:
    return Job(mode="generate", prompt="a cat", seeds=[1])


def _pool(workers: int) -> tuple[ModelPool, list[FakeWorkerProcess], list[FakeWorkerProcess]]:
    """A pool of fake workers; the list after them collects the workers it replaces (its retries)."""
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    settings = Settings(worker_restart_limit=0, worker_retry_seconds=0.05)  # the first failure gives up
    pool = ModelPool(spec, settings, devices=[], threads=1, task_ids=itertools.count(), spawn=False)
    fakes = [FakeWorkerProcess(pool, slot, state="loading") for slot in range(workers)]
    pool.workers.extend(fakes)  # type: ignore[arg-type]
    replaced: list[FakeWorkerProcess] = []
    pool._replace = replaced.append  # type: ignore[method-assign,assignment]
    return pool, fakes, replaced


def test_a_worker_that_gives_up_loading_leaves_the_model_serving_on_its_others():
    async def run() -> None:
        pool, (good, bad), replaced = _pool(2)
        pool.on_message(good, Ready({"device": "cuda:0"}))  # type: ignore[arg-type]
        pool.on_message(bad, LoadFailed("out of memory on the device"))  # type: ignore[arg-type]
        bad.exit(0)
        assert pool.broken is None and pool.usable() and pool.ready()
        pool.admit()  # takes work, on the worker that loaded
        status = pool.status()
        assert status["state"] == "ready" and status["error"] is None
        assert status["workers"] == [{"name": "m#0", "state": "idle"}, {"name": "m#1", "state": "failed"}]
        await asyncio.sleep(0.2)
        assert replaced == [bad]  # tried again after worker_retry_seconds

    asyncio.run(run())


def test_a_model_none_of_whose_workers_loads_is_failed_and_tried_again():
    async def run() -> None:
        pool, (only,), replaced = _pool(1)
        pool.on_message(only, LoadFailed("out of memory on the device"))  # type: ignore[arg-type]
        only.exit(0)
        assert pool.broken == "out of memory on the device" and not pool.ready()
        try:
            pool.admit()
        except NotReady as exc:
            assert "Model m is unavailable: its workers failed to load (out of memory on the device)" in exc.message
        else:
            raise AssertionError("a failed model took work")
        assert pool.status()["state"] == "failed"
        await asyncio.sleep(0.2)
        assert replaced == [only]

    asyncio.run(run())


def test_a_worker_that_retires_gets_no_more_work_and_comes_back_at_once(monkeypatch):
    """A worker whose GPU broke fails its task saying it exits (``retiring``): the next queued task must not go to it
    (it would be lost with the process, as "exited unexpectedly"), and a worker that served is restarted at once,
    even while another worker of the model has given up loading."""

    from qwen_image_server.engine import model_pool

    monkeypatch.setattr(model_pool, "RETIRE_SECONDS", 0.05)

    async def run() -> None:
        pool, (good, other, bad), replaced = _pool(3)
        for worker in (good, other):
            pool.on_message(worker, Ready({"device": "cuda:0"}))  # type: ignore[arg-type]
        pool.on_message(bad, LoadFailed("out of memory on the device"))  # type: ignore[arg-type]
        bad.exit(0)  # gave up: failed, tried again later
        first = asyncio.ensure_future(pool.submit(_job(), time.monotonic() + 30))
        second = asyncio.ensure_future(pool.submit(_job(), time.monotonic() + 30))
        await asyncio.sleep(0.01)
        assert len(good.sent + other.sent) == 2 and good.running is not None and other.running is not None  # one task each
        worker, task_id = good, good.running.task.task_id
        pool.on_message(worker, Failed(task_id, "boom (the GPU failed; its worker is replaced)", retiring=True))  # type: ignore[arg-type]
        third = asyncio.ensure_future(pool.submit(_job(), time.monotonic() + 30))
        await asyncio.sleep(0.01)
        assert len(good.sent + other.sent) == 2 and worker.state == "restarting"  # the third waits for a worker that stays
        await asyncio.sleep(0.1)
        assert worker.killed  # its exit hung (a broken driver): killed RETIRE_SECONDS later
        worker.exit(1)
        assert worker.state == "restarting" and pool.broken is None  # restarted at once, not given up
        await asyncio.sleep(0.05)
        assert worker in replaced
        for task in (first, second, third):
            task.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)

    asyncio.run(run())


def test_a_task_failed_by_the_requests_own_field_is_a_400_and_the_worker_serves_on():
    from qwen_image_server.errors import InferenceFailed, RequestDoesNotFit

    async def run() -> None:
        pool, (worker,), _ = _pool(1)
        pool.on_message(worker, Ready({"device": "cuda:0"}))  # type: ignore[arg-type]
        outcomes = []
        for param in ("cache", None):
            task = asyncio.ensure_future(pool.submit(_job(), time.monotonic() + 30))
            await asyncio.sleep(0.01)
            assert worker.running is not None
            pool.on_message(worker, Failed(worker.running.task.task_id, "out of memory on the device", param=param))  # type: ignore[arg-type]
            outcomes.append((await asyncio.gather(task, return_exceptions=True))[0])
        assert isinstance(outcomes[0], RequestDoesNotFit) and outcomes[0].param == "cache"
        assert isinstance(outcomes[1], InferenceFailed) and pool.ready()

    asyncio.run(run())


def test_a_worker_is_restarted_once_its_start_is_prepared_off_the_event_loop(monkeypatch):
    """A crashed worker's replacement: what its start needs (a forkserver that died, started anew with seconds of
    imports) is made ready in a thread, and only then is the process started; the event loop answered nothing for
    6 s meanwhile when that ran on it."""
    import threading

    from qwen_image_server.engine import worker_process

    prepared: list[tuple[str, str, bool]] = []

    def prepare(setting: str, device: str) -> None:
        time.sleep(0.2)  # a forkserver's imports, shortened
        prepared.append((setting, device, threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(worker_process, "prepare_start", prepare)

    async def run() -> None:
        pool, (worker,), replaced = _pool(1)
        pool.on_message(worker, Ready({"device": "cpu"}))  # type: ignore[arg-type]
        worker.exit(-9)  # a crash while serving: restarted at once
        ticks = 0
        while not replaced:
            await asyncio.sleep(0.01)  # the loop runs on while the start is prepared
            ticks += 1
        assert prepared == [("auto", "fake", False)] and replaced == [worker]
        assert ticks >= 10

    asyncio.run(run())


def test_a_model_that_was_ready_stays_ready_while_one_worker_is_restarted():
    """Once every worker had loaded, a worker that crashed and reloads leaves the model (and ``/ready``) ready while
    another serves: a readiness probe took the whole server out of service for as long as one worker reloaded. At
    start, every worker must have loaded first; with no worker serving, the model is not ready."""

    async def run() -> None:
        pool, (first, second), replaced = _pool(2)
        pool.on_message(first, Ready({"device": "cpu"}))  # type: ignore[arg-type]
        assert not pool.ready()  # the second still loads: not ready at start
        pool.on_message(second, Ready({"device": "cpu"}))  # type: ignore[arg-type]
        assert pool.ready()
        first.exit(-9)  # a crash while serving
        assert first.state == "restarting" and pool.ready() and pool.status()["state"] == "ready"
        second.exit(-9)  # and then the other: nothing serves
        assert not pool.ready()

    asyncio.run(run())


def test_preparing_a_start_waits_for_a_new_forkservers_imports(tmp_path):
    """``prepare_start`` returns only once a forkserver started anew has imported its preload (forking a process
    that does nothing): ``ensure_running`` alone returned at once, and the replacement's ``Process.start`` on the
    event loop then waited for the imports. Run in a process of its own, with a preload that takes 0.3 s (the check
    comes a few milliseconds after a start that does not wait)."""
    import subprocess
    import sys

    (tmp_path / "slow_preload.py").write_text(
        "import pathlib, time\ntime.sleep(0.3)\npathlib.Path(__file__).with_name('imported').write_text('done')\n"
    )
    script = (
        "import pathlib\n"
        "from qwen_image_server.engine import worker_process\n"
        "worker_process.FORKSERVER_PRELOAD = ['slow_preload']\n"
        "worker_process.prepare_start('forkserver', 'cpu')\n"
        f"print(pathlib.Path({str(tmp_path)!r}, 'imported').exists())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "True"), result.stderr[-2000:]


def test_a_replacement_that_cannot_start_is_tried_again(monkeypatch):
    """No process could be started in a crashed worker's place (out of memory, of file descriptors): logged, and
    tried again a little later, instead of leaving the slot "restarting" for good."""
    from qwen_image_server.engine import model_pool, worker_process

    monkeypatch.setattr(model_pool, "RESTART_RETRY", 0.05)
    tries: list[str] = []

    def prepare(setting: str, device: str) -> None:
        tries.append(device)
        if len(tries) == 1:
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(worker_process, "prepare_start", prepare)

    async def run() -> None:
        pool, (worker,), replaced = _pool(1)
        pool.on_message(worker, Ready({"device": "cpu"}))  # type: ignore[arg-type]
        worker.exit(-9)
        for _ in range(200):
            if replaced:
                break
            await asyncio.sleep(0.01)
        assert len(tries) == 2 and replaced == [worker]

    asyncio.run(run())


def test_a_load_failures_public_reason_keeps_its_advice_and_says_where_it_is_cut():
    """An attention backend's load failure ends with its advice: cut at 200 characters, it stopped at "Please"."""
    from qwen_image_server.engine.worker_process import public_reason

    advice = "RuntimeError: flash attention is not available: missing package or the version is too old. " * 2
    assert public_reason(advice + "Please install flash-attn") == advice + "Please install flash-attn"
    long = public_reason("x" * 1000)
    assert len(long) == 400 and long.endswith("...")
    assert public_reason("no file /home/me/models/a/b.bin") == "no file <path>"


def test_a_full_queues_retry_after_counts_only_the_workers_that_serve():
    """Retry-After is the model's job time over the workers that take its jobs: a worker that gave up loading runs
    none, and counting it told clients to come back before a job could have ended."""
    from qwen_image_server.errors import QueueFull

    async def run() -> None:
        pool, (good, bad), _ = _pool(2)
        pool.waiting_jobs = pool.settings.queue_size  # a full queue
        pool.on_message(good, Ready({"device": "cuda:0"}))  # type: ignore[arg-type]
        pool.on_message(bad, LoadFailed("out of memory on the device"))  # type: ignore[arg-type]
        bad.exit(0)
        for _ in range(20):
            pool.retry_after.observe(10.0)
        try:
            pool.admit()
        except QueueFull as exc:
            assert exc.headers["Retry-After"] == "10", exc.headers  # one worker serves: 10 s, not 5
        else:
            raise AssertionError("a full queue took a job")

    asyncio.run(run())
