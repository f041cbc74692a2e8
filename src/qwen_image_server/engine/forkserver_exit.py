"""The first module a worker forkserver imports (``FORKSERVER_PRELOAD``): it makes the forkserver leave without
Python's interpreter teardown, and leaves SIGINT and SIGTERM to the server.

The forkserver is the server's, as its workers are: it exits when the API process is gone.
SIGINT and SIGTERM sent to the whole process group (Ctrl-C in a terminal, systemd's default
stop) reached it while it imported its preload, before ``multiprocessing`` ignores SIGINT
there: it died, with a ``KeyboardInterrupt`` traceback for Ctrl-C, and the API process,
starting its workers, failed its start-up with an ``EOFError`` traceback (exit 3 instead of
130 or 143). It ignores both from its first import on, and what it forks inherits that (the
workers ignore them anyway: ``worker.worker_main``).

A forkserver exits when the process that started it (the API process) is gone. Tearing
down its modules (torch, diffusers, transformers) then costs about a second of CPU
(0.8-1.1 s on a 2-core machine) after the server has already stopped: work for nothing,
since the forkserver holds no files, buffers or devices of its own (its workers are
processes of their own and never depend on it after the fork). Imported while the
forkserver preloads, this module registers one ``atexit`` handler that flushes the
standard streams and logging, then ends the process with ``os._exit(0)``. Registered
before anything else of the preload, it runs after every handler that torch, diffusers
or transformers register (``atexit`` runs the last registered first): only module
teardown and the final garbage collection are skipped.

Imported anywhere else (a worker started by ``spawn``, a test, the type checker) it does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from multiprocessing import forkserver
from types import FrameType


def in_forkserver_preload() -> bool:
    """Whether this is a forkserver importing its preload: ``multiprocessing.forkserver.main`` is on the stack."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


def leave_without_teardown(forkserver_pid: int) -> None:
    """In the forkserver itself: flush what may hold output, then end the process at once (status 0: the
    forkserver's normal exit). A process forked from it inherits the handler and is left alone: its own exit
    status and teardown are its business (the workers leave through ``os._exit`` anyway)."""
    if os.getpid() != forkserver_pid:
        return
    exit_now(0)


def exit_now(status: int) -> None:
    """End this process at once with ``status``, without the interpreter's teardown of its modules: logging and the
    standard streams are flushed first (the atexit handlers are the caller's to run or not). Also the end of a
    pytest-xdist worker (tests/suite_split.py)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(status)


if in_forkserver_preload():
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, signal.SIG_IGN)
    atexit.register(leave_without_teardown, os.getpid())
