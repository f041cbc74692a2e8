"""The worker's side of the pipe: typed messages in and out, previews, cancellation, failures, the CUDA extras.

A ``Worker`` serves a real ``multiprocessing`` pipe (so every message is pickled)
from a thread, around a stand-in runner: the pipeline's own behaviour is tested
elsewhere (test_models.py), the worker's bookkeeping here.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pipe
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from qwen_image_server.engine import worker as worker_module
from qwen_image_server.engine.worker import (
    Cancel,
    Computed,
    Done,
    Failed,
    InfoUpdate,
    LoadFailed,
    Partial,
    Ready,
    RunTask,
    Stop,
    Worker,
    worker_main,
)
from qwen_image_server.errors import (
    OUT_OF_MEMORY,
    OUT_OF_MEMORY_ADVICE,
    InferenceFailed,
    TaskCancelled,
    short_reason,
)
from qwen_image_server.jobs import Job, Task

WAIT = 30.0  # seconds any one message may take


@dataclass
class FakeRunner:
    """What ``Worker`` uses of a ``PipelineRunner``. Prompts steer it: "boom" raises, "wait" runs until cancelled."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    last_stats: dict = field(default_factory=dict)
    started: threading.Event = field(default_factory=threading.Event)
    memory: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(summary=lambda: {"offload": "none"}))
    speed: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(info={"compile": False}))
    determinism: dict = field(default_factory=lambda: {"deterministic": False})

    def run(self, job: Job, should_stop, on_partial) -> list[Image.Image]:
        self.started.set()
        for index in range(job.n):
            for step in range(job.partial_images):
                on_partial(index, step, Image.new("RGB", (8, 8), (step, 0, 0)))
        if job.prompt == "boom":
            raise RuntimeError("boom\nsecond line")
        if job.prompt == "oom":
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        if job.prompt == "wait":  # like the pipeline between its steps: poll until told to stop
            deadline = time.monotonic() + WAIT
            while not should_stop():
                assert time.monotonic() < deadline, "the task was never cancelled"
                time.sleep(0.01)
            raise TaskCancelled()
        self.last_stats = {"transformer_calls": 2 * job.num_inference_steps}
        return [Image.new("RGB", (job.width or 16, job.height or 16), (seed % 256, 0, 0)) for seed in job.seeds]

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def warm_up(self) -> None:
        pass


def _job(prompt: str = "a red square", **fields) -> Job:
    return Job(mode="generate", prompt=prompt, seeds=[3, 4], width=24, height=16, num_inference_steps=2, **fields)


@pytest.fixture
def served():
    """``(engine end of the pipe, runner, worker)`` with the worker serving in a thread; stopped after the test."""
    ours, theirs = Pipe()
    runner = FakeRunner()
    worker = Worker(runner, theirs, "m#0")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    yield ours, runner, worker
    ours.send(Stop())
    thread.join(timeout=WAIT)
    assert not thread.is_alive(), "the worker did not stop"


def _recv(conn):
    assert conn.poll(WAIT), "no message from the worker"
    return conn.recv()


def _until_finished(conn, task_id: int) -> list:
    """Messages up to and including the task's ``Done`` or ``Failed``."""
    messages = []
    while True:
        message = _recv(conn)
        messages.append(message)
        if isinstance(message, Done) and message.result.task_id == task_id:
            return messages
        if isinstance(message, Failed) and message.task_id == task_id:
            return messages


def test_a_task_is_computed_then_done_with_its_encoded_images(served):
    conn, _, _ = served
    conn.send(RunTask(Task(7, _job(output_format="jpeg", partial_images=1))))
    messages = _until_finished(conn, 7)
    kinds = [type(m) for m in messages]
    assert kinds.count(Computed) == 1 and kinds.count(Partial) == 2 and kinds[-1] is Done
    assert kinds.index(Computed) < kinds.index(Done)
    previews = [m for m in messages if isinstance(m, Partial)]
    assert {(p.task_id, p.image.index, p.image.partial_index) for p in previews} == {(7, 0, 0), (7, 1, 0)}
    assert [p.image.image.seed for p in sorted(previews, key=lambda p: p.image.index)] == [3, 4]
    result = messages[-1].result
    assert (result.task_id, result.worker, result.prompt_tokens) == (7, "m#0", 3)
    assert [(image.seed, image.width, image.height) for image in result.images] == [(3, 24, 16), (4, 24, 16)]
    decoded = Image.open(io.BytesIO(result.images[1].data))
    assert decoded.format == "JPEG" and decoded.size == (24, 16)
    assert result.stats["transformer_calls"] == 4 and result.stats["encode_seconds"] >= 0
    assert result.started <= result.finished


