"""The worker's side of the pipe: typed messages in and out, previews, cancellation, failures, the CUDA extras (its start
and the load lock: test_worker_loading.py).

A ``Worker`` serves a real ``multiprocessing`` pipe (so every message is pickled)
from a thread, around a stand-in runner: the pipeline's own behaviour is tested
elsewhere (test_models.py), the worker's bookkeeping here.
"""

from __future__ import annotations

import io
import pickle
import threading
from multiprocessing import Pipe

import pytest
from PIL import Image
from worker_fakes import CUDA_OOM, WAIT, FakeRunner, job, until_finished

from qwen_image_server.engine import worker as worker_module
from qwen_image_server.engine.worker import (
    Cancel,
    Computed,
    Done,
    Failed,
    InfoUpdate,
    Partial,
    Ready,
    RunTask,
    Stop,
    Worker,
)
from qwen_image_server.errors import (
    OUT_OF_HOST_MEMORY,
    OUT_OF_MEMORY,
    OUT_OF_MEMORY_ADVICE,
    InferenceFailed,
    RequestDoesNotFit,
    short_reason,
    task_failure,
)
from qwen_image_server.jobs import Task


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


def test_a_task_is_computed_then_done_with_its_encoded_images(served):
    conn, _, _ = served
    conn.send(RunTask(Task(7, job(output_format="jpeg", partial_images=1))))
    messages = until_finished(conn, 7)
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
    conn.send(RunTask(Task(1, job("wait"))))
    assert runner.started.wait(WAIT)
    conn.send(Cancel(1))
    assert until_finished(conn, 1)[-1] == Failed(1, "cancelled", cancelled=True)
    conn.send(RunTask(Task(2, job())))
    assert isinstance(until_finished(conn, 2)[-1], Done)


def test_a_failing_task_reports_one_line_and_the_worker_goes_on(served):
    conn, _, _ = served
    conn.send(RunTask(Task(1, job("boom"))))
    assert until_finished(conn, 1) == [Failed(1, "RuntimeError: boom", cancelled=False)]
    conn.send(RunTask(Task(2, job())))
    assert isinstance(until_finished(conn, 2)[-1], Done)


def _stub_cuda(monkeypatch, runner: FakeRunner, synchronize=None) -> list[bool]:
    """CUDA's calls after a failure, stubbed: the list notes, for each ``empty_cache``, whether the failed call's
    working tensor was gone by then (what is still referenced cannot be given back to the GPU)."""
    import torch  # here, not at the top: collecting this module imports no torch

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(runner.held is not None and runner.held() is None))
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize or (lambda device=None: None))
    return emptied


def test_running_out_of_memory_is_named_without_torchs_details_and_the_worker_goes_on(monkeypatch):
    """Out of memory is a 500 without torch's details, and the worker serves on. When the request's own full
    ``taylorseer`` ran out (the pipeline runner marks it: the memory plan counts the model's own policy, not a
    request's) the task fails naming the field, which the engine makes a 400 with ``param: "cache"``."""
    runner = FakeRunner(device="cuda:0")
    emptied = _stub_cuda(monkeypatch, runner)
    monkeypatch.setattr(worker_module, "device_memory", lambda device: {})
    ours, theirs = Pipe()
    thread = threading.Thread(target=Worker(runner, theirs, "m#0").serve, daemon=True)
    thread.start()
    try:
        ours.send(RunTask(Task(1, job("oom"))))
        (failed,) = until_finished(ours, 1)
        ours.send(RunTask(Task(2, job())))
        assert isinstance(until_finished(ours, 2)[-1], Done)
        ours.send(RunTask(Task(3, job("oom-cache"))))
        (requests_own,) = until_finished(ours, 3)
    finally:
        ours.send(Stop())
        thread.join(timeout=WAIT)
    assert failed == Failed(1, OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE)
    message = InferenceFailed(failed.reason).message
    assert message.startswith("Inference failed: out of memory on the device (this request needed more than was free")
    assert "Process" not in message and "4242" not in message and "GiB" not in message and "PYTORCH" not in message
    assert emptied == [True, True]  # what each failed call cached is given back, its tensors released first
    assert isinstance(task_failure(failed.reason, failed.param), InferenceFailed)
    want = OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE + "; its step cache, taylorseer, ..."
    assert requests_own == Failed(3, want, param="cache")
    error = task_failure(requests_own.reason, requests_own.param)
    assert isinstance(error, RequestDoesNotFit) and (error.status_code, error.param, error.code) == (400, "cache", "does_not_fit")
    assert error.message.startswith("This request's cache does not fit in its worker's memory: out of memory on the device")


def _cuda_out_of_memory() -> Exception:
    import torch  # here, not at the top: collecting this module imports no torch

    return torch.cuda.OutOfMemoryError(CUDA_OOM)


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_cuda_out_of_memory, OUT_OF_MEMORY),
        (MemoryError, OUT_OF_HOST_MEMORY),
        (
            lambda: RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12"
            ),
            OUT_OF_HOST_MEMORY,
        ),
        (
            lambda: RuntimeError(
                "MPS backend out of memory (MPS allocated: 17.01 GB, other allocations: 1.02 GB, max allowed: 18.13 GB)"
            ),
            OUT_OF_MEMORY,
        ),
    ],
    ids=["cuda", "python", "cpu-allocator", "mps"],
)
def test_each_kind_of_out_of_memory_is_one_short_reason(make, said):
    """The device's memory or the machine's (a GPU worker encoding an image, a CPU worker) are named apart."""
    exc = make()
    assert short_reason(exc) == said  # a model's load: no advice about requests
    assert short_reason(exc, request=True) == said + OUT_OF_MEMORY_ADVICE


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


