"""What both engines do with a job's pieces: cut a job for the workers and wait for the pieces with one deadline.

The embedded engine (``local.py``) and the Ray engine (``ray_serve.py``) differ in
where pieces run (worker processes, Ray replicas); how a job is split and how its
pieces are awaited is the same, and lives here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from ..errors import TaskTimeout
from ..jobs import Job

T = TypeVar("T")


def split_for(job: Job, workers: int, max_batch_size: int) -> tuple[int, list[Job]]:
    """The job's images spread over ``workers``, never more than ``max_batch_size`` per piece.

    Returns the piece size (piece ``i`` starts at image ``i * size`` of the job) and the pieces.
    """
    size = max(1, min(max_batch_size, math.ceil(job.n / max(1, workers))))
    return size, job.split(size)


async def wait_all(pieces: Sequence[Awaitable[T]], deadline: float) -> list[T]:
    """The pieces' results in order; the first piece's error as soon as it fails; ``TaskTimeout`` at ``deadline``
    (a ``time.monotonic()`` value). The caller cancels what is left when this raises."""
    futures = [asyncio.ensure_future(piece) for piece in pieces]
    done, not_done = await asyncio.wait(
        futures, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_EXCEPTION
    )
    if not_done:
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is None:
            raise TaskTimeout()
        raise failed.exception()  # type: ignore[misc]  # not None: found above
    return [f.result() for f in futures]