def test_cancel_stops_the_running_task_and_the_next_one_runs(served):
    conn, runner, _ = served
    conn.send(RunTask(Task(1, _job("wait"))))
    assert runner.started.wait(WAIT)
    conn.send(Cancel(1))
    assert _until_finished(conn, 1)[-1] == Failed(1, "cancelled", cancelled=True)
    conn.send(RunTask(Task(2, _job())))
    assert isinstance(_until_finished(conn, 2)[-1], Done)


def test_a_failing_task_reports_one_line_and_the_worker_goes_on(served):
    conn, _, _ = served
    conn.send(RunTask(Task(1, _job("boom"))))
    assert _until_finished(conn, 1) == [Failed(1, "RuntimeError: boom", cancelled=False)]
    conn.send(RunTask(Task(2, _job())))
    assert isinstance(_until_finished(conn, 2)[-1], Done)


def test_running_out_of_memory_is_named_without_torchs_details_and_the_worker_goes_on(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(worker_module, "device_memory", lambda device: {})
    ours, theirs = Pipe()
    thread = threading.Thread(target=Worker(FakeRunner(device="cuda:0"), theirs, "m#0").serve, daemon=True)
    thread.start()
    try:
        ours.send(RunTask(Task(1, _job("oom"))))
        (failed,) = _until_finished(ours, 1)
        ours.send(RunTask(Task(2, _job())))
        assert isinstance(_until_finished(ours, 2)[-1], Done)
    finally:
        ours.send(Stop())
        thread.join(timeout=WAIT)
    assert failed == Failed(1, OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE)
    message = InferenceFailed(failed.reason).message
    assert message.startswith("Inference failed: out of memory on the device (this request needed more than was free")
    assert "Process" not in message and "4242" not in message and "GiB" not in message and "PYTORCH" not in message
    assert emptied == [True]  # what the failed call cached is given back


#: torch's message for a CUDA out-of-memory error (one line, as torch 2.x writes it).
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free. "
    "Process 4242 has 78.12 GiB memory in use. Of the allocated memory 75.01 GiB is allocated by PyTorch, and 1.50 GiB "
    "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError(CUDA_OOM),
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.01 GB, other allocations: 1.02 GB, max allowed: 18.13 GB)"),
    ],
    ids=["cuda", "python", "cpu-allocator", "mps"],
)
def test_each_kind_of_out_of_memory_is_one_short_reason(exc):
    assert short_reason(exc) == OUT_OF_MEMORY  # a model's load: no advice about requests
    assert short_reason(exc, request=True) == OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE


def test_other_failures_keep_their_type_and_first_line():
    assert short_reason(RuntimeError("boom\nsecond line")) == "RuntimeError: boom"
    assert short_reason(ValueError("the memory plan is wrong"), request=True) == "ValueError: the memory plan is wrong"
    assert short_reason(KeyError()) == "KeyError"


def test_the_worker_stops_when_the_engine_is_gone():
    ours, theirs = Pipe()
    worker = Worker(FakeRunner(), theirs, "m#0")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    ours.close()
    thread.join(timeout=WAIT)
    assert not thread.is_alive()


def test_stop_stops_the_running_task_at_its_next_step(served):
    conn, runner, _ = served  # the fixture then checks that the worker has exited
    conn.send(RunTask(Task(1, _job("wait"))))  # runs until cancelled
    assert runner.started.wait(WAIT)
    conn.send(Stop())
    assert _until_finished(conn, 1)[-1] == Failed(1, "cancelled", cancelled=True)


