"""The Ray engine's request path (``engine/ray_serve.py`` ``RayEngine``) without a running Ray: deployment handles
replaced by fakes that answer as Serve's do."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from types import SimpleNamespace

import pytest
from worker_fakes import FakeRunner, stub_runner

from conftest import asgi_call
from qwen_image_server.config import Settings
from qwen_image_server.jobs import Job, Task
from qwen_image_server.models.spec import ModelSpec


class Cancelled(Exception):
    """What Serve's response stream raises when it is cancelled (``RequestCancelledError``)."""


class Stream:
    """A replica's answer that never comes, as a long run's: cancelling it ends a pending read with ``Cancelled``
    (Serve turns the read's ``CancelledError`` into its own error)."""

    def __init__(self):
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise Cancelled() from None
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    def __init__(self):
        self.streams: list[Stream] = []

    def remote(self, task) -> Stream:
        self.streams.append(Stream())
        return self.streams[-1]


def _engine_on_fake_handles():
    """A ``RayEngine`` of one model (two replicas) whose deployment handle is a ``Handle``: answers that never come."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_serve import RayEngine
    from qwen_image_server.models.spec import resolve_model

    spec = resolve_model("random:Qwen/Qwen-Image")
    engine = RayEngine([spec], Settings(engine="ray", workers=2), "app")
    engine.handles[spec.id] = handle = Handle()
    return spec, engine, handle


def _note_unretrieved(unretrieved: list[str]) -> None:
    """The running loop's errors nobody retrieved go to ``unretrieved`` (asyncio would log them)."""
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context["message"]))


