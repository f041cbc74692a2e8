"""What this machine has for the workers: its GPUs with their free memory, and its own (host) memory.

The GPUs come from a short-lived subprocess (``torch.cuda.mem_get_info`` per device), so the
API process holds no CUDA context; host memory from ``/proc/meminfo`` and the memory cgroup.
Both can be pretended for ``qwen-image-server plan`` (``QIS_FAKE_GPUS``, ``QIS_FAKE_HOST_MEMORY``).
No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .footprint import GIB
from .spec import ModelConfigError

log = logging.getLogger(__name__)

#: Testing and planning aid, read by ``qwen-image-server plan`` only: pretend these GPUs are there,
#: e.g. ``80GiB,24GiB`` (free = total) or ``70GiB/80GiB`` (free/total).
FAKE_GPUS_ENV = "QIS_FAKE_GPUS"
#: Testing and planning aid, read by ``qwen-image-server plan`` only: pretend the machine has this much memory
#: available, e.g. ``16GiB`` (available = total) or ``12GiB/16GiB`` (available/total).
FAKE_HOST_ENV = "QIS_FAKE_HOST_MEMORY"
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


@dataclass(frozen=True)
class Gpu:
    """One visible GPU; ``free``/``total`` in bytes, None when unknown (then nothing is checked)."""

    device: str
    name: str = ""
    free: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class HostMemory:
    """Bytes available now and in all, and where the figure comes from."""

    available: int
    total: int
    source: str


def discover_host_memory(root: Path = Path("/")) -> HostMemory | None:
    """This machine's available memory (Linux: ``/proc/meminfo``), or its container's when lower (cgroup v2 or
    v1, less the reclaimable file cache); None where it cannot be read (then nothing is checked). ``root``
    is for tests."""
    meminfo = _meminfo(root / "proc/meminfo")
    if meminfo is None:
        return None
    available, total = meminfo
    host = HostMemory(available, total, "MemAvailable in /proc/meminfo")
    limit = _cgroup_limit(root)
    if limit is not None and limit[0] - limit[1] < host.available:
        return HostMemory(max(0, limit[0] - limit[1]), min(total, limit[0]), "the container's memory limit (cgroup)")
    return host


def parse_fake_host(text: str) -> HostMemory:
    """``16GiB`` or ``12GiB/16GiB`` (available/total), for ``QIS_FAKE_HOST_MEMORY``."""
    available, _, total = text.partition("/")
    free = parse_bytes(available, FAKE_HOST_ENV)
    return HostMemory(
        free, _free_within(free, parse_bytes(total, FAKE_HOST_ENV) if total else free, FAKE_HOST_ENV, text), FAKE_HOST_ENV
    )


def _free_within(free: int, total: int, setting: str, text: str) -> int:
    """``total``, once checked to hold ``free`` (a pretended machine cannot have more free than it has)."""
    if free > total:
        raise ModelConfigError(f"{setting}: {text.strip()!r} has more free than in all (FREE/TOTAL)")
    return total


def _meminfo(path: Path) -> tuple[int, int] | None:
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        return _kib(fields["MemAvailable"]), _kib(fields["MemTotal"])
    except (OSError, KeyError, ValueError):
        return None


def _kib(value: str) -> int:
    return int(value.strip().split()[0]) * 1024


def _cgroup_limit(root: Path) -> tuple[int, int] | None:
    """(limit, usage less file cache) of this process's memory cgroup, None when it has no limit. The file cache
    (model files read earlier, say) is reclaimed before the cgroup runs out, so it does not count as used."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        base = root / "sys/fs/cgroup"
        if controllers == "":  # v2: one hierarchy
            found = _read_limit(base, path, "memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):  # v1
            found = _read_limit(base / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
        else:
            continue
        if found is not None:
            return found
    return None


def _read_limit(base: Path, path: str, limit_file: str, usage_file: str, cache_key: str) -> tuple[int, int] | None:
    # inside a container the process's cgroup is often mounted as the root of the hierarchy: try both
    for folder in (base / path.lstrip("/"), base):
        try:
            text = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if text == "max" or not text.isdigit() or int(text) >= _NO_LIMIT:
            return None
        stat = _stat(folder / "memory.stat")
        return int(text), max(0, usage - stat.get(cache_key, 0))
    return None


def _stat(path: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


# --- GPU discovery ------------------------------------------------------------------------------
_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "free": free, "total": total})
print(json.dumps(gpus))
"""


#: Files whose presence shows a GPU driver on Linux: NVIDIA's (its /proc folder where its kernel module runs; its control
#: device, also where a sandbox such as gVisor passes the GPU through without the /proc folder), ROCm's, and WSL2's GPU
#: device (no NVIDIA kernel module there: CUDA reaches the Windows driver through /dev/dxg, as under Docker Desktop).
GPU_DRIVER_PATHS = ("proc/driver/nvidia", "dev/nvidiactl", "dev/kfd", "dev/dxg")


def no_gpu_driver(root: Path = Path("/")) -> bool:
    """True when this is Linux without an NVIDIA, ROCm or WSL2 GPU driver: then no GPU can be visible (skips the
    probe)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return sys.platform.startswith("linux") and not any((root / path).exists() for path in GPU_DRIVER_PATHS)


def discover_gpus(timeout: float = 60.0) -> list[Gpu] | None:
    """The visible GPUs with their free and total memory, asked of a short-lived subprocess
    (it initialises CUDA, this process does not). None when the probe fails."""
    if no_gpu_driver():
        return []
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=True)
        return [Gpu(**item) for item in json.loads(done.stdout.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, TypeError) as exc:
        log.warning("could not probe the GPUs' memory (%s); placing without a memory check", exc)
        return None


def count_gpus_in_process() -> list[Gpu]:
    """The GPUs without their memory (when the probe failed): the device count only."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [Gpu(f"cuda:{i}") for i in range(count)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb|mib|mb|g|m)?\s*$", re.IGNORECASE)


def parse_bytes(text: str, setting: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise ModelConfigError(f"{setting}: {text!r} is not a size like 80GiB")
    unit = (match.group(2) or "gib").lower()
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}[unit]
    return int(float(match.group(1)) * scale)


def parse_fake_gpus(text: str) -> list[Gpu]:
    """``80GiB,24GiB`` or ``70GiB/80GiB,...`` (free/total) → GPUs ``cuda:0``, ``cuda:1``, ... (a planning aid)."""
    gpus = []
    if not any(part.strip() for part in text.split(",")):  # set, but to nothing: not "no GPU" by accident
        raise ModelConfigError(f"{FAKE_GPUS_ENV}: {text!r} lists no GPU (unset it to plan for this machine)")
    for i, item in enumerate(part for part in text.split(",") if part.strip()):
        free, _, total = item.partition("/")
        free_bytes = parse_bytes(free, FAKE_GPUS_ENV)
        total_bytes = _free_within(free_bytes, parse_bytes(total or free, FAKE_GPUS_ENV), FAKE_GPUS_ENV, item)
        gpus.append(Gpu(f"cuda:{i}", FAKE_GPUS_ENV, free_bytes, total_bytes))
    return gpus