def test_a_worker_whose_engine_died_mid_task_stops_without_a_traceback(monkeypatch):
    """The API process killed (SIGKILL) while a task runs: the worker stops the task and ends; what it would have
    sent goes nowhere, quietly (a ``BrokenPipeError`` traceback per running worker before)."""
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    ours, theirs = Pipe()
    runner = FakeRunner()
    worker = Worker(runner, theirs, "m#0")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    ours.send(RunTask(Task(1, job("wait"))))  # runs until cancelled
    assert runner.started.wait(WAIT)
    ours.close()
    thread.join(timeout=WAIT)
    assert not thread.is_alive() and raised == []


def test_stop_stops_the_running_task_at_its_next_step(served):
    conn, runner, _ = served  # the fixture then checks that the worker has exited
    conn.send(RunTask(Task(1, job("wait"))))  # runs until cancelled
    assert runner.started.wait(WAIT)
    conn.send(Stop())
    assert until_finished(conn, 1)[-1] == Failed(1, "cancelled", cancelled=True)


def test_on_cuda_memory_is_reported_again_after_the_first_job_and_a_failure_empties_the_cache(monkeypatch):
    live = {"memory": {"device_free_gib": 1.5}}
    monkeypatch.setattr(worker_module, "device_memory", lambda device: live if device.startswith("cuda") else {})
    runner = FakeRunner(device="cuda:0")
    emptied = _stub_cuda(monkeypatch, runner)
    ours, theirs = Pipe()
    worker = Worker(runner, theirs, "m#0")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        ours.send(RunTask(Task(1, job())))
        first = until_finished(ours, 1)
        ours.send(RunTask(Task(2, job())))
        second = until_finished(ours, 2)
        ours.send(RunTask(Task(3, job("boom"))))
        assert until_finished(ours, 3) == [Failed(3, "RuntimeError: boom")]
    finally:
        ours.send(Stop())
        thread.join(timeout=WAIT)
    updates = [m for m in first if isinstance(m, InfoUpdate)]
    assert updates == [InfoUpdate({"memory": {"offload": "none", "device_free_gib": 1.5}})]
    assert not [m for m in second if isinstance(m, InfoUpdate)]
    assert emptied == [True]


def test_the_ray_engine_names_a_replicas_out_of_memory_the_same_way():
    import torch  # here, not at the top: collecting this module imports no torch

    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_serve import _as_server_error

    class TaskError(Exception):  # what Ray raises in the caller: the replica's exception is its ``cause``
        cause = torch.cuda.OutOfMemoryError(CUDA_OOM)

    error = _as_server_error(TaskError("RayTaskError(OutOfMemoryError): ray::replica ...\nTraceback ..."))
    assert isinstance(error, InferenceFailed)
    assert error.message == f"Inference failed: {OUT_OF_MEMORY}{OUT_OF_MEMORY_ADVICE}"
    # the request's own step cache: the mark the runner set crosses Ray's pickling with the exception
    marked = torch.cuda.OutOfMemoryError(CUDA_OOM)
    marked.qis_advice, marked.qis_param = "; its step cache, taylorseer, ...", "cache"  # type: ignore[attr-defined]
    TaskError.cause = pickle.loads(pickle.dumps(marked))
    error = _as_server_error(TaskError("RayTaskError(OutOfMemoryError): ..."))
    assert isinstance(error, RequestDoesNotFit) and error.param == "cache" and error.message.endswith("taylorseer, ...")


def test_a_broken_gpu_fails_the_task_and_ends_the_worker_for_a_new_one(monkeypatch):
    """A CUDA error that breaks the process's context (an illegal memory access): every later call would fail too, so
    the task fails saying so and the worker process exits (its engine starts a new one) instead of answering 500s."""
    import torch  # here, not at the top: collecting this module imports no torch
    from worker_fakes import spec, stub_runner

    from qwen_image_server.engine.worker import worker_main

    def synchronize(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    runner = FakeRunner(device="cuda:0")
    emptied = _stub_cuda(monkeypatch, runner, synchronize)
    monkeypatch.setattr(worker_module, "device_memory", lambda device: {})
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    stub_runner(monkeypatch, lambda spec, device, dtype, shared=None, warm=True: runner)
    ours, theirs = Pipe()
    exits = []
    thread = threading.Thread(
        target=lambda: exits.append(_exit_code(worker_main, spec("m"), "cuda:0", "auto", 1, theirs, "m#0")),
        daemon=True,
    )
    thread.start()
    assert isinstance(ours.recv(), Ready)
    emptied.clear()  # the load's own (test_worker_loading.py)
    ours.send(RunTask(Task(1, job())))
    first = until_finished(ours, 1)
    ours.send(RunTask(Task(2, job("boom"))))
    assert until_finished(ours, 2) == [Failed(2, "RuntimeError: boom (the GPU failed; its worker is replaced)", retiring=True)]
    thread.join(timeout=WAIT)
    assert not thread.is_alive() and exits == [1]
    assert isinstance(first[-1], Done) and emptied == []  # cache given back only when it could be


def _exit_code(main, *args) -> int | None:
    try:
        main(*args)
    except SystemExit as exc:
        return exc.code
    return None


def test_a_preview_that_cannot_be_encoded_is_dropped_and_the_result_still_comes(served):
    conn, _, _ = served
    conn.send(RunTask(Task(1, job("bad preview", partial_images=2))))
    messages = until_finished(conn, 1)
    previews = [m.image.partial_index for m in messages if isinstance(m, Partial)]
    assert sorted(previews) == [1, 1]  # each image's second preview; the first, unencodable, left out
    assert isinstance(messages[-1], Done)
    conn.send(RunTask(Task(2, job(partial_images=1))))
    assert isinstance(until_finished(conn, 2)[-1], Done)  # the worker goes on