def test_a_request_cancelled_while_its_pieces_run_leaves_no_unretrieved_error():
    """The client goes away while the replicas run its request: every piece's stream is cancelled, and the pieces'
    errors (Serve's cancellation error) are retrieved, not logged by asyncio as "Task exception was never retrieved"
    for every cancelled request."""
    spec, engine, handle = _engine_on_fake_handles()
    unretrieved: list[str] = []

    async def main() -> None:
        _note_unretrieved(unretrieved)
        request = asyncio.ensure_future(engine.submit(spec.id, Job(mode="generate", prompt="p", seeds=[1, 2])))
        while len(handle.streams) < 2:
            await asyncio.sleep(0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        for _ in range(5):  # the pieces end on the next turns of the loop
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved error is reported when its task is collected

    asyncio.run(main())
    gc.collect()
    assert [s.cancelled for s in handle.streams] == [True, True]
    assert engine._in_flight[spec.id] == 0
    assert not unretrieved, unretrieved


def test_a_replica_run_stopped_by_its_caller_leaves_no_unretrieved_error(monkeypatch):
    """The ingress cancels a replica's call (its client went away): the pipeline stops at its next step with
    ``TaskCancelled``, an outcome no one awaits any more, which asyncio logged as "Future exception was never
    retrieved" with a traceback for every stopped call."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine import ray_replica

    runner = FakeRunner()  # its "wait" prompt runs until told to stop, then raises TaskCancelled

    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: runner)
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cpu", "auto", None)
    unretrieved: list[str] = []

    async def main() -> None:
        _note_unretrieved(unretrieved)
        call = asyncio.ensure_future(replica.run(Task(1, Job(mode="generate", prompt="wait", seeds=[1]))).__anext__())
        assert await asyncio.to_thread(runner.started.wait, 10)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        while replica._running is not None or replica._stop_asked:  # the pipeline thread ends
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert not unretrieved, unretrieved


def test_the_ingress_reads_serves_cancellation_as_the_client_gone(tiny_models, tmp_path, caplog):
    """In the ingress replica, Serve cancels a request whose client left, and the request's ``receive()`` raises
    Serve's cancellation error: the app answers it as a disconnect (499, nothing logged as an error), not as an
    unexpected error (500 with a traceback) or a body it could not parse (400)."""
    pytest.importorskip("ray.serve")
    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import RequestCancelledError

    from qwen_image_server.api.app import create_app
    from qwen_image_server.engine.ray_deploy import ingress_app
    from qwen_image_server.models.configured import resolve_configured

    settings = Settings(models=[f"{n}={f}" for n, f in tiny_models.items()], image_output_dir=tmp_path, engine="ray")
    app = ingress_app(settings, resolve_configured(settings), create_app, "app")
    for error in (TaskCancelledError(), RequestCancelledError("r-1")):
        sent = asgi_call(app, "POST", "/v1/images/generations", JSON_20_BYTES, receive=_raising(error))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499, sent[:1]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_draining_engine_refuses_new_requests_and_counts_those_in_flight():
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_serve import RayEngine
    from qwen_image_server.errors import ShuttingDown
    from qwen_image_server.models.spec import resolve_model

    spec = resolve_model("random:Qwen/Qwen-Image")
    engine = RayEngine([spec], Settings(engine="ray", workers=2), "app")
    engine._in_flight[spec.id] = 2
    assert engine.drain() == 2
    with pytest.raises(ShuttingDown):
        engine.admit(spec.id)
    assert engine.drain(False) == 2
    engine.admit(spec.id)  # takes requests again


def test_a_cut_stops_the_jobs_in_flight_with_a_503_and_cancels_their_replica_calls():
    """What ``ray_app.stop`` does at the end of the shutdown grace (``drain(cut=True)``, from another thread as
    Serve's handle may call it): each running job ends with ``ShuttingDown`` (503 ``shutting_down``), its streams are
    cancelled, no error is left unretrieved; a job started after the cut is refused, and ``drain(False)`` ends it."""
    spec, engine, handle = _engine_on_fake_handles()
    from qwen_image_server.errors import ShuttingDown

    unretrieved: list[str] = []

    async def main() -> None:
        _note_unretrieved(unretrieved)
        jobs = [
            asyncio.ensure_future(engine.submit(spec.id, Job(mode="generate", prompt="p", seeds=seeds)))
            for seeds in ([1, 2], [3])
        ]
        while len(handle.streams) < 3:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(engine.drain) == 2  # refusing, not cutting: both run on
        await asyncio.sleep(0.05)
        assert not any(job.done() for job in jobs)
        assert await asyncio.to_thread(engine.drain, True, True) == 2
        for job in jobs:
            with pytest.raises(ShuttingDown):
                await asyncio.wait_for(job, 10)
        engine.draining = False  # a job admitted just before the cut: stopped before it waits
        with pytest.raises(ShuttingDown):
            await engine.submit(spec.id, Job(mode="generate", prompt="p", seeds=[4]))
        engine.drain(False)
        later = asyncio.ensure_future(engine.submit(spec.id, Job(mode="generate", prompt="p", seeds=[5])))
        while len(handle.streams) < 5:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not later.done()  # runs: the cut is over
        later.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await later
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert [s.cancelled for s in handle.streams] == [True] * 5
    assert engine._in_flight[spec.id] == 0 and not engine._cuts
    assert not unretrieved, unretrieved


def test_a_call_cancelled_while_it_waits_for_the_pipeline_never_runs(monkeypatch):
    """A replica runs one pipeline at a time: a call cancelled while the previous call's pipeline still runs (a
    request gone, or timed out, while queued behind a long one) must not start its own when the lock frees. It did,
    for at least one step, and the next request waited behind it (on a busy machine past a 5 s timeout)."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine import ray_replica

    runs: list[str] = []

    class Recording(FakeRunner):
        def run(self, job, should_stop, on_partial):
            runs.append(job.prompt)
            return super().run(job, should_stop, on_partial)

    runner = Recording()
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: runner)
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cpu", "auto", None)

    async def main() -> None:
        replica._pipeline_lock.acquire()  # the previous call's pipeline, still running
        call = asyncio.ensure_future(replica.run(Task(1, Job(mode="generate", prompt="gone", seeds=[1]))).__anext__())
        await asyncio.sleep(0.2)  # its pipeline thread now waits for the lock
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        replica._pipeline_lock.release()
        while replica._stop_asked:  # the waiting thread takes the lock and returns
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        later = replica.run(Task(2, Job(mode="generate", prompt="next", seeds=[1])))
        with contextlib.suppress(StopAsyncIteration, Exception):
            async for _ in later:
                pass

    asyncio.run(main())
    assert runs == ["next"]


