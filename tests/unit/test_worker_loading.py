"""A worker's start (``worker_main``): ready or a load failure, several models in one process, and the load lock
that makes the workers of one GPU load one at a time (their tasks: test_worker.py)."""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe
from types import SimpleNamespace

from worker_fakes import WAIT, FakeRunner, job, recv, spec, stub_runner

from qwen_image_server.engine import worker as worker_module
from qwen_image_server.engine.worker import (
    Computed,
    Done,
    LoadFailed,
    Ready,
    RunTask,
    Stop,
    worker_main,
)
from qwen_image_server.jobs import Task


def test_worker_main_reports_ready_with_what_runs(monkeypatch):
    stub_runner(monkeypatch, lambda spec, device, dtype, shared=None, warm=True: FakeRunner())
    ours, theirs = Pipe()
    thread = threading.Thread(target=worker_main, args=(spec("m"), "cpu", "auto", 1, theirs, "m#0"), daemon=True)
    thread.start()
    ready = recv(ours)
    ours.send(Stop())
    thread.join(timeout=WAIT)
    assert isinstance(ready, Ready)
    info = ready.info
    assert (info["device"], info["dtype"], info["memory"]) == ("cpu", "float32", {"offload": "none"})
    assert info["speed"] == {"compile": False} and info["determinism"] == {"deterministic": False}
    assert isinstance(info["pid"], int)


def test_worker_main_reports_a_load_failure(monkeypatch):
    def fail(spec, device, dtype, shared=None, warm=True):
        raise OSError("no such file: /models/x/transformer")

    stub_runner(monkeypatch, fail)
    ours, theirs = Pipe()
    worker_main(spec("m"), "cpu", "auto", 1, theirs, "m#0")  # returns once it has reported
    assert recv(ours) == LoadFailed("OSError: no such file: /models/x/transformer")


def test_a_worker_of_several_models_loads_them_with_one_component_cache_and_routes_tasks(monkeypatch):
    loaded: dict = {}
    runners: dict = {}

    def load(spec, device, dtype, shared=None, warm=True):
        loaded[spec.id] = shared
        runners[spec.id] = FakeRunner(speed=SimpleNamespace(info={"model": spec.id}))
        return runners[spec.id]

    stub_runner(monkeypatch, load)
    ours, theirs = Pipe()
    specs = [spec("a"), spec("b")]
    thread = threading.Thread(target=worker_main, args=(specs, "cpu", "auto", 1, theirs, "a+b#0"), daemon=True)
    thread.start()
    ready = recv(ours)
    assert isinstance(ready, Ready) and ready.info["models_in_process"] == ["a", "b"]
    assert {model: info["speed"] for model, info in ready.models.items()} == {"a": {"model": "a"}, "b": {"model": "b"}}
    assert loaded["a"] is loaded["b"] is not None  # one cache: identical components load once
    ours.send(RunTask(Task(5, job(), model="b")))
    assert recv(ours) == Computed(5)
    done = recv(ours)
    assert isinstance(done, Done) and done.result.task_id == 5 and done.result.worker == "a+b#0"
    assert runners["b"].started.is_set() and not runners["a"].started.is_set()  # the task's model ran it
    ours.send(Stop())
    thread.join(timeout=WAIT)


def test_a_worker_of_several_models_names_the_one_that_failed_to_load(monkeypatch):
    def load(spec, device, dtype, shared=None, warm=True):
        if spec.id == "b":
            raise OSError("no such file")
        return FakeRunner()

    stub_runner(monkeypatch, load)
    ours, theirs = Pipe()
    worker_main([spec("a"), spec("b")], "cpu", "auto", 1, theirs, "a+b#0")
    assert recv(ours) == LoadFailed("b: OSError: no such file")


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


def _no_cuda_device_switch(monkeypatch) -> None:
    """The workers below run on "cuda:0" with stubbed runners: making it the current device is CUDA's part, stubbed."""
    import torch

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_workers_of_one_gpu_load_one_at_a_time_and_warm_up_outside_the_lock(monkeypatch):
    import multiprocessing

    _no_cuda_device_switch(monkeypatch)
    lock = multiprocessing.get_context("spawn").Lock()
    log: list = []
    stub_runner(monkeypatch, lambda spec, *a, **k: _LoadingRunner(spec, log, lock))
    pipes = [Pipe() for _ in range(2)]
    threads = [
        threading.Thread(target=worker_main, args=(spec(m), "cuda:0", "auto", 1, theirs, f"{m}#0", 20, lock))
        for m, (_, theirs) in zip("ab", pipes, strict=True)
    ]
    for thread in threads:
        thread.start()
    for ours, _ in pipes:
        assert isinstance(recv(ours), Ready)
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

    _no_cuda_device_switch(monkeypatch)
    lock = multiprocessing.get_context("spawn").Lock()
    log: list = []
    stub_runner(monkeypatch, lambda spec, *a, **k: _LoadingRunner(spec, log, lock))

    def serve_one(model: str) -> None:
        ours, theirs = Pipe()
        thread = threading.Thread(target=worker_main, args=(spec(model), "cuda:0", "auto", 1, theirs, f"{model}#0", 20, lock))
        thread.start()
        try:
            assert isinstance(recv(ours), Ready)
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


