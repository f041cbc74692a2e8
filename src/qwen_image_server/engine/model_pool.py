"""One served model's side of the embedded engine (``local.py``): its ``ModelPool`` of worker processes, its queue
of job pieces and their dispatch, the messages its workers send back, and their recovery: a worker that exits is
restarted (one that keeps failing to load, after a growing delay, then the model is marked failed and retried every
``worker_retry_seconds``), one stuck in a task told to stop is killed. Runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import InferenceFailed, NotReady, QueueFull, ShuttingDown, TaskCancelled, task_failure
from ..jobs import Job, JobResult, PartialImage, Task, TaskResult
from ..models.spec import ModelSpec
from .admission import PixelBudget, RetryAfter
from .pieces import split_for, wait_all
from .worker import Cancel, Computed, Done, Failed, FromWorker, InfoUpdate, LoadFailed, Partial, Ready, RunTask
from .worker_process import WorkerProcess, public_reason, start_prepared

log = logging.getLogger(__name__)
#: Seconds a worker that said it exits (its GPU broke) has to be gone before it is killed.
RETIRE_SECONDS = 30.0
#: Seconds before another try when a replacement worker could not even be started.
RESTART_RETRY = 5.0


@dataclass(eq=False)
class _JobState:
    """Book-keeping for one submitted job."""

    pieces: list[_Piece] = field(default_factory=list)
    undispatched: int = 0
    cancelled: bool = False
    on_partial: Callable[[PartialImage], None] | None = None


@dataclass(eq=False)
class _Piece:
    task: Task
    future: asyncio.Future
    job: _JobState
    offset: int  # index of the piece's first image in its job
    pool: ModelPool
    worker: WorkerProcess | None = None


class ModelPool:
    """The workers, queue and jobs of one served model."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        devices: list[str],
        threads: int,
        task_ids: itertools.count,
        spawn: bool = True,
    ):
        self.spec = spec
        self.settings = settings
        self.devices = devices
        self.threads = threads
        self.task_ids = task_ids
        self.loop = asyncio.get_running_loop()
        self.pending: deque[_Piece] = deque()
        self.encoding: dict[int, _Piece] = {}
        self.waiting_jobs = 0
        self.load_failures = 0
        self.restarts = 0  # workers that exited unexpectedly (for the metrics and /ready)
        self.broken: str | None = None
        self.closing = False
        self.retry_after = RetryAfter(settings, spec.id, self.serving)  # workers that take jobs, not those that gave up
        self.budget = PixelBudget(settings, spec.id, self.retry_after)
        self._starting: set[asyncio.Task] = set()  # replacements being started (``_replace_soon``)
        self._start_failures = 0  # replacements in a row that could not even be started
        self.was_ready = False  # ready once (every worker loaded or gave up): from then on one serving worker keeps it so
        # spawn=False: the engine adds worker processes shared with other pools (--share-components)
        self.workers: list[WorkerProcess] = []
        if spawn:
            self.workers = [WorkerProcess([self], slot, device, threads) for slot, device in enumerate(devices)]

    # --- jobs ----------------------------------------------------------------------
    def admit(self) -> None:
        """Refuse at once when the model is failed, its queue full or its pixel budget spent."""
        if self.broken:
            raise NotReady(self._unavailable())
        if self.waiting_jobs >= self.settings.queue_size_for(self.spec.id):
            raise QueueFull(retry_after=self.retry_after())
        self.budget.check()

    async def submit(self, job: Job, deadline: float, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        self.admit()
        with self.budget.hold(job):
            return await self._submit(job, deadline, on_partial)

    async def _submit(self, job: Job, deadline: float, on_partial: Callable[[PartialImage], None] | None = None) -> JobResult:
        batch, pieces = split_for(job, len(self.workers), self.settings.max_batch_size)
        state = _JobState(on_partial=on_partial)
        for i, piece_job in enumerate(pieces):
            task = Task(next(self.task_ids), piece_job, model=self.spec.id)
            piece = _Piece(task, self.loop.create_future(), state, offset=i * batch, pool=self)
            state.pieces.append(piece)
            self.pending.append(piece)
        state.undispatched = len(state.pieces)
        self.waiting_jobs += 1
        self.dispatch()
        try:
            results: list[TaskResult] = await wait_all([piece.future for piece in state.pieces], deadline)
        except BaseException:  # a failed piece, the timeout, or the caller cancelled (client gone)
            self._cancel(state)
            raise
        finally:
            # Each piece points at its job state (``piece.job``): without the state's list of them, the job's images
            # and uploads go as soon as no worker runs a piece, not at the next full garbage collection.
            state.pieces.clear()
        result = JobResult.combine(results)
        self.retry_after.observe(result.finished - result.started)
        return result

    def _cancel(self, state: _JobState) -> None:
        """Drop the job's queued pieces and stop its running ones at their next step."""
        if state.cancelled:
            return
        state.cancelled = True
        if state.undispatched:
            self.waiting_jobs -= 1
            state.undispatched = 0
            # out of the queue now, not when a worker is next free: they hold the job's images
            self.pending = deque(piece for piece in self.pending if piece.job is not state)
        for piece in state.pieces:
            if piece.worker is not None and piece.worker.running is piece:
                piece.worker.send(Cancel(piece.task.task_id))
                if (stuck_after := self.settings.stuck_task_seconds_for(self.spec.id)) > 0:
                    # the task's id, not the piece: the timer must not keep the job's images for that long
                    self.loop.call_later(stuck_after, self._kill_if_stuck, piece.worker, piece.task.task_id)
            if not piece.future.done():
                piece.future.set_exception(TaskCancelled())
                piece.future.exception()  # retrieved: nobody awaits it any more

    def dispatch(self) -> None:
        idle = [w for w in self.workers if w.state == "idle"]
        while idle and self.pending:
            piece = self.pending.popleft()  # (a cancelled job's pieces left the queue: ``_cancel``)
            worker = idle.pop(0)
            worker.state = "busy"
            worker.running = piece
            piece.worker = worker
            piece.job.undispatched -= 1
            if piece.job.undispatched == 0:
                self.waiting_jobs -= 1
            worker.send(RunTask(piece.task))

    # --- messages from workers -----------------------------------------------------------
    def on_message(self, worker: WorkerProcess, message: FromWorker) -> None:
        match message:
            case Ready(info, models):
                worker.infos[self.spec.id] = {**info, **models.get(self.spec.id, {})}
                worker.state = "idle"
                self.load_failures = 0
                if self.broken:
                    log.info("model %s loaded again", self.spec.id)
                    self.broken = None
                self.was_ready = self.was_ready or self.ready()
                log.info("worker %s ready: %s", worker.name, info)
            case InfoUpdate(info, models):
                worker.infos[self.spec.id] = {**worker.infos.get(self.spec.id, {}), **info, **models.get(self.spec.id, {})}
            case LoadFailed(reason):
                self.load_failures += 1
                worker.state = "failed"
                worker.infos[self.spec.id] = {"error": reason}
                self.was_ready = self.was_ready or self.ready()  # its others serve, all loaded
                log.error("worker %s could not load %s: %s", worker.name, self.spec.id, reason)
            case Computed(task_id):
                piece = self._take_running(worker, task_id)
                if piece is not None:
                    self.encoding[task_id] = piece
            case Done(result):
                piece = self.encoding.pop(result.task_id, None)
                if piece is not None and not piece.future.done():
                    piece.future.set_result(result)
            case Partial(task_id, partial):
                running = worker.running
                piece = running if running and running.task.task_id == task_id else self.encoding.get(task_id)
                if piece is not None and not piece.job.cancelled and piece.job.on_partial is not None:
                    partial.index += piece.offset
                    piece.job.on_partial(partial)
                return
            case Failed(task_id, reason, cancelled, retiring, param):
                piece = self._take_running(worker, task_id) or self.encoding.pop(task_id, None)
                if piece is not None and not piece.future.done():
                    piece.future.set_exception(TaskCancelled() if cancelled else task_failure(reason, param))
                if retiring:  # it exits to be started anew (its GPU broke): no queued task goes to it meanwhile
                    worker.state = "restarting"
                    self.loop.call_later(RETIRE_SECONDS, self._kill_if_not_gone, worker)
        self.dispatch()

    def _kill_if_not_gone(self, worker: WorkerProcess) -> None:
        """A worker that said it exits (its GPU broke) and has not, ``RETIRE_SECONDS`` later (its exit hangs in the
        broken driver): killed, so that ``on_exit`` starts its successor."""
        if not self.closing and worker in self.workers and worker.alive():
            log.error("worker %s did not exit %.0fs after its GPU failed; killing it", worker.name, RETIRE_SECONDS)
            worker.kill()

    def _kill_if_stuck(self, worker: WorkerProcess, task_id: int) -> None:
        """A worker still running a task it was told to stop, ``stuck_task_seconds`` later, is stuck in a call that
        does not return (a pipeline checks between steps): kill it. ``on_exit`` restarts it, as after a crash."""
        running = worker.running
        if self.closing or running is None or running.task.task_id != task_id or not worker.alive():
            return
        log.error(
            "worker %s still runs task %s %.0fs after it was told to stop; killing it (a new one takes its place)",
            worker.name,
            task_id,
            self.settings.stuck_task_seconds_for(self.spec.id),
        )
        worker.kill()

    def _take_running(self, worker: WorkerProcess, task_id: int) -> _Piece | None:
        piece = worker.running
        if piece is None or piece.task.task_id != task_id:
            return None
        worker.running = None
        if worker.state == "busy":
            worker.state = "idle"
        return piece

    def on_exit(self, worker: WorkerProcess) -> None:
        if worker not in self.workers:
            return
        code = worker.process.exitcode
        lost = [worker.running] if worker.running and worker.running.pool is self else []
        if worker.running is not None and worker.running.pool is self:
            worker.running = None
        for task_id in [tid for tid, piece in self.encoding.items() if piece.worker is worker]:
            lost.append(self.encoding.pop(task_id))
        for piece in lost:
            if not piece.future.done():
                piece.future.set_exception(
                    InferenceFailed(f"worker process exited unexpectedly (exit code {code})", retryable=True)
                )
        if self.closing:
            return
        self.restarts += 1
        if worker.owner is not self:  # a process shared with other models: its first model restarts it
            return
        loading = worker.state in ("loading", "failed")  # it exited before it served (else: a crash while serving)
        if worker.state == "loading":
            self.load_failures += 1  # died before it could say why
        if loading and self._give_up():
            retry = self.settings.worker_retry_seconds
            worker.state = "failed"
            for pool in worker.pools:
                serving = pool.usable()  # its other workers serve the model: only this one waits for the next try
                outcome = "goes on with its other workers" if serving else "marked failed"
                log.warning("worker %s exited (exit code %s) and gave up loading; model %s %s, next try in %.0fs",
                            worker.name, code, pool.spec.id, outcome, retry)  # fmt: skip
                if not serving:
                    pool.mark_broken(worker.error() or f"worker exited with code {code} while loading")
            self.loop.call_later(retry, self._retry_failed)
            return
        # A worker that keeps failing to load is restarted after 1, 2, 4 ... seconds (at most 60); one that served, at once.
        delay = 0.0 if self.load_failures == 0 or not loading else min(60.0, 2.0 ** (self.load_failures - 1))
        log.warning("worker %s exited (exit code %s); restarting in %.0fs", worker.name, code, delay)
        worker.state = "restarting"
        self.loop.call_later(delay, self._restart, worker)

    def mark_broken(self, reason: str) -> None:
        """The model's workers gave up loading: refuse its queued and new jobs until one loads again."""
        self.broken = reason
        while self.pending:
            piece = self.pending.popleft()
            if not piece.future.done():
                piece.future.set_exception(NotReady(self._unavailable()))

    def _replace(self, worker: WorkerProcess) -> None:
        """A new process in ``worker``'s place, in every pool it serves."""
        new = WorkerProcess(worker.pools, worker.slot, worker.device, self.threads)
        for pool in worker.pools:
            if worker in pool.workers:
                pool.workers[pool.workers.index(worker)] = new

    def _restart(self, worker: WorkerProcess) -> None:
        if self.closing or worker not in self.workers:
            return
        self._replace_soon(worker)

    def _replace_soon(self, worker: WorkerProcess) -> None:
        """``_replace`` once the way workers start is ready, made ready in a thread: a forkserver that died (the
        system's out-of-memory killer) is started anew there, and its imports took the event loop, and with it every
        request of every model, for seconds."""

        async def replace() -> None:
            try:
                await start_prepared(self.settings.worker_start, worker.device)
                if not self.closing and worker in self.workers:
                    self._replace(worker)
                    self._start_failures = 0
            except Exception as exc:  # no process could start (out of memory, of file descriptors): try again later
                self._start_failures += 1
                delay = min(60.0, RESTART_RETRY * 2 ** (self._start_failures - 1))
                log.error("could not start a worker in place of %s (%s: %s); trying again in %.0fs",
                          worker.name, type(exc).__name__, exc, delay)  # fmt: skip
                self.loop.call_later(delay, self._restart, worker)

        task = self.loop.create_task(replace())
        self._starting.add(task)  # held until it ends (the loop keeps only a weak reference)
        task.add_done_callback(self._starting.discard)

    def _retry_failed(self) -> None:
        """Try the workers that gave up loading again (the model's files may have been fixed, or their GPU freed); a
        failed model stays failed until one loads."""
        if self.closing or not any(w.state == "failed" and w.owner is self for w in self.workers):
            return
        log.info("trying model %s again", self.spec.id)
        self.load_failures = 0
        for worker in list(self.workers):
            if worker.state == "failed" and not worker.alive() and worker.owner is self:
                self._replace_soon(worker)

    def _give_up(self) -> bool:
        return self.load_failures > self.settings.worker_restart_limit

    def _unavailable(self) -> str:
        return (
            f"Model {self.spec.id} is unavailable: its workers failed to load ({public_reason(self.broken)}); see the server log"
        )

    # --- life cycle ------------------------------------------------------------------
    def ready(self) -> bool:
        """Every worker loaded, save those that gave up loading while others serve (a GPU that cannot hold the model
        does not take the model's other workers out of service; ``workers`` in the status shows it). Once that was
        so, a worker being restarted (after a crash) leaves the model ready while another serves: a readiness probe
        would otherwise take the whole server out of service for as long as one worker reloads."""
        return self.usable() and (self.was_ready or self._all_loaded())

    def _all_loaded(self) -> bool:
        return all(w.state in ("idle", "busy", "failed") for w in self.workers)

    def usable(self) -> bool:
        """Whether a worker of the model can take work now."""
        return self.serving() > 0

    def serving(self) -> int:
        """How many of the model's workers take work now."""
        return sum(w.state in ("idle", "busy") for w in self.workers)

    def status(self) -> dict:
        return {
            "kind": self.spec.kind,
            "ready": self.ready(),
            "state": "failed" if self.broken else ("ready" if self.ready() else "loading"),
            "queued_jobs": self.waiting_jobs,
            "queue_size": self.settings.queue_size_for(self.spec.id),
            "task_timeout": self.settings.task_timeout_for(self.spec.id),
            "worker_restarts": self.restarts,
            "held_pixel_bytes": self.budget.held,
            "error": public_reason(self.broken) if self.broken else None,
            "workers": [w.describe(self) for w in self.workers],
        }

    async def close(self, timeout: float = 10.0) -> None:
        self.closing = True
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            while worker.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if worker.alive():
                worker.kill()
        for piece in list(self.pending) + list(self.encoding.values()):
            if not piece.future.done():
                piece.future.set_exception(ShuttingDown())