#: The head of a JSON request whose body never comes.
JSON_20_BYTES = [(b"content-type", b"application/json"), (b"content-length", b"20")]


def _raising(error: BaseException):
    async def receive() -> dict:
        raise error

    return receive


def test_a_replica_whose_gpu_broke_fails_its_calls_and_its_health_check(monkeypatch):
    """A CUDA error that breaks the replica's context: the call fails, the memory the failed call held is released
    before the cache is given back, and from then on the health check fails (Serve replaces the replica) and new
    calls fail at once instead of running on the broken GPU. An out of memory leaves the replica healthy."""
    pytest.importorskip("ray.serve")
    import torch

    from qwen_image_server.engine import ray_replica

    runner = FakeRunner(device="cuda:0")
    broken: list[bool] = []
    emptied: list[bool] = []

    def synchronize(device=None):
        if broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="GPU-broke-test"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(runner.held is None or runner.held() is None))
    exits: list[int] = []
    monkeypatch.setattr(ray_replica, "_exit_process", exits.append)
    monkeypatch.setattr(ray_replica, "EXIT_AFTER_BROKEN_SECONDS", 0.05)
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: runner)
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cuda:0", "auto", None)
    assert emptied == [True], "what loading left in the allocator's cache goes back to the GPU"

    async def outcome(prompt: str) -> BaseException | None:
        try:
            async for _ in replica.run(Task(1, Job(mode="generate", prompt=prompt, seeds=[1]))):
                pass
        except Exception as exc:
            await asyncio.sleep(0.2)  # the replica's process would exit in this time
            return exc
        return None

    assert isinstance(asyncio.run(outcome("oom")), torch.cuda.OutOfMemoryError)
    assert emptied == [True, True]  # its working tensor released first
    replica.check_health()  # out of memory: still healthy
    assert exits == []
    broken.append(True)
    # an out-of-memory error that the request's own step cache would have made a 400: with the GPU broken by it (or
    # by anything) it is the server's failure, as the local engine reports it
    failed = asyncio.run(outcome("oom-cache"))
    assert isinstance(failed, torch.cuda.OutOfMemoryError) and not hasattr(failed, "qis_param")
    assert exits == [1], "the replica exits after the call that broke its GPU: Serve replaces it at once"
    with pytest.raises(RuntimeError, match="the GPU failed .*illegal memory access"):
        replica.check_health()
    refused = asyncio.run(outcome("a cat"))
    assert "the GPU failed" in str(refused) and "its replica is being replaced" in str(refused)
    assert runner.started.is_set() and emptied == [True, True] and exits == [1]


def test_a_deployment_serve_gave_up_on_is_a_503_not_a_dead_replica():
    pytest.importorskip("ray.serve")
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    from qwen_image_server.engine.ray_serve import _as_server_error
    from qwen_image_server.errors import NotReady

    error = _as_server_error(DeploymentUnavailableError(DeploymentID(name="model0-m", app_name="main")), 1, "m")
    assert isinstance(error, NotReady) and error.status_code == 503
    assert error.message == "Model m is unavailable: its deployment's replicas failed to start; see `serve status`"


