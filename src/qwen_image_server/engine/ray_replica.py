"""A Ray Serve model replica (``ModelReplica``): one device, one pipeline, one call at a time; previews streamed back
while it denoises, the encoded images at the end. The deployment around it, and the ingress that calls it, are
``engine/ray_serve.py``'s.

Ray's own modules are not imported here: Serve wraps the class in a deployment (``build_deployments``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass

from ..errors import TaskCancelled
from ..jobs import EncodedImage, PartialImage, Task, TaskResult
from ..logs import log_to_stderr, worker_format
from ..models.spec import ModelConfigError, ModelSpec
from .worker import loading_turn
from .worker_device import gpu_load_lock, recover_device, release_cached, start_peak_here

log = logging.getLogger(__name__)

#: Seconds a replica whose GPU broke lives on after failing its call (for the error to reach its caller) before its
#: process exits: Serve replaces a replica that died at once, where a failing health check takes three checks in a row
#: (6 s), all the while the replica takes requests and fails them.
EXIT_AFTER_BROKEN_SECONDS = 1.0
_exit_process = os._exit  # replaced in tests


@dataclass(frozen=True)
class MemoryNeed:
    """What one replica of a model needs on its GPU (``footprint``: the memory plan's estimate, loading included),
    worked out where the application is built, and what ``--memory-check`` says to do when the GPU has less free."""

    need: int
    detail: str  # what the figure is made of (``plan_advice.needs``)
    check: str = "on"  # on: refuse to load; warn: log and load anyway
    share: float = 1.0  # the replica's share of its GPU (ray_gpus_per_replica)

    def refusal(self, model: str, device: str) -> str | None:
        """Why ``model`` cannot load on ``device``, or None when it fits: its GPU has less free than the need, or
        the replica's share of the GPU is less than the need (Ray may place ``1 / share`` replicas on one GPU, and
        those loaded first have not yet used their working memory)."""
        import torch

        from ..models.footprint import human

        free, total = torch.cuda.mem_get_info(torch.device(device))
        if self.need <= free and self.need <= self.share * total:
            return None
        if self.need > self.share * total:
            room = f"ray_gpus_per_replica {self.share:g} gives each replica {human(self.share * total)} of {human(total)}"
        else:
            room = f"{human(free)} is free of {human(total)}"
        return (
            f"not enough GPU memory for model {model} on this replica's GPU ({torch.cuda.get_device_name(device)}): "
            f"it needs {human(self.need)} ({self.detail}), {room}. A smaller memory mode would fit (qwen-image-server "
            "plan prints what each needs: --weights-dtype fp8, --quantize fp8 or int4, --offload group), or a smaller "
            "QIS_MAX_IMAGE_SIDE, or a larger share of a GPU with more memory free"
        )


#: Set on a Ray node, Ray leaves every GPU visible to its actors instead of only the ones it gave them.
NOSET_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def replica_device(device: str, gpu_ids=None) -> str:
    """The CUDA device of this replica's GPU. Ray makes the GPUs it gives an actor the only ones the actor sees, so
    ``cuda`` is that GPU; but with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set, the actor sees every GPU of
    its node and ``cuda`` would be GPU 0 for every replica there. Then the device is the one Ray gave
    (``ray.get_gpu_ids()``), counted in the ``CUDA_VISIBLE_DEVICES`` this process has, if any. ``gpu_ids`` (for
    tests) stands for ``ray.get_gpu_ids``."""
    if device != "cuda" or os.environ.get(NOSET_VISIBLE, "").lower() not in ("1", "true"):
        return device
    if gpu_ids is None:
        import ray

        gpu_ids = ray.get_gpu_ids
    ids = [str(gpu) for gpu in gpu_ids()]
    if not ids:
        return device
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    index = visible.index(ids[0]) if ids[0] in visible else int(ids[0]) if ids[0].isdigit() else None
    if index is None:
        log.warning("Ray gave this replica GPU %s, which CUDA_VISIBLE_DEVICES (%s) does not list: using cuda", ids[0], visible)
        return device
    return f"cuda:{index}"


def _on_device(device: str):
    """``device`` as the current CUDA device of the calling thread, for a call: torch keeps the current device per
    thread, and the executor threads the replica runs its pipeline in start on GPU 0, where group offload's side
    stream and the streams it records its transfers on would otherwise be (cuda:N only; nothing for others)."""
    if not device.startswith("cuda:"):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(torch.device(device))


class ModelReplica:
    """One replica: owns one device and one pipeline; runs one task at a time."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        dtype: str,
        threads: int | None,
        stuck_task_seconds: float = 0.0,
        memory: MemoryNeed | None = None,
        log_level: str = "info",
    ):
        import torch

        from ..models.runner import PipelineRunner

        if threads:
            torch.set_num_threads(threads)
        from ..models.determinism import prepare_environment

        prepare_environment(spec.profile.deterministic)  # before CUDA starts here (the memory check, set_device)
        device = replica_device(device)
        if device.startswith("cuda:"):  # the current device too: streams, events and syncs without one are GPU 0's
            torch.cuda.set_device(torch.device(device))  # for this thread: loading and the warm-up (``_on_device``)
        self.spec = spec
        self.device = device
        self.name = f"{spec.id}@{os.getpid()}"
        log_to_stderr(log_level, worker_format(self.name))  # as an embedded worker's lines
        # Replicas given shares of one GPU (a fractional ray_gpus_per_replica) load one after the other, as the
        # embedded engine's workers on one GPU do: loading needs more than running (FP8 conversion), and each checks
        # the memory its GPU has free once those before it have loaded.
        with loading_turn(gpu_load_lock(device), device, self.name):
            refusal = memory.refusal(spec.id, device) if memory is not None and device.startswith("cuda") else None
            if refusal and memory is not None and memory.check == "on":
                # before any weight is read: Serve retries a replica whose start failed, and a load that runs out of
                # memory takes minutes each time for a full-size model
                raise ModelConfigError(refusal)
            if refusal:
                log.warning("%s; loading anyway (--memory-check warn)", refusal)
            self.runner = PipelineRunner(spec, device=device, dtype=dtype, warm=False)
            # What loading converted away (bf16 weights now in FP8, the dropped head) goes back to the GPU before the
            # next replica there loads.
            release_cached(device)
        self.runner.warm_up()
        start_peak_here(device)
        # A cancelled call returns at once, but its pipeline thread only stops at the next
        # step: the next call waits here so that the pipeline never has two owners.
        self._pipeline_lock = threading.Lock()
        self._stuck_after = stuck_task_seconds
        self._running: tuple[int, float] | None = None  # the task whose pipeline runs, and since when
        self._stop_asked: dict[int, float] = {}  # tasks told to stop whose pipeline has not ended: since when
        self._broken: str | None = None  # why this replica's GPU can run nothing more (``recover_device``)
        self._exiting = False

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        """Serve's periodic check: a task told to stop that still runs ``stuck_task_seconds`` later (counted from when
        its pipeline started, if later) is stuck in a call that does not return. Raising makes Serve replace this
        replica, as the embedded engine kills such a worker. So does a broken GPU (whose replica also exits soon after
        the call that broke it: ``EXIT_AFTER_BROKEN_SECONDS``)."""
        if self._broken is not None:
            raise RuntimeError(f"the GPU failed ({self._broken})")
        running = self._running
        if running is None or self._stuck_after <= 0 or running[0] not in self._stop_asked:
            return
        task_id, since = running
        waited = time.monotonic() - max(since, self._stop_asked[task_id])
        if waited > self._stuck_after:
            log.error("replica %s still runs task %s %.0fs after it was told to stop; unhealthy", self.name, task_id, waited)
            raise RuntimeError(f"task {task_id} still runs {waited:.0f}s after it was told to stop")

    async def run(self, task: Task):
        """Yield ``PartialImage`` previews while denoising, then the ``TaskResult``."""
        from ..images import encode_image

        loop = asyncio.get_running_loop()
        stop = threading.Event()
        previews: asyncio.Queue = asyncio.Queue()
        job = task.job

        def on_partial(index: int, partial_index: int, image) -> None:
            # Encoded on the loop's side (below), not here: the pipeline's thread goes on denoising meanwhile.
            loop.call_soon_threadsafe(previews.put_nowait, (index, partial_index, image))

        def encoded_preview(index: int, partial_index: int, image) -> PartialImage | None:
            try:
                data = encode_image(image, job.output_format, job.output_compression)
            except Exception:  # a preview is not worth the request: its result still comes
                log.error("encoding a preview of task %s failed:\n%s", task.task_id, traceback.format_exc())
                return None
            return PartialImage(index, partial_index, EncodedImage(job.seeds[index], data, *image.size))

        def work():
            with self._pipeline_lock:
                if stop.is_set():  # cancelled while the previous call's pipeline still ran: none of it is needed
                    raise TaskCancelled()
                if self._broken is not None:  # until Serve's health check replaces this replica
                    raise RuntimeError(f"the GPU failed ({self._broken}); its replica is being replaced")
                self._running = (task.task_id, time.monotonic())
                failure = None
                try:
                    started = time.time()
                    with _on_device(self.device):
                        images = self.runner.run(job, should_stop=stop.is_set, on_partial=on_partial)
                    return images, started, time.time(), dict(self.runner.last_stats), self.runner.last_prompt_tokens
                except TaskCancelled:
                    raise
                except Exception as exc:
                    log.error("task %s failed:\n%s", task.task_id, traceback.format_exc())
                    failure = exc.with_traceback(None)  # no frame of the failed call left holding its tensors
                    failure.__context__ = failure.__cause__ = None
                finally:
                    self._running = None
                self._broken = recover_device(self.runner.device)  # the cache given back; or the context is broken
                if self._broken is not None and hasattr(failure, "qis_param"):
                    del failure.qis_param  # a broken GPU is the server's failure (a 500), whatever the request asked
                raise failure

        future = loop.run_in_executor(None, work)
        future.add_done_callback(lambda _: previews.put_nowait(None))
        future.add_done_callback(lambda _: self._stop_asked.pop(task.task_id, None))  # on the loop, after any cancel
        try:
            while (item := await previews.get()) is not None:
                preview = await asyncio.to_thread(encoded_preview, *item)
                if preview is not None:
                    yield preview
            images, started, finished, stats, tokens = await future
        except asyncio.CancelledError:
            stop.set()
            if not future.done():
                self._stop_asked[task.task_id] = time.monotonic()
            future.add_done_callback(retrieve_outcome)  # the stopped run's TaskCancelled: no one awaits it now
            raise
        except Exception:
            if self._broken is not None and not self._exiting:  # its GPU can run nothing more: Serve starts another
                self._exiting = True
                log.error("replica %s exits in %gs: the GPU failed (%s)", self.name, EXIT_AFTER_BROKEN_SECONDS, self._broken)
                loop.call_later(EXIT_AFTER_BROKEN_SECONDS, _exit_process, 1)
            raise
        encoding = time.perf_counter()
        encoded = await asyncio.to_thread(
            lambda: [
                EncodedImage(seed, encode_image(image, job.output_format, job.output_compression), *image.size)
                for seed, image in zip(job.seeds, images, strict=True)
            ]
        )
        stats = {**stats, "encode_seconds": round(time.perf_counter() - encoding, 6)}
        yield TaskResult(task.task_id, encoded, started, finished, self.name, tokens, stats)


def retrieve_outcome(task: asyncio.Future) -> None:
    """Read a finished task's outcome, which no one awaits any more."""
    if not task.cancelled():
        task.exception()