def test_a_worker_on_a_numbered_gpu_makes_it_current_before_loading(monkeypatch):
    """On ``cuda:1`` the process's current device is cuda:1 before anything loads: work on the current stream (the
    FP8 probe's timing events, group offload's side stream) then runs on the worker's own GPU. (CUDA is stubbed.)"""
    import torch

    from qwen_image_server.models import determinism

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(f"current {device}"))
    monkeypatch.setattr(determinism, "prepare_environment", lambda on: events.append(f"deterministic {on}"))

    def load(spec, device, dtype, shared=None, warm=True):
        events.append(f"load on {device}")
        raise RuntimeError("stop here")

    stub_runner(monkeypatch, load)
    ours, theirs = Pipe()
    worker_main(spec("m", deterministic=True), "cuda:1", "auto", 1, theirs, "m#0")
    assert recv(ours) == LoadFailed("RuntimeError: stop here")
    # cuBLAS' workspace setting before CUDA starts (set_device starts it: warned of as too late)
    assert events == ["deterministic True", "current cuda:1", "load on cuda:1"]
    events.clear()
    worker_main(spec("m"), "cpu", "auto", 1, theirs, "m#0")
    recv(ours)
    assert events == ["deterministic False", "load on cpu"]


def test_a_gpu_worker_gives_its_loads_leftovers_back_before_the_next_one_loads(monkeypatch):
    """Loading converts weights (bf16 to FP8) and drops some (the text encoder's head): what it freed stays in the
    process's CUDA cache, where the next worker on that GPU cannot have it. The cache is emptied while the load lock is
    still held, before the next worker loads. (CUDA is stubbed.)"""
    import multiprocessing

    import torch

    _no_cuda_device_switch(monkeypatch)
    lock = multiprocessing.get_context("spawn").Lock()
    held_at_empty: list[bool] = []

    def empty_cache() -> None:
        free = lock.acquire(block=False)
        if free:
            lock.release()
        held_at_empty.append(not free)

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    stub_runner(monkeypatch, lambda spec, *a, **k: FakeRunner(device="cuda:0"))
    monkeypatch.setattr(worker_module, "device_memory", lambda device: {})
    ours, theirs = Pipe()
    thread = threading.Thread(target=worker_main, args=(spec("m"), "cuda:0", "auto", 1, theirs, "m#0", 20, lock), daemon=True)
    thread.start()
    assert isinstance(recv(ours), Ready)
    ours.send(Stop())
    thread.join(timeout=WAIT)
    assert held_at_empty == [True]


def test_a_gpu_workers_peak_memory_counts_from_after_its_warm_up(monkeypatch):
    """``cuda_peak_gib`` (``/ready``, ``qis_worker_gpu_memory_bytes{kind="peak"}``) is the jobs' peak: it counted the
    load's conversions and the warm-up (a compile's) too, as the peak was never reset. (CUDA is stubbed.)"""
    import multiprocessing

    import torch

    _no_cuda_device_switch(monkeypatch)
    events: list[str] = []

    class Runner(FakeRunner):
        def warm_up(self) -> None:
            events.append("warm")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: events.append(f"peak from {device}"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stub_runner(monkeypatch, lambda spec, *a, **k: Runner(device="cuda:0"))
    monkeypatch.setattr(worker_module, "device_memory", lambda device: {})
    lock = multiprocessing.get_context("spawn").Lock()
    ours, theirs = Pipe()
    thread = threading.Thread(target=worker_main, args=(spec("m"), "cuda:0", "auto", 1, theirs, "m#0", 20, lock), daemon=True)
    thread.start()
    assert isinstance(recv(ours), Ready)
    assert events == ["warm", "peak from cuda:0"]
    ours.send(Stop())
    thread.join(timeout=WAIT)