def test_a_replica_encodes_previews_beside_the_pipeline_and_skips_one_that_fails(monkeypatch):
    """Streamed previews were encoded in the pipeline's thread (denoising waited for each PNG), and one that failed
    to encode failed the whole request; the embedded engine's workers encode them in a thread of their own and
    skip such a preview."""
    pytest.importorskip("ray.serve")
    import threading

    from qwen_image_server import images
    from qwen_image_server.engine import ray_replica
    from qwen_image_server.jobs import PartialImage, TaskResult

    running = threading.local()  # set in the pipeline's thread while its call runs
    encoded_in_pipeline: list[bool] = []

    class Recording(FakeRunner):
        def run(self, job, should_stop, on_partial):
            running.pipeline = True
            try:
                return super().run(job, should_stop, on_partial)
            finally:
                running.pipeline = False

    encode = images.encode_image

    def recording_encode(*args, **kwargs):
        encoded_in_pipeline.append(getattr(running, "pipeline", False))
        return encode(*args, **kwargs)

    monkeypatch.setattr(images, "encode_image", recording_encode)
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: Recording())
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cpu", "auto", None)

    async def answers(prompt: str) -> list:
        job = Job(mode="generate", prompt=prompt, seeds=[1], width=16, height=16, partial_images=2)
        return [item async for item in replica.run(Task(1, job))]

    got = asyncio.run(answers("bad preview"))  # its first preview cannot be encoded
    assert [type(item) for item in got] == [PartialImage, TaskResult]
    assert got[0].partial_index == 1 and got[1].images[0].data.startswith(b"\x89PNG")
    got = asyncio.run(answers("a cat"))
    assert [item.partial_index for item in got[:-1]] == [0, 1]
    assert len(encoded_in_pipeline) == 6 and not any(encoded_in_pipeline), "(2 previews + an image) x 2, none in the call"


def test_a_gpu_replica_refuses_to_load_where_its_model_does_not_fit(monkeypatch, caplog):
    """A model too large for the GPU Ray gave its replica loaded until it ran out of memory (minutes for a full-size
    model), and Serve retried that up to 20 times: the replica now compares the plan's estimate with its GPU's free
    memory first, and says what would fit (``--memory-check warn`` loads anyway, with the warning)."""
    pytest.importorskip("ray.serve")
    import torch

    from qwen_image_server.engine import ray_replica
    from qwen_image_server.engine.ray_replica import MemoryNeed
    from qwen_image_server.models.spec import ModelConfigError

    gib = 1024**3
    loads: list[str] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="GPU-fit-test"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: loads.append(spec.id) or FakeRunner(device="cuda:0"))
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    need = MemoryNeed(70 * gib, "69.5 GiB of weights (transformer 38.0 GiB, ...)")
    with pytest.raises(ModelConfigError) as refused:
        ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, need)
    assert str(refused.value).startswith(
        "not enough GPU memory for model m on this replica's GPU (NVIDIA H100 80GB HBM3): it needs 70.0 GiB "
        "(69.5 GiB of weights (transformer 38.0 GiB, ...)), 40.0 GiB is free of 80.0 GiB. A smaller memory mode"
    )
    assert "--weights-dtype fp8" in str(refused.value) and loads == [], "refused before any weight is read"
    with caplog.at_level(logging.WARNING):
        ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, MemoryNeed(70 * gib, "...", check="warn"))
    assert loads == ["m"] and "loading anyway (--memory-check warn)" in caplog.text
    ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, MemoryNeed(30 * gib, "..."))
    # a quarter of the GPU each: Ray may place four such replicas there, whatever is free when this one loads
    with pytest.raises(ModelConfigError, match=r"it needs 30.0 GiB \(...\), ray_gpus_per_replica 0.25 gives each "):
        ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, MemoryNeed(30 * gib, "...", share=0.25))
    ray_replica.ModelReplica(spec, "cpu", "auto", None, 0.0, MemoryNeed(70 * gib, "..."))  # no GPU: nothing to check
    assert loads == ["m", "m", "m"]


