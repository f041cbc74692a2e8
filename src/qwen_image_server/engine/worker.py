"""The worker process: owns one device and one pipeline (or, with ``--share-components``, the pipelines of
several models sharing their identical text encoders and VAEs), runs one task at a time.

``worker_main`` is the process's entry point; a ``Worker`` loads the pipelines,
then serves its pipe. What goes over the pipe are the small picklable dataclasses
below:

- from the engine: ``RunTask``, ``Cancel`` (stop that task at its next denoising
  step), ``Stop`` (stop what runs at its next step, then exit);
- to the engine: ``Ready`` (the worker's info: device, speed settings, memory,
  determinism) or ``LoadFailed``; ``InfoUpdate`` (new values for the ready info,
  e.g. the peak memory after the first job on CUDA); per task ``Computed`` as soon
  as the pipeline call returns (the worker takes the next task while a second
  thread encodes this one's images), then ``Done`` with the ``TaskResult`` or
  ``Failed``; ``Partial`` previews of a streaming request.

This module is imported by the API process (``engine/local.py``): torch and the
pipelines are imported only inside the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import TaskCancelled, failure_param, short_reason
from ..jobs import EncodedImage, Job, PartialImage, Task, TaskResult
from ..logs import worker_format
from .worker_device import DeviceBroken, device_memory, recover_device, release_cached, start_peak_here

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from PIL import Image

    from ..models.runner import PipelineRunner
    from ..models.spec import ModelSpec

log = logging.getLogger("qwen_image_server.worker")


# --- messages: engine -> worker ----------------------------------------------------------
@dataclass(frozen=True)
class RunTask:
    task: Task


@dataclass(frozen=True)
class Cancel:
    task_id: int


@dataclass(frozen=True)
class Stop:
    pass


ToWorker = RunTask | Cancel | Stop


# --- messages: worker -> engine ----------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]
    #: A worker of several models: each model's own info (speed, memory...), over ``info``.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True)
class InfoUpdate:
    info: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Computed:
    task_id: int


@dataclass(frozen=True)
class Done:
    result: TaskResult


@dataclass(frozen=True)
class Failed:
    task_id: int
    reason: str
    cancelled: bool = False
    retiring: bool = False  # the worker exits after this (its GPU broke): send it nothing more
    param: str | None = None  # the request field that made it fail (``errors.failure_param``); None: the server's side


@dataclass(frozen=True)
class Partial:
    task_id: int
    image: PartialImage


FromWorker = Ready | LoadFailed | InfoUpdate | Computed | Done | Failed | Partial


# --- one load at a time per GPU ------------------------------------------------------------
#: How long a worker waits for another worker on its GPU to finish loading before it loads anyway (a worker
#: killed while loading never releases the lock).
LOAD_WAIT_SECONDS = 600.0


class LoadLock(Protocol):
    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...
    def release(self) -> None: ...


@contextlib.contextmanager
def loading_turn(lock: LoadLock | None, device: str, name: str) -> Iterator[None]:
    """Hold ``device``'s load lock while loading, so that workers sharing a GPU load one after the other.

    Loading briefly needs more than the worker keeps: FP8 modes read each component in
    the run dtype and convert it on the device (a full-size transformer is ~41 GB in
    bf16, ~20 GB once converted). Two workers converting at once on one 80 GB card would
    run out of memory where one after the other fits; the memory plan counts one such
    transient per GPU. After ``LOAD_WAIT_SECONDS`` a worker loads anyway (the holder may
    have been killed), with a warning.
    """
    if lock is None:
        yield
        return
    started = time.monotonic()
    held = lock.acquire(timeout=LOAD_WAIT_SECONDS)
    waited = time.monotonic() - started
    if not held and not getattr(lock, "unavailable", False):  # (a lock that cannot be used has said so)
        log.warning("%s: another worker on %s has been loading for %.0fs; loading now all the same", name, device, waited)
    elif waited >= 1:
        log.info("%s: waited %.1fs for another worker on %s to finish loading", name, waited, device)
    try:
        yield
    finally:
        if held:
            lock.release()


# --- what the pipeline thread hands to the encode thread ---------------------------------------
@dataclass
class _Preview:
    task: Task
    index: int
    partial_index: int
    image: Image.Image


@dataclass
class _Finished:
    task: Task
    images: list[Image.Image]
    started: float
    finished: float
    stats: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # as the pipeline read them (``usage``)


class Worker:
    """Loaded pipelines serving their pipe: a receive thread, the pipeline loop, an encode thread.

    ``runner`` is the pipeline of a worker of one model; ``runners`` those of a worker of
    several (a task names its model), the first of them also being ``runner``.
    """

    def __init__(self, runner: PipelineRunner, conn: Connection, name: str, runners: dict[str, PipelineRunner] | None = None):
        self.runner = runner
        self.runners = runners or {}
        self.conn = conn
        self.name = name
        self._send_lock = threading.Lock()
        self._inbox: queue.Queue[Task | None] = queue.Queue()  # None: stop
        self._cancelled: set[int] = set()
        self._stopping = threading.Event()  # Stop came (or the engine is gone): what runs stops at its next step
        self._to_encode: queue.Queue[_Preview | _Finished | None] = queue.Queue()
        self._first_job = True  # on CUDA, the memory info is sent again after the first job, with its peak

    @classmethod
    def load(
        cls,
        spec: ModelSpec | list[ModelSpec],
        device: str,
        dtype: str,
        threads: int,
        conn: Connection,
        name: str,
        load_lock: LoadLock | None = None,
    ) -> Worker | None:
        """Load the pipeline (or each model's, sharing identical components) and report ``Ready``;
        ``LoadFailed`` (and None) when one cannot load.

        ``load_lock`` (one per GPU, from the engine) is held while the weights load and
        convert, not while a compiled model warms up: see ``loading_turn``."""
        specs = spec if isinstance(spec, list) else [spec]
        loading = specs[0].id
        try:
            import torch

            torch.set_num_threads(max(1, threads))
            from ..models.determinism import prepare_environment

            prepare_environment(any(one.profile.deterministic for one in specs))  # before CUDA starts here
            if device.startswith("cuda:"):
                # This process's current device: what runs on "the current stream" (the FP8 probe's timing events,
                # group offload's side stream) runs on the worker's GPU, and no context is made on cuda:0 as well.
                torch.cuda.set_device(torch.device(device))
            from ..models.runner import PipelineRunner
            from ..models.shared import ComponentCache

            shared = ComponentCache() if len(specs) > 1 else None
            runners = {}
            with loading_turn(load_lock, device, name):
                for one in specs:
                    loading = one.id
                    runners[one.id] = PipelineRunner(one, device=device, dtype=dtype, shared=shared, warm=False)
                # What loading converted away (bf16 weights now in FP8, the dropped head) goes back to the GPU before
                # the next worker there loads: the plan counts one load's extra per GPU, not one kept per worker.
                release_cached(device)
            for model, runner in runners.items():
                loading = model  # a failure names the model that was warming up
                runner.warm_up()
            start_peak_here(device)
        except Exception as exc:
            log.error("loading %s failed:\n%s", loading, traceback.format_exc())
            reason = short_reason(exc)
            conn.send(LoadFailed(reason if len(specs) == 1 else f"{loading}: {reason}"))
            return None
        first = runners[specs[0].id]
        worker = cls(first, conn, name, runners if len(specs) > 1 else None)
        info = {"pid": os.getpid(), "device": first.device, "dtype": str(first.dtype).removeprefix("torch.")}
        if len(specs) == 1:
            worker.send(Ready({**info, **worker.model_info(first), **worker.memory()}))
        else:
            models = {model: {**worker.model_info(runner), **worker.memory(runner)} for model, runner in runners.items()}
            worker.send(Ready({**info, "models_in_process": list(runners)}, models))
        return worker

    @staticmethod
    def model_info(runner: PipelineRunner) -> dict:
        return {"speed": runner.speed.info, "determinism": runner.determinism}

    def send(self, message: FromWorker) -> None:
        """Send ``message`` to the engine; dropped when the engine is gone (its process was killed): the worker then
        stops as after a ``Stop`` (the receiving thread sees the pipe closed), without a traceback per message."""
        with self._send_lock:  # the pipeline loop and the encode thread both send
            try:
                self.conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                log.info("the server is gone: %s not sent", type(message).__name__)
                self._stopping.set()

    def memory(self, runner: PipelineRunner | None = None) -> dict:
        runner = runner or self.runner
        return {"memory": {**runner.memory.summary(), **device_memory(runner.device).get("memory", {})}}

    def runner_for(self, task: Task) -> PipelineRunner:
        """The pipeline of the task's model (a worker of one model has one)."""
        return self.runners.get(task.model, self.runner)

    def serve(self) -> None:
        """Run tasks until told to stop (or the engine is gone, or the device broke: ``DeviceBroken``); then let the
        encode thread finish what earlier tasks computed."""
        threading.Thread(target=self._receive, name="receive", daemon=True).start()
        encoder = threading.Thread(target=self._encode, name="encode", daemon=True)
        encoder.start()
        try:
            while (task := self._inbox.get()) is not None:
                self._run(task)
                self._cancelled.discard(task.task_id)
        finally:
            self._to_encode.put(None)
            encoder.join(timeout=30)

    def _receive(self) -> None:
        while True:
            try:
                message: ToWorker = self.conn.recv()
            except (EOFError, OSError):
                message = Stop()  # the server is gone
            match message:
                case RunTask(task):
                    self._inbox.put(task)
                case Cancel(task_id):
                    self._cancelled.add(task_id)
                case _:
                    self._stopping.set()
                    self._inbox.put(None)
                    return

    def _run(self, task: Task) -> None:
        task_id = task.task_id
        started = time.time()

        def on_partial(index: int, partial_index: int, image: Image.Image) -> None:
            self._to_encode.put(_Preview(task, index, partial_index, image))

        def should_stop() -> bool:
            return task_id in self._cancelled or self._stopping.is_set()

        runner = self.runner_for(task)
        failure = param = None
        try:
            images = runner.run(task.job, should_stop=should_stop, on_partial=on_partial)
        except TaskCancelled:
            log.info("task %s stopped after %.2fs", task_id, time.time() - started)
            self.send(Failed(task_id, "cancelled", cancelled=True))
            return
        except Exception as exc:
            log.error("task %s failed:\n%s", task_id, traceback.format_exc())
            failure, param = short_reason(exc, request=True), failure_param(exc)
        if failure is not None:  # out of the except block: its traceback no longer holds the failed call's tensors
            broken = recover_device(runner.device)
            if broken is not None:
                self.send(Failed(task_id, f"{failure} (the GPU failed; its worker is replaced)", retiring=True))
                raise DeviceBroken(broken)
            self.send(Failed(task_id, failure, param=param))
            return
        self.send(Computed(task_id))
        if self._first_job and runner.device.startswith("cuda"):
            if self.runners:
                self.send(InfoUpdate({}, {model: self.memory(one) for model, one in self.runners.items()}))
            else:
                self.send(InfoUpdate(self.memory()))
        self._first_job = False
        self._to_encode.put(_Finished(task, images, started, time.time(), dict(runner.last_stats), runner.last_prompt_tokens))

    def _encode(self) -> None:
        from ..images import encode_image

        def encoded(job: Job, seed: int, image: Image.Image) -> EncodedImage:
            return EncodedImage(seed, encode_image(image, job.output_format, job.output_compression), *image.size)

        while (item := self._to_encode.get()) is not None:
            task = item.task
            if isinstance(item, _Preview):
                try:
                    preview = PartialImage(
                        item.index, item.partial_index, encoded(task.job, task.job.seeds[item.index], item.image)
                    )
                except Exception:  # a preview is not worth the thread: the task's result still comes
                    log.error("encoding a preview of task %s failed:\n%s", task.task_id, traceback.format_exc())
                    continue
                self.send(Partial(task.task_id, preview))
                continue
            try:
                job = task.job
                encoding = time.perf_counter()
                images = [encoded(job, seed, image) for seed, image in zip(job.seeds, item.images, strict=True)]
                stats = {**item.stats, "encode_seconds": round(time.perf_counter() - encoding, 6)}
                result = TaskResult(task.task_id, images, item.started, item.finished, self.name, item.prompt_tokens, stats)
                self.send(Done(result))
            except Exception as exc:
                log.error("encoding task %s failed:\n%s", task.task_id, traceback.format_exc())
                self.send(Failed(task.task_id, short_reason(exc)))


def worker_main(
    spec: ModelSpec | list[ModelSpec],
    device: str,
    dtype: str,
    threads: int,
    conn: Connection,
    name: str,
    log_level: int = logging.INFO,
    load_lock: LoadLock | None = None,
) -> None:
    """Entry point of a worker process (started by ``spawn`` or forked by the forkserver, see worker_process.py).

    SIGTERM and SIGINT are the server's to act on, not the worker's: sent to the whole process group (systemd's
    default KillMode, ``timeout``, ``kill -- -PGID``, Ctrl-C in a terminal) they would otherwise end the workers at
    once, failing their running requests and having them restarted during the shutdown. The server ends its workers
    itself, once running requests have had their grace: a ``Stop``, the pipe closing when the server is gone, or
    SIGKILL when a worker does not stop."""
    if threading.current_thread() is threading.main_thread():  # a worker process (tests also run it in a thread)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=worker_format(name))
    worker = Worker.load(spec, device, dtype, threads, conn, name, load_lock)
    if worker is not None:
        try:
            worker.serve()
        except DeviceBroken:
            raise SystemExit(1) from None  # its engine sees the exit and starts a new worker
