"""The worker process: owns one device and one pipeline, runs one task at a time.

Messages on its pipe (tuples, first item the kind):

- from the engine: ``("task", Task)``, ``("cancel", task_id)``, ``("stop",)``
- to the engine: ``("ready", info)``, ``("info", updates)`` (new values for the
  ``ready`` info, e.g. peak memory after the first job), ``("load_failed", reason)``,
  ``("computed", task_id)`` as soon as the pipeline call returns (the worker
  takes the next task while this one's images are encoded by a second thread),
  ``("result", TaskResult)``, ``("failed", task_id, reason, cancelled)``,
  and ``("partial", task_id, PartialImage)`` for previews of a streaming request.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback

from ..errors import TaskCancelled
from ..jobs import EncodedImage, PartialImage, Task, TaskResult

log = logging.getLogger("qwen_image_server.worker")


def short_reason(exc: BaseException) -> str:
    """One line for a client: the exception's type and first line, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def device_memory(device: str) -> dict:
    """``{"memory": ...}`` in GiB for a CUDA device: what this process holds and what the device has left
    (the live side of the memory plan); empty elsewhere."""
    if not device.startswith("cuda"):
        return {}
    import torch

    def gib(value: int) -> float:
        return round(value / 1024**3, 2)

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return {
        "memory": {
            "allocated_gib": gib(torch.cuda.memory_allocated(device)),
            "reserved_gib": gib(torch.cuda.memory_reserved(device)),
            "device_free_gib": gib(free),
            "device_total_gib": gib(total),
        }
    }


def worker_main(spec, device: str, dtype: str, threads: int, conn, name: str, log_level: int = logging.INFO) -> None:
    """Entry point of a worker process (started with the ``spawn`` method)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    try:
        import torch

        torch.set_num_threads(max(1, threads))
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        from ..models.runner import PipelineRunner

        runner = PipelineRunner(spec, device=device, dtype=dtype)
    except Exception as exc:
        log.error("loading %s failed:\n%s", spec.id, traceback.format_exc())
        send(("load_failed", short_reason(exc)))
        return
    info = {
        "pid": os.getpid(),
        "device": runner.device,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "speed": runner.speed.info,
        "determinism": runner.determinism,
    }

    def memory() -> dict:
        return {"memory": {**runner.memory.summary(), **device_memory(runner.device).get("memory", {})}}

    send(("ready", {**info, **memory()}))
    first_job = True  # on CUDA, the memory info is sent again after the first job, with its peak

    inbox: queue.Queue[Task | None] = queue.Queue()
    cancelled: set[int] = set()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the server is gone
            if message[0] == "task":
                inbox.put(message[1])
            elif message[0] == "cancel":
                cancelled.add(message[1])
            else:
                inbox.put(None)
                return

    to_encode: queue.Queue = queue.Queue()

    def encode() -> None:
        from ..images import encode_image

        def encoded(job, seed, image) -> EncodedImage:
            return EncodedImage(seed, encode_image(image, job.output_format, job.output_compression), *image.size)

        while (item := to_encode.get()) is not None:
            if item[0] == "partial":
                _, task, index, partial_index, image = item
                preview = PartialImage(index, partial_index, encoded(task.job, task.job.seeds[index], image))
                send(("partial", task.task_id, preview))
                continue
            _, task, images, started, finished, stats = item
            try:
                job = task.job
                encoding = time.perf_counter()
                images = [encoded(job, seed, image) for seed, image in zip(job.seeds, images, strict=True)]
                stats = {**stats, "encode_seconds": round(time.perf_counter() - encoding, 6)}
                tokens = runner.count_tokens(job.prompt)
                send(("result", TaskResult(task.task_id, images, started, finished, name, tokens, stats)))
            except Exception as exc:
                log.error("encoding task %s failed:\n%s", task.task_id, traceback.format_exc())
                send(("failed", task.task_id, short_reason(exc), False))

    threading.Thread(target=receive, name="receive", daemon=True).start()
    encoder = threading.Thread(target=encode, name="encode", daemon=True)
    encoder.start()

    while (task := inbox.get()) is not None:
        task_id = task.task_id
        started = time.time()

        def on_partial(index, partial_index, image, task=task) -> None:
            to_encode.put(("partial", task, index, partial_index, image))

        def should_stop(task_id: int = task_id) -> bool:
            return task_id in cancelled

        try:
            images = runner.run(task.job, should_stop=should_stop, on_partial=on_partial)
        except TaskCancelled:
            log.info("task %s stopped after %.2fs", task_id, time.time() - started)
            send(("failed", task_id, "cancelled", True))
        except Exception as exc:
            log.error("task %s failed:\n%s", task_id, traceback.format_exc())
            if runner.device.startswith("cuda"):
                torch.cuda.empty_cache()
            send(("failed", task_id, short_reason(exc), False))
        else:
            send(("computed", task_id))
            if first_job and runner.device.startswith("cuda"):
                send(("info", memory()))
            first_job = False
            to_encode.put(("result", task, images, started, time.time(), dict(runner.last_stats)))
        cancelled.discard(task_id)
    to_encode.put(None)
    encoder.join(timeout=30)