def test_on_cuda_memory_is_reported_again_after_the_first_job_and_a_failure_empties_the_cache(monkeypatch):
    live = {"memory": {"device_free_gib": 1.5}}
    monkeypatch.setattr(worker_module, "device_memory", lambda device: live if device.startswith("cuda") else {})
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    ours, theirs = Pipe()
    worker = Worker(FakeRunner(device="cuda:0"), theirs, "m#0")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        ours.send(RunTask(Task(1, _job())))
        first = _until_finished(ours, 1)
        ours.send(RunTask(Task(2, _job())))
        second = _until_finished(ours, 2)
        ours.send(RunTask(Task(3, _job("boom"))))
        assert _until_finished(ours, 3) == [Failed(3, "RuntimeError: boom")]
    finally:
        ours.send(Stop())
        thread.join(timeout=WAIT)
    updates = [m for m in first if isinstance(m, InfoUpdate)]
    assert updates == [InfoUpdate({"memory": {"offload": "none", "device_free_gib": 1.5}})]
    assert not [m for m in second if isinstance(m, InfoUpdate)]
    assert emptied == [True]


def test_worker_main_reports_ready_with_what_runs(monkeypatch):
    from qwen_image_server.models import runner as runner_module

    monkeypatch.setattr(runner_module, "PipelineRunner", lambda spec, device, dtype, shared=None, warm=True: FakeRunner())
    ours, theirs = Pipe()
    thread = threading.Thread(target=worker_main, args=(SimpleNamespace(id="m"), "cpu", "auto", 1, theirs, "m#0"), daemon=True)
    thread.start()
    ready = _recv(ours)
    ours.send(Stop())
    thread.join(timeout=WAIT)
    assert isinstance(ready, Ready)
    info = ready.info
    assert (info["device"], info["dtype"], info["memory"]) == ("cpu", "float32", {"offload": "none"})
    assert info["speed"] == {"compile": False} and info["determinism"] == {"deterministic": False}
    assert isinstance(info["pid"], int)


def test_worker_main_reports_a_load_failure(monkeypatch):
    from qwen_image_server.models import runner as runner_module

    def fail(spec, device, dtype, shared=None, warm=True):
        raise OSError("no such file: /models/x/transformer")

    monkeypatch.setattr(runner_module, "PipelineRunner", fail)
    ours, theirs = Pipe()
    worker_main(SimpleNamespace(id="m"), "cpu", "auto", 1, theirs, "m#0")  # returns once it has reported
    assert _recv(ours) == LoadFailed("OSError: no such file: /models/x/transformer")


def test_a_worker_of_several_models_loads_them_with_one_component_cache_and_routes_tasks(monkeypatch):
    from qwen_image_server.models import runner as runner_module

    loaded: dict = {}
    runners: dict = {}

    def load(spec, device, dtype, shared=None, warm=True):
        loaded[spec.id] = shared
        runners[spec.id] = FakeRunner(speed=SimpleNamespace(info={"model": spec.id}))
        return runners[spec.id]

    monkeypatch.setattr(runner_module, "PipelineRunner", load)
    ours, theirs = Pipe()
    specs = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    thread = threading.Thread(target=worker_main, args=(specs, "cpu", "auto", 1, theirs, "a+b#0"), daemon=True)
    thread.start()
    ready = _recv(ours)
    assert isinstance(ready, Ready) and ready.info["models_in_process"] == ["a", "b"]
    assert {model: info["speed"] for model, info in ready.models.items()} == {"a": {"model": "a"}, "b": {"model": "b"}}
    assert loaded["a"] is loaded["b"] is not None  # one cache: identical components load once
    ours.send(RunTask(Task(5, _job(), model="b")))
    assert _recv(ours) == Computed(5)
    done = _recv(ours)
    assert isinstance(done, Done) and done.result.task_id == 5 and done.result.worker == "a+b#0"
    assert runners["b"].started.is_set() and not runners["a"].started.is_set()  # the task's model ran it
    ours.send(Stop())
    thread.join(timeout=WAIT)


def test_a_worker_of_several_models_names_the_one_that_failed_to_load(monkeypatch):
    from qwen_image_server.models import runner as runner_module

    def load(spec, device, dtype, shared=None, warm=True):
        if spec.id == "b":
            raise OSError("no such file")
        return FakeRunner()

    monkeypatch.setattr(runner_module, "PipelineRunner", load)
    ours, theirs = Pipe()
    worker_main([SimpleNamespace(id="a"), SimpleNamespace(id="b")], "cpu", "auto", 1, theirs, "a+b#0")
    assert _recv(ours) == LoadFailed("b: OSError: no such file")


