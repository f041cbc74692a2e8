"""The API process's side of one worker process: the process, the two threads that talk to it, and where its
messages go.

A worker process serves one model's pool, or, with ``--share-components``, slot ``i``
of every model (one process per slot, its pipelines sharing identical text encoders
and VAEs). Messages about a task go to the pool whose task it is; ``Ready``,
``InfoUpdate`` and ``LoadFailed`` to every pool; after each message every pool may
hand the worker its next piece. The first pool owns the process's life cycle
(restarts, giving up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
from typing import TYPE_CHECKING, Any

from .worker import Computed, Done, Failed, FromWorker, Partial, Stop, ToWorker, worker_main

if TYPE_CHECKING:
    from .model_pool import ModelPool, _Piece

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()]+){2,}[\\/]?")


def public_reason(reason: str | None) -> str:
    """A load failure's reason as clients may see it: file system paths replaced (they are in the server log), at
    most 400 characters, a cut one ending in "..." (at 200, attention backends' advice was cut mid-sentence)."""
    text = _PATH.sub("<path>", reason or "unknown error")
    return text if len(text) <= 400 else text[:397] + "..."


#: What a forkserver imports once, before it forks workers: a worker then starts in a fraction of a second
#: instead of importing torch, diffusers and transformers anew (seconds of CPU per start or restart). First the module
#: that lets the forkserver exit without tearing all that down again (forkserver_exit.py).
FORKSERVER_PRELOAD = [
    "qwen_image_server.engine.forkserver_exit",
    "torch",
    "diffusers",
    "transformers",
    "diffusers.pipelines.qwenimage",
    "transformers.models.qwen2_5_vl",
    "qwen_image_server.engine.worker",
    "qwen_image_server.models.runner",
]


def start_method(setting: str, device: str) -> str:
    """``spawn`` or ``forkserver`` for a worker on ``device``. ``auto`` forks only CPU workers: whether a GPU
    worker forked from a process that imported torch gets a working CUDA depends on nothing in that process
    having touched the driver, which has not been checked on every stack; a fresh interpreter always has."""
    if setting == "auto":
        setting = "forkserver" if device == "cpu" else "spawn"
    if setting == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"  # Windows
    return setting


def start_context(setting: str, device: str):
    """The multiprocessing context a worker on ``device`` starts from (the forkserver with its preload)."""
    method = start_method(setting, device)
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def start_forkserver_early(setting: str, device_setting: str) -> bool:
    """Start the forkserver now, when its workers will surely be CPU workers, so that its imports (torch,
    diffusers, transformers: seconds of CPU) run while the API process makes its own, on another core, instead
    of after them. Cheap to decide: no torch is imported here. Whether ``auto`` means a GPU is known only once
    torch is imported, so ``--device auto`` starts early only where no GPU can be visible (no NVIDIA or ROCm
    driver, or ``CUDA_VISIBLE_DEVICES`` empty: the planner's test). Returns whether it started one (the workers
    then connect to it; otherwise it starts with the first CPU worker)."""
    from ..models.machine import no_gpu_driver

    device = "cpu" if device_setting == "auto" and no_gpu_driver() else device_setting  # "auto" left: maybe a GPU
    if start_method(setting, device) != "forkserver":
        return False
    from multiprocessing import forkserver

    start_context(setting, "cpu")  # sets the preload
    forkserver.ensure_running()  # starts the process and returns; the preload runs there
    return True


#: Seconds the forkserver probe's own run may take (its start waits for the preload, however long that is).
PROBE_SECONDS = 30.0


def prepare_start(setting: str, device: str) -> None:
    """Make ready what starting a worker on ``device`` needs: a forkserver that has imported its preload, started
    anew (seconds of imports) when it is not running, e.g. after the system killed it. Blocking: the engine calls it
    in a thread before it starts a replacement, so that ``Process.start`` (on the event loop) does not wait for those
    imports. A forkserver answers its first fork only once its preload is imported: one process that does nothing,
    forked and joined here, waits for that (``ensure_running`` alone returns as soon as it is launched)."""
    if start_method(setting, device) == "forkserver":
        ctx = start_context(setting, device)  # sets the preload
        probe = ctx.Process(target=_nothing, name="forkserver-ready")
        probe.start()
        probe.join(PROBE_SECONDS)
        if probe.is_alive():  # (a process that does nothing does not take this long)
            probe.kill()


async def start_prepared(setting: str, device: str) -> None:
    """``prepare_start`` in a daemon thread of its own, awaited: unlike the default executor's threads, one that never
    returns (a forkserver stuck in its imports) holds no shutdown (the interpreter joins those at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            prepare_start(setting, device)
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the server stopped): no one waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="prepare worker start", daemon=True).start()
    await done


def _nothing() -> None:
    """A forked process's whole work in ``prepare_start``."""


#: One load lock per (start method, GPU): the workers placed on a GPU load one at a time (``worker.loading_turn``).
_LOAD_LOCKS: dict[tuple[str, str], Any] = {}


def load_lock(ctx, device: str):
    """The load lock of ``device`` for processes started from ``ctx``; None off CUDA (nothing to share there)."""
    if not device.startswith("cuda"):
        return None
    key = (ctx.get_start_method(), "cuda:0" if device == "cuda" else device)
    if key not in _LOAD_LOCKS:
        _LOAD_LOCKS[key] = ctx.Lock()
    return _LOAD_LOCKS[key]


class WorkerProcess:
    """One worker process of one pool, or of several pools (``--share-components``)."""

    def __init__(self, pools: list[ModelPool], slot: int, device: str, threads: int):
        self.pools = pools
        self.owner = pools[0]
        self.loop = self.owner.loop
        self.slot = slot
        self.device = device
        self.name = f"{'+'.join(pool.spec.id for pool in pools)}#{slot}"
        self.state = "loading"
        self.running: _Piece | None = None
        self.infos: dict[str, dict] = {}  # what the worker reported, per model
        specs = pools[0].spec if len(pools) == 1 else [pool.spec for pool in pools]
        ctx = start_context(self.owner.settings.worker_start, device)
        self.conn, child_conn = ctx.Pipe()
        level = logging.getLogger().level or logging.INFO
        self.process = ctx.Process(
            target=worker_main,
            args=(specs, device, self.owner.settings.dtype, threads, child_conn, self.name, level, load_lock(ctx, device)),
            name=f"qwen-image-worker {self.name}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self._ended = threading.Event()  # its end of the pipe closed: the process is gone (``alive``)
        self._outbox: queue.Queue[ToWorker | None] = queue.Queue()
        try:
            threading.Thread(target=self._read, name=f"read {self.name}", daemon=True).start()
            threading.Thread(target=self._write, name=f"write {self.name}", daemon=True).start()
        except BaseException:  # no thread to talk to it (out of threads): no process left behind that nobody reads
            self.process.kill()
            raise

    @property
    def shared(self) -> bool:
        return len(self.pools) > 1

    def send(self, message: ToWorker) -> None:
        self._outbox.put(message)

    def stop(self) -> None:
        self.send(Stop())

    def alive(self) -> bool:
        """Whether the process runs: its end of the pipe is still open. ``Process.is_alive`` asks the forkserver that
        started it, and once that is gone it says 255 of a worker that runs on (which then was never killed when
        stuck, nor at shutdown)."""
        return not self._ended.is_set()

    def kill(self) -> None:
        """SIGKILL, by pid: ``Process.kill`` sends nothing once the forkserver is gone (it takes the process as ended).
        The pid is still the worker's while its end of the pipe is open."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    def _read(self) -> None:
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    break
                self.loop.call_soon_threadsafe(self.deliver, message)
            self._ended.set()
            self.process.join(timeout=10)
            self._outbox.put(None)
            self.loop.call_soon_threadsafe(self.exited)
        except RuntimeError:  # the event loop is closed: the server has shut down
            pass

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return

    # --- on the event loop --------------------------------------------------------------------
    def deliver(self, message: FromWorker) -> None:
        """Hand a message to the pool(s) it concerns, then let every pool dispatch."""
        match message:
            case Computed(task_id) | Failed(task_id) | Partial(task_id):
                targets = [self.owner_of(task_id)]
            case Done(result):
                targets = [self.owner_of(result.task_id)]
            case _:
                targets = list(self.pools)
        for pool in targets:
            if pool is not None:
                pool.on_message(self, message)
        if self.shared and not isinstance(message, Partial):
            for pool in self.pools:
                pool.dispatch()

    def owner_of(self, task_id: int) -> ModelPool | None:
        if self.running is not None and self.running.task.task_id == task_id:
            return self.running.pool
        return next((pool for pool in self.pools if task_id in pool.encoding), None)

    def exited(self) -> None:
        for pool in self.pools:
            pool.on_exit(self)

    def error(self) -> str | None:
        """Why the process could not load, as it reported it (for any of its models)."""
        return next((info["error"] for info in self.infos.values() if "error" in info), None)

    def describe(self, pool: ModelPool | None = None) -> dict:
        """The worker as one model's pool shows it (``/ready``): its name in that pool, state, process, device, info."""
        pool = pool or self.owner
        info = dict(self.infos.get(pool.spec.id, {}))
        if "error" in info:
            info["error"] = public_reason(info["error"])
        out = {"name": f"{pool.spec.id}#{self.slot}", "state": self.state, "pid": self.process.pid, "device": self.device}
        if self.shared:
            out["process"] = self.name  # the process serves every model in its name
        return {**out, **info}
