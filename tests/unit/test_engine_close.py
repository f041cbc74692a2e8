"""What the embedded engine answers for work it still holds when it stops."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from qwen_image_server.config import Settings
from qwen_image_server.engine.model_pool import ModelPool
from qwen_image_server.errors import ShuttingDown
from qwen_image_server.jobs import Job
from qwen_image_server.models.spec import ModelSpec


def test_work_queued_at_close_fails_as_shutting_down_not_as_a_broken_model():
    async def run() -> BaseException:
        spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
        pool = ModelPool(spec, Settings(), devices=[], threads=1, task_ids=itertools.count(), spawn=False)
        job = asyncio.ensure_future(pool.submit(Job(mode="generate", prompt="p", seeds=[1]), time.monotonic() + 30))
        await asyncio.sleep(0)  # queued: no worker takes it
        assert len(pool.pending) == 1
        await pool.close(timeout=0.1)
        with pytest.raises(ShuttingDown) as stopped:
            await job
        return stopped.value

    error = asyncio.run(run())
    assert (error.status_code, error.code, error.headers) == (503, "shutting_down", {"Retry-After": "5"})
