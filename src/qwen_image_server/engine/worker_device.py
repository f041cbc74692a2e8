"""A worker's GPU as the worker process sees it: what it holds (``device_memory``, for ``/ready`` and the metrics),
and what is left after a pipeline call failed (``recover_device``): the memory it cached given back, or the process
given up (``DeviceBroken``) when its CUDA context broke. Shared by the embedded engine's worker and the Ray replica;
torch is imported inside the functions (the API process imports this module through ``engine/worker.py``)."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

from ..errors import short_reason

log = logging.getLogger(__name__)


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


def release_cached(device: str) -> None:
    """Give the memory this process's allocator caches on a CUDA ``device`` back to the device (other processes on it
    see it free again), once nothing holds the tensors it held; nothing elsewhere."""
    if not device.startswith("cuda"):
        return
    import gc

    import torch

    gc.collect()  # tensors kept by reference cycles (frames, exceptions) until the collector runs
    torch.cuda.empty_cache()


def start_peak_here(device: str) -> None:
    """Count a CUDA ``device``'s peak memory (``cuda_peak_gib``) from now on: after loading and warming up, so that it
    is the peak of the jobs, not of the load's conversions or a compile's warm-up; nothing elsewhere."""
    if not device.startswith("cuda"):
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


class DeviceBroken(Exception):
    """The worker's GPU cannot run anything more in this process (its CUDA context is broken): the process exits and
    its engine starts a new one."""


def recover_device(device: str) -> str | None:
    """After a failed pipeline call on ``device``, once nothing holds the call's tensors: give back what it cached to
    the GPU (other workers on it may need it), and say why the device cannot go on, or None when it can. Out of
    memory leaves it usable; a CUDA error such as an illegal memory access leaves the process's CUDA context broken,
    and every later call would fail the same way."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        torch.cuda.synchronize(torch.device(device))
        release_cached(device)  # with a gc pass: the failed call's frames and its exception may hold a cycle
    except Exception as exc:
        log.error("the GPU %s failed in this worker (%s): the worker exits to be replaced", device, short_reason(exc))
        return short_reason(exc)
    return None


class GpuFileLock:
    """A GPU's load lock between processes that share nothing but the machine (Ray replicas given shares of one GPU):
    an exclusive ``flock`` on a file named by the GPU's UUID in the temporary folder. The system releases it when its
    holder's process ends, however it ends, so a replica killed while loading never leaves it held. Has what
    ``worker.loading_turn`` takes of a lock (``acquire(timeout=)``, ``release()``)."""

    POLL_SECONDS = 0.2

    def __init__(self, key: str, folder: Path | None = None):
        self.path = (folder or Path(tempfile.gettempdir())) / f"qwen-image-server-load-{key}.lock"
        self._fd: int | None = None
        self.unavailable = False  # the file cannot be opened or locked here: no turns (``loading_turn`` says so)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # a temporary folder this process may not write: no turns, rather than no start
            return self._unavailable(exc)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(self.POLL_SECONDS)
                continue
            except OSError as exc:  # a file system without flock
                os.close(fd)
                return self._unavailable(exc)
            self._fd = fd
            return True

    def _unavailable(self, exc: OSError) -> bool:
        self.unavailable = True
        log.warning("the GPU's load lock %s cannot be used (%s); loading without waiting for a turn", self.path, exc)
        return False

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def gpu_load_lock(device: str) -> GpuFileLock | None:
    """The load lock of the CUDA ``device`` this process uses, shared with every process of this machine on the same
    GPU (whatever index each sees it under); None for other devices."""
    if not device.startswith("cuda"):
        return None
    import torch

    return GpuFileLock(str(torch.cuda.get_device_properties(torch.device(device)).uuid))
