"""A worker forkserver leaves without the interpreter's teardown (engine/forkserver_exit.py): its atexit handlers
still run, the teardown of its modules does not. Elsewhere the module changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from qwen_image_server.engine import forkserver_exit
from qwen_image_server.engine.worker_process import FORKSERVER_PRELOAD

# A module for the forkserver's preload: an atexit handler and an object whose __del__ runs only when the
# interpreter tears its modules down. Each leaves a file.
PROBE = """
import atexit, os

FOLDER = os.environ["PROBE_FOLDER"]
atexit.register(lambda: open(os.path.join(FOLDER, "atexit"), "w").close())


class Teardown:
    def __del__(self, write=os.write, fd=os.open(os.path.join(FOLDER, "teardown"), os.O_WRONLY | os.O_CREAT)):
        write(fd, b"ran")


probe = Teardown()
"""

# The parent: a forkserver with the given preload, one process forked from it, then the parent exits (as the API
# process does), which ends the forkserver. It prints the forkserver's pid.
PARENT = """
import multiprocessing, sys
from multiprocessing import forkserver

if __name__ == "__main__":
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(sys.argv[1].split(","))
    process = ctx.Process(target=print, args=("forked",))
    process.start()
    process.join()
    print(forkserver._forkserver._forkserver_pid, flush=True)
"""


def _with_probe(tmp_path: Path, *command: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``command`` run in ``tmp_path`` beside the probe module; its result and the folder the probe writes to."""
    (tmp_path / "teardown_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, *command],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**_env(), "PROBE_FOLDER": str(out)},
    )  # fmt: skip
    return done, out


def _run(tmp_path: Path, preload: list[str]) -> set[str]:
    """Start and end a forkserver with ``preload`` (after the probe's folder is on its path); the probe's files."""
    (tmp_path / "parent.py").write_text(PARENT)
    done, out = _with_probe(tmp_path, str(tmp_path / "parent.py"), ",".join(preload))
    assert done.returncode == 0 and done.stdout.startswith("forked"), done.stdout + done.stderr
    pid = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the forkserver outlived its parent"
        time.sleep(0.02)
    return {path.name for path in out.iterdir() if path.name == "atexit" or path.read_bytes() == b"ran"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def test_a_forkserver_with_it_runs_atexit_handlers_and_skips_the_teardown(tmp_path):
    assert _run(tmp_path, ["qwen_image_server.engine.forkserver_exit", "teardown_probe"]) == {"atexit"}


def test_a_forkserver_without_it_tears_its_modules_down(tmp_path):
    """The probe sees a teardown where there is one (what the test above would see had the module not worked)."""
    assert _run(tmp_path, ["teardown_probe"]) == {"atexit", "teardown"}


def test_it_is_the_first_module_of_the_workers_preload():
    """First, so that the atexit handlers of everything preloaded after it (torch's...) run before it ends the process."""
    assert FORKSERVER_PRELOAD[0] == "qwen_image_server.engine.forkserver_exit"


def test_imported_elsewhere_it_changes_nothing(tmp_path):
    assert not forkserver_exit.in_forkserver_preload()
    done, out = _with_probe(tmp_path, "-c", "import qwen_image_server.engine.forkserver_exit, teardown_probe")
    assert done.returncode == 0, done.stderr
    assert (out / "teardown").read_bytes() == b"ran" and (out / "atexit").exists()


def test_a_process_forked_from_the_forkserver_keeps_its_own_exit():
    """The handler is inherited by what the forkserver forks; there it does nothing (here: another pid's handler)."""
    code = (
        "import os, sys; from qwen_image_server.engine.forkserver_exit import leave_without_teardown\n"
        "leave_without_teardown(os.getpid() + 1); print('went on'); sys.exit(3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert (done.returncode, done.stdout.strip()) == (3, "went on"), done.stderr
    own = subprocess.run(
        [sys.executable, "-c", code.replace("os.getpid() + 1", "os.getpid()")],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert (own.returncode, own.stdout.strip()) == (0, ""), own.stderr