def test_replicas_sharing_a_gpu_load_one_after_the_other_and_check_what_the_one_before_left(monkeypatch, tmp_path):
    """Replicas given shares of one GPU (a fractional ray_gpus_per_replica) loaded at once: two FP8 conversions at a
    time, and each compared the model's need with the memory free before the other had loaded."""
    pytest.importorskip("ray.serve")
    import threading
    import time

    import torch

    from qwen_image_server.engine import ray_replica
    from qwen_image_server.engine.ray_replica import MemoryNeed
    from qwen_image_server.models.spec import ModelConfigError

    gib = 1024**3
    free = [60 * gib]
    events: list[str] = []

    def mem_get_info(device=None):
        events.append("check")
        return free[0], 80 * gib

    def load(spec, device, dtype, warm=True):
        events.append(f"load {spec.id}")
        time.sleep(0.3)
        free[0] -= 40 * gib
        events.append(f"loaded {spec.id}")
        return FakeRunner(device="cuda:0")

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=f"GPU-{tmp_path.name}"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stub_runner(monkeypatch, load)
    outcomes: dict[str, object] = {}

    def start(model: str) -> None:
        spec = ModelSpec(id=model, source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
        try:
            outcomes[model] = ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, MemoryNeed(35 * gib, "..."))
        except ModelConfigError as exc:
            outcomes[model] = exc

    threads = [threading.Thread(target=start, args=(model,)) for model in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    first = events[1].removeprefix("load ")
    assert events == ["check", f"load {first}", f"loaded {first}", "check"], "the second checks once the first has loaded"
    second = "b" if first == "a" else "a"
    assert isinstance(outcomes[second], ModelConfigError) and "20.0 GiB is free of 80.0 GiB" in str(outcomes[second])


def test_a_gpus_load_lock_is_free_again_when_its_holder_dies(tmp_path):
    """The lock of replicas that share nothing but the machine: a holder killed while loading (out of host memory,
    Serve's kill) leaves it free at once, where a lock with a timeout would hold the next replica for 10 minutes."""
    import signal
    import subprocess
    import sys

    from qwen_image_server.engine.worker_device import GpuFileLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qwen_image_server.engine.worker_device import GpuFileLock; "
         f"from pathlib import Path; lock = GpuFileLock('GPU-x', Path({str(tmp_path)!r})); assert lock.acquire(); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = GpuFileLock("GPU-x", tmp_path)
        assert lock.acquire(timeout=0.5) is False, "held by the other process"
        assert GpuFileLock("GPU-y", tmp_path).acquire(timeout=0), "another GPU's lock is another file"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert lock.acquire(timeout=5) is True
        lock.release()
        assert lock.acquire(block=False) is True
    finally:
        holder.kill()
    # a folder this process may not write: no turn (loading_turn then loads with a warning), but no failure either
    unusable = GpuFileLock("GPU-z", tmp_path / "missing")
    assert unusable.acquire(timeout=0) is False and unusable.unavailable
    assert not lock.unavailable


def test_a_replica_on_a_node_that_leaves_every_gpu_visible_runs_on_the_gpu_ray_gave_it(monkeypatch):
    """Ray makes the GPU it gives a replica the only one it sees, so ``cuda`` is that GPU; with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set on the node it does not, and every replica there ran on GPU 0
    (two replicas on a two-GPU node: both on GPU 0, GPU 1 idle). The replica takes the GPU from ``ray.get_gpu_ids``,
    counted in its own ``CUDA_VISIBLE_DEVICES`` when it has one."""
    import torch

    from qwen_image_server.engine import ray_replica

    monkeypatch.delenv(ray_replica.NOSET_VISIBLE, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ray_replica.replica_device("cuda", lambda: [1]) == "cuda"  # Ray narrowed what the replica sees
    monkeypatch.setenv(ray_replica.NOSET_VISIBLE, "1")
    assert ray_replica.replica_device("cuda", lambda: [1]) == "cuda:1"
    assert ray_replica.replica_device("cuda", lambda: ["3"]) == "cuda:3"
    assert ray_replica.replica_device("cuda", lambda: []) == "cuda"  # given no GPU (a CPU replica's deployment)
    assert ray_replica.replica_device("cpu", lambda: [1]) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # the node's GPUs 2 and 5 are this process's cuda:0 and cuda:1
    assert ray_replica.replica_device("cuda", lambda: ["5"]) == "cuda:1"

    # and the replica loads there
    monkeypatch.setattr(ray_replica, "replica_device", lambda device: "cuda:1" if device == "cuda" else device)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="GPU-noset-test"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    devices: list[str] = []
    # and its current device: CUDA streams, events and synchronizations made without a device are the current one's
    # (group offload's side stream, the FP8 probe's timing), GPU 0 unless set. torch keeps it per thread: set for
    # the thread that loads and warms up, and around each call in the executor thread that runs the pipeline
    current = threading.local()

    @contextlib.contextmanager
    def on_device(device):
        before, current.device = getattr(current, "device", "cuda:0"), str(device)
        try:
            yield
        finally:
            current.device = before

    class Recording(FakeRunner):
        def run(self, job, should_stop, on_partial):
            devices.append(f"run on {getattr(current, 'device', 'cuda:0')} in {threading.current_thread().name}")
            return super().run(job, should_stop, on_partial)

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: devices.append(f"current {device}"))
    monkeypatch.setattr(torch.cuda, "device", on_device)
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: devices.append(device) or Recording(device=device))
    spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
    replica = ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, None)

    async def answer() -> list:
        job = Job(mode="generate", prompt="a cat", seeds=[1], width=16, height=16)
        return [item async for item in replica.run(Task(1, job))]

    asyncio.run(answer())
    assert devices[:2] == ["current cuda:1", "cuda:1"]
    assert devices[2].startswith("run on cuda:1 in ") and "MainThread" not in devices[2], devices