class _LoadingRunner(FakeRunner):
    """A runner whose loading takes a while and records when it ran; warming up records whether the lock was free."""

    def __init__(self, spec, log: list, lock, **_):
        super().__init__()
        self.log, self.lock = log, lock
        log.append(("load start", spec.id, time.monotonic()))
        time.sleep(0.3)
        log.append(("load end", spec.id, time.monotonic()))

    def warm_up(self) -> None:
        free = self.lock.acquire(block=False)
        if free:
            self.lock.release()
        self.log.append(("warm", free))


def test_workers_of_one_gpu_load_one_at_a_time_and_warm_up_outside_the_lock(monkeypatch):
    import multiprocessing

    from qwen_image_server.models import runner as runner_module

    lock = multiprocessing.get_context("spawn").Lock()
    log: list = []
    monkeypatch.setattr(runner_module, "PipelineRunner", lambda spec, *a, **k: _LoadingRunner(spec, log, lock))
    pipes = [Pipe() for _ in range(2)]
    threads = [
        threading.Thread(target=worker_main, args=(SimpleNamespace(id=m), "cuda:0", "auto", 1, theirs, f"{m}#0", 20, lock))
        for m, (_, theirs) in zip("ab", pipes, strict=True)
    ]
    for thread in threads:
        thread.start()
    for ours, _ in pipes:
        assert isinstance(_recv(ours), Ready)
        ours.send(Stop())
    for thread in threads:
        thread.join(timeout=WAIT)
    spans = {}
    for event, *rest in log:
        if event != "warm":
            spans.setdefault(rest[0], []).append(rest[1])
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert a_end <= b_start or b_end <= a_start, "the two loads overlapped"
    assert lock.acquire(block=False), "released after loading"
    lock.release()


def test_warm_up_runs_after_the_lock_is_released_and_a_lock_never_released_is_waited_out(monkeypatch, caplog):
    import multiprocessing

    from qwen_image_server.models import runner as runner_module

    lock = multiprocessing.get_context("spawn").Lock()
    log: list = []
    monkeypatch.setattr(runner_module, "PipelineRunner", lambda spec, *a, **k: _LoadingRunner(spec, log, lock))

    def serve_one(model: str) -> None:
        ours, theirs = Pipe()
        thread = threading.Thread(
            target=worker_main, args=(SimpleNamespace(id=model), "cuda:0", "auto", 1, theirs, f"{model}#0", 20, lock)
        )
        thread.start()
        try:
            assert isinstance(_recv(ours), Ready)
        finally:
            ours.send(Stop())
            thread.join(timeout=WAIT)

    serve_one("a")
    assert ("warm", True) in log

    lock.acquire()  # held by a worker that was killed while loading
    monkeypatch.setattr(worker_module, "LOAD_WAIT_SECONDS", 0.2)
    serve_one("b")
    assert "another worker on cuda:0 has been loading for 0s; loading now all the same" in caplog.text
    lock.release()


def test_each_gpu_has_one_load_lock_and_cpu_workers_none():
    import multiprocessing

    from qwen_image_server.engine.worker_process import load_lock

    spawn = multiprocessing.get_context("spawn")
    assert load_lock(spawn, "cpu") is None
    assert load_lock(spawn, "cuda") is load_lock(spawn, "cuda:0") is not None
    assert load_lock(spawn, "cuda:1") is not load_lock(spawn, "cuda:0")


def test_the_ray_engine_names_a_replicas_out_of_memory_the_same_way():
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_serve import _as_server_error

    class TaskError(Exception):  # what Ray raises in the caller: the replica's exception is its ``cause``
        cause = torch.cuda.OutOfMemoryError(CUDA_OOM)

    error = _as_server_error(TaskError("RayTaskError(OutOfMemoryError): ray::replica ...\nTraceback ..."))
    assert isinstance(error, InferenceFailed)
    assert error.message == f"Inference failed: {OUT_OF_MEMORY}{OUT_OF_MEMORY_ADVICE}"
