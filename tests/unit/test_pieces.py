"""How both engines cut a job for their workers and wait for its pieces."""

from __future__ import annotations

import asyncio
import time

import pytest

from qwen_image_server.engine.pieces import split_for, wait_all
from qwen_image_server.errors import InferenceFailed, TaskTimeout
from qwen_image_server.jobs import Job


@pytest.mark.parametrize(
    ("n", "workers", "max_batch", "sizes"),
    [(1, 2, 1, [1]), (4, 2, 1, [1, 1, 1, 1]), (4, 2, 4, [2, 2]), (5, 2, 4, [3, 2]), (10, 1, 4, [4, 4, 2]), (3, 8, 10, [1, 1, 1])],
)
def test_a_job_is_spread_over_the_workers_within_the_batch_limit(n, workers, max_batch, sizes):
    job = Job(mode="generate", prompt="p", seeds=list(range(100, 100 + n)))
    size, pieces = split_for(job, workers, max_batch)
    assert [p.n for p in pieces] == sizes
    assert [p.seeds[0] for p in pieces] == [100 + i * size for i in range(len(pieces))], "piece i starts at image i*size"
    assert [s for p in pieces for s in p.seeds] == job.seeds


def test_wait_all_gives_results_in_order():
    async def piece(value, delay):
        await asyncio.sleep(delay)
        return value

    assert asyncio.run(wait_all([piece("a", 0.02), piece("b", 0)], time.monotonic() + 5)) == ["a", "b"]


def test_wait_all_raises_the_first_failure_without_waiting_for_the_rest():
    async def run():
        slow = asyncio.get_running_loop().create_future()  # never finishes

        async def fails():
            raise InferenceFailed("boom")

        with pytest.raises(InferenceFailed, match="boom"):
            await wait_all([slow, fails()], time.monotonic() + 30)
        assert not slow.done()

    asyncio.run(run())


def test_wait_all_times_out_at_the_deadline():
    async def run():
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(TaskTimeout):
            await wait_all([never], time.monotonic() + 0.05)

    asyncio.run(run())
