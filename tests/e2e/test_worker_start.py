"""How worker processes start: CPU workers fork from a forkserver that has imported torch and diffusers
(``QIS_WORKER_START``), GPU workers are spawned unless told otherwise."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from qwen_image_server.engine.worker_process import FORKSERVER_PRELOAD, start_context, start_forkserver_early, start_method
from qwen_image_server.models import machine

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("setting", "device", "method"),
    [
        ("auto", "cpu", "forkserver"),
        ("auto", "cuda:0", "spawn"),
        ("auto", "cuda", "spawn"),
        ("spawn", "cpu", "spawn"),
        ("forkserver", "cuda:1", "forkserver"),
    ],
)
def test_start_method(setting, device, method):
    assert start_method(setting, device) == method


@pytest.mark.parametrize(
    ("setting", "device", "driver", "early"),
    [
        ("auto", "cpu", True, True),
        ("auto", "auto", False, True),  # no NVIDIA driver: the workers will be CPU workers
        ("auto", "auto", True, False),  # a GPU may be there: decided once torch is imported
        ("auto", "cuda:0", False, False),
        ("spawn", "cpu", False, False),
        ("forkserver", "cuda:0", True, True),
    ],
)
def test_the_forkserver_starts_before_the_api_imports_only_for_cpu_workers(monkeypatch, setting, device, driver, early):
    from multiprocessing import forkserver

    started = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(True))
    monkeypatch.setattr(machine, "no_gpu_driver", lambda: not driver)
    assert start_forkserver_early(setting, device) is early
    assert started == ([True] if early else [])


def _report(conn, device: str) -> None:
    """In the child: which preloaded modules it found already imported, and a small computation on ``device``."""
    found = [name for name in FORKSERVER_PRELOAD if name in sys.modules]
    import torch

    x = torch.ones(64, 64, device=device)
    conn.send((found, float((x @ x).sum())))
    conn.close()


def _run_child(method_setting: str, device: str):
    ctx = start_context(method_setting, device)
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_report, args=(child, device), daemon=True)
    process.start()
    child.close()
    assert parent.poll(120), "the child never answered"
    found, total = parent.recv()
    process.join(30)
    return found, total, process.exitcode


def test_a_forked_cpu_worker_starts_with_torch_and_diffusers_imported():
    found, total, exitcode = _run_child("forkserver", "cpu")
    assert set(found) == set(FORKSERVER_PRELOAD)  # imported once in the forkserver, not again in the worker
    assert total == 64 * 64 * 64 and exitcode == 0
    # SIGINT and SIGTERM are the server's: sent to the process group (Ctrl-C, systemd's stop) while the forkserver
    # imported its preload, they killed it, and the API process's start-up failed with a traceback (exit 3).
    from multiprocessing import forkserver

    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored >> (signal.SIGINT - 1) & 1 and ignored >> (signal.SIGTERM - 1) & 1, hex(ignored)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_forked_gpu_worker_can_use_cuda():
    """Whether GPU workers could fork too (``QIS_WORKER_START=forkserver``): nothing in the preload may have
    touched the CUDA driver in the forkserver."""
    found, total, exitcode = _run_child("forkserver", "cuda:0")
    assert set(found) == set(FORKSERVER_PRELOAD) and total == 64 * 64 * 64 and exitcode == 0


def _wait_for_the_pipe(conn) -> None:
    """In the child: hold its end of the pipe until killed (a worker waiting for its next task)."""
    conn.recv()


def test_a_worker_outlives_its_forkserver_and_is_still_seen_alive_and_killed(tmp_path):
    """``WorkerProcess.alive``/``kill`` go by the worker's pipe and pid: once its forkserver is gone, the process's own
    ``is_alive()`` says it ended (255) and its ``kill()`` sends nothing, while it runs on."""
    import multiprocessing
    import os
    import threading
    import time
    from multiprocessing import forkserver

    from qwen_image_server.engine.worker_process import WorkerProcess

    ctx = multiprocessing.get_context("forkserver")
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=_wait_for_the_pipe, args=(child_conn,), daemon=True)
    process.start()
    child_conn.close()
    worker = WorkerProcess.__new__(WorkerProcess)  # its process and pipe only: no model, no pool
    worker.process, worker.conn, worker._ended = process, conn, threading.Event()

    def read() -> None:  # what WorkerProcess._read does with the pipe's end
        try:
            conn.recv()
        except (EOFError, OSError):
            worker._ended.set()

    threading.Thread(target=read, daemon=True).start()
    os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process.is_alive() and process.exitcode == 255  # what the forkserver's end says
    assert worker.alive() and Path(f"/proc/{process.pid}").exists()
    worker.kill()
    assert worker._ended.wait(10) and not worker.alive()