def test_a_deterministic_replica_sets_cublas_workspace_before_cuda_starts(monkeypatch):
    """cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` as CUDA starts: a deterministic model's replica sets it before its
    first CUDA call (its current device), as the embedded engine's workers do, not when its pipeline loads after."""
    import os

    import torch

    from qwen_image_server.engine import ray_replica
    from qwen_image_server.models.profile import RunProfile

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: list[str | None] = []
    monkeypatch.setattr(ray_replica, "replica_device", lambda device: "cuda:1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="GPU-determinism-test"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stub_runner(monkeypatch, lambda spec, device, dtype, warm=True: FakeRunner(device=device))
    spec = ModelSpec(
        id="m",
        source="/nowhere",
        pipeline_class="QwenImagePipeline",
        kind="text-to-image",
        profile=RunProfile(deterministic=True),
    )
    ray_replica.ModelReplica(spec, "cuda", "auto", None, 0.0, None)
    assert seen == [":4096:8"]


def test_a_cut_counts_the_jobs_it_stops_even_when_they_end_before_it_returns():
    """``drain(True, True)`` from another thread asks the engine's loop to stop the jobs, then counted the jobs in
    flight: where the loop ran first (a busy machine's thread switch), they had ended and it said 0 (seen once in
    the whole suite). Here the loop always runs first."""
    import threading

    spec, engine, handle = _engine_on_fake_handles()

    async def main() -> int:
        jobs = [asyncio.ensure_future(engine.submit(spec.id, Job(mode="generate", prompt="p", seeds=[s]))) for s in (1, 2)]
        while len(handle.streams) < 2:
            await asyncio.sleep(0.01)
        ended = threading.Event()
        for job in jobs:
            job.add_done_callback(lambda _: all(j.done() for j in jobs) and ended.set())
        loop = engine._loop

        class FirstTheLoop:  # the cut is scheduled, and the drain goes on only once the loop has ended both jobs
            def call_soon_threadsafe(self, callback):
                loop.call_soon_threadsafe(callback)
                assert ended.wait(10)

        engine._loop = FirstTheLoop()
        counted = await asyncio.to_thread(engine.drain, True, True)
        await asyncio.gather(*jobs, return_exceptions=True)
        return counted

    assert asyncio.run(main()) == 2
