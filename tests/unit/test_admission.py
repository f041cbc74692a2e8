"""Admission before work and bounded upload memory: the pure parts (shrinking, the pixel budget, the decode gate)."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading

import numpy as np
import pytest
from PIL import Image

from qwen_image_server.config import Settings
from qwen_image_server.engine.admission import PixelBudget, job_bytes
from qwen_image_server.errors import InvalidImage, NotReady, QueueFull
from qwen_image_server.images import full_size_inpaint
from qwen_image_server.jobs import Job
from qwen_image_server.serving.inputs import DecodeGate, Upload, decode_inputs, fit_area, shrink_mask


def _png(size, color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size, limit", [((4096, 4096), 2 * 1024 * 1024), ((4000, 1000), 500_000), ((333, 777), 10_000)])
def test_fit_area_shrinks_to_the_limit_keeping_the_aspect(size, limit):
    w, h = fit_area(*size, limit)
    assert w * h <= limit
    assert abs(w / h - size[0] / size[1]) < 0.02 * size[0] / size[1]
    assert w * h > 0.95 * limit


def test_fit_area_never_enlarges():
    assert fit_area(300, 200, 10**6) == (300, 200)


def test_shrunk_mask_keeps_a_one_pixel_stroke():
    mask = np.zeros((1000, 1000), np.uint8)
    mask[500, :] = 255
    small = shrink_mask(mask, (100, 100))
    assert small.shape == (100, 100)
    assert set(np.unique(small)) == {0, 255}
    assert small[50].all() and not small[:49].any() and not small[52:].any()


def test_large_inputs_are_shrunk_small_ones_kept():
    big = Upload(_png((1200, 800)), "image[]")
    small = Upload(_png((100, 50)), "image[]")
    decoded = decode_inputs([big, small], None, 4096 * 4096, keep_pixels=120_000)
    (h1, w1, c1), (h2, w2, _) = decoded.arrays[0].shape, decoded.arrays[1].shape
    assert c1 == 3 and w1 * h1 <= 120_000 and abs(w1 / h1 - 1.5) < 0.02
    assert (w2, h2) == (100, 50)
    assert tuple(decoded.arrays[0][0, 0]) == (200, 30, 30)
    assert decoded.mask is None and decoded.inpaint_source is None


def test_transparent_inputs_still_become_white_when_shrunk():
    decoded = decode_inputs([Upload(_png((800, 800), (0, 0, 0, 0), "RGBA"), "image")], None, 10**8, keep_pixels=10_000)
    assert (decoded.arrays[0] == 255).all()


def test_a_colour_keyed_transparent_input_becomes_white_when_shrunk():
    buffer = io.BytesIO()
    Image.new("RGB", (800, 800), (0, 0, 0)).save(buffer, format="PNG", transparency=(0, 0, 0))  # tRNS: all transparent
    decoded = decode_inputs([Upload(buffer.getvalue(), "image")], None, 10**8, keep_pixels=10_000)
    assert decoded.arrays[0].shape[0] * decoded.arrays[0].shape[1] <= 10_000 and (decoded.arrays[0] == 255).all()


def test_a_shrunk_mask_edit_keeps_its_uploads_for_the_full_size_paste():
    image = Image.new("RGB", (900, 600), (10, 120, 10))
    image.paste((250, 250, 0), (0, 0, 450, 600))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    mask = Image.new("RGBA", (900, 600), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (100, 100, 300, 200))  # transparent: edit here
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    uploads = [Upload(buffer.getvalue(), "image")], Upload(mask_buffer.getvalue(), "mask")
    decoded = decode_inputs(*uploads, 10**8, keep_pixels=60_000)
    assert decoded.arrays[0].shape[:2] == decoded.mask.shape
    assert decoded.mask.size <= 60_000 and decoded.mask.any()
    assert decoded.inpaint_source == (uploads[0][0].data, uploads[1].data)
    original, full_mask = full_size_inpaint(decoded.inpaint_source)
    assert original.size == full_mask.size == (900, 600)
    assert np.array_equal(np.asarray(original), np.asarray(image))
    assert np.asarray(full_mask)[150, 200] == 255 and np.asarray(full_mask)[10, 10] == 0
    unshrunk = decode_inputs(*uploads, 10**8, keep_pixels=10**6)
    assert unshrunk.inpaint_source is None and unshrunk.mask.shape == (600, 900)


def test_mask_of_another_size_is_judged_on_the_uploaded_sizes():
    with pytest.raises(InvalidImage, match="mask is 90x60 but the image is 900x600"):
        decode_inputs([Upload(_png((900, 600)), "image")], Upload(_png((90, 60), 255, "L"), "mask"), 10**8, keep_pixels=5_000)


def test_pixel_budget_refuses_what_does_not_fit_and_frees_on_exit():
    budget = PixelBudget(Settings(max_queued_pixel_bytes=1000), "m")
    job = Job(mode="edit", prompt="p", seeds=[1], images=[np.zeros((10, 20, 3), np.uint8)])  # 600 bytes
    assert job_bytes(job) == 600
    with budget.hold(job):
        assert budget.held == 600
        budget.check()  # room left: admitted
        with pytest.raises(QueueFull) as refused, budget.hold(job):
            pass
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert budget.held == 600
    assert budget.held == 0
    huge = Job(mode="edit", prompt="p", seeds=[1], images=[np.zeros((100, 100, 3), np.uint8)])
    # alone, a job larger than the cap still runs; then nothing more is admitted
    with budget.hold(huge), pytest.raises(QueueFull):
        budget.check()
    assert budget.held == 0


def test_pixel_budget_counts_masks_and_kept_uploads():
    job = Job(mode="inpaint", prompt="p", seeds=[1], images=[np.zeros((4, 5, 3), np.uint8)], mask=np.zeros((4, 5), np.uint8))
    job.inpaint_source = (b"x" * 7, b"y" * 3)
    assert job_bytes(job) == 60 + 20 + 10


def test_gate_refuses_before_decoding():
    calls = []

    def refuse():
        raise NotReady("model x is unavailable")

    async def main():
        gate = DecodeGate(2)
        with pytest.raises(NotReady):
            await gate.decode(refuse, lambda: calls.append("decoded"))

    asyncio.run(main())
    assert calls == []


def test_gate_bounds_concurrent_decodes_and_checks_admission_again_after_waiting():
    release = threading.Event()
    running = []
    most = [0]
    lock = threading.Lock()
    admitted = {"open": True}

    def work():
        with lock:
            running.append(1)
            most[0] = max(most[0], len(running))
        release.wait(10)
        with lock:
            running.pop()
        return "done"

    def admit():
        if not admitted["open"]:
            raise QueueFull()

    async def main():
        gate = DecodeGate(2)
        first = [asyncio.ensure_future(gate.decode(admit, work)) for _ in range(2)]
        while len(running) < 2:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(gate.decode(admit, work))  # admitted now, waits for a slot
        await asyncio.sleep(0.05)
        admitted["open"] = False  # the queue fills meanwhile
        first[0].cancel()  # a client goes away: its thread still runs, so its slot stays taken
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(running) == 2
        release.set()
        assert await first[1] == "done"
        with pytest.raises(QueueFull):
            await waiting

    asyncio.run(main())
    assert most[0] == 2


def test_ray_engine_admits_like_the_embedded_one():
    pytest.importorskip("ray")
    from qwen_image_server.engine.ray_serve import RayEngine
    from qwen_image_server.models.spec import resolve_model

    spec = resolve_model("random:Qwen/Qwen-Image")
    engine = RayEngine([spec], Settings(queue_size=2, workers=1, max_queued_pixel_bytes=100, engine="ray"), "app")
    engine.admit(spec.id)
    engine._in_flight[spec.id] = 3  # one running on the one replica, two waiting
    with pytest.raises(QueueFull):
        engine.admit(spec.id)
    engine._in_flight[spec.id] = 0
    engine._budgets[spec.id].held = 100
    with pytest.raises(QueueFull):
        engine.admit(spec.id)


def test_each_engine_bounds_a_model_by_its_own_queue_size_and_task_timeout():
    """``--queue-size N@MODEL`` and ``--task-timeout S@MODEL``: the embedded and the Ray engine refuse one model's
    request by its own queue, and tell the client to come back after a tenth of that model's timeout."""
    from qwen_image_server.engine.model_pool import ModelPool
    from qwen_image_server.models.spec import ModelSpec

    settings = Settings(queue_size=3, task_timeout=100, model_queue_size=["1@fast"], model_task_timeout=["20@fast"])
    fast, slow = (
        ModelSpec(id=i, source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image") for i in ("fast", "slow")
    )

    def refusals(admit, set_waiting) -> dict[str, tuple[int, int]]:
        """``(requests admitted before the first refusal, its Retry-After)`` per model."""
        out = {}
        for model in ("fast", "slow"):
            waiting = 0
            while True:
                try:
                    admit(model)
                except QueueFull as refused:
                    out[model] = (waiting, int(refused.headers["Retry-After"]))
                    break
                waiting += 1
                set_waiting(model, waiting)
        return out

    async def embedded() -> dict:
        pools = {
            spec.id: ModelPool(spec, settings, devices=[], threads=1, task_ids=itertools.count(), spawn=False)
            for spec in (fast, slow)
        }
        return refusals(lambda m: pools[m].admit(), lambda m, n: setattr(pools[m], "waiting_jobs", n))

    assert asyncio.run(embedded()) == {"fast": (1, 2), "slow": (3, 10)}
    pytest.importorskip("ray")
    from qwen_image_server.engine.ray_serve import RayEngine

    ray_engine = RayEngine([fast, slow], settings.model_copy(update={"engine": "ray", "workers": 1}), "app")
    # in flight: one running on the model's one replica, the rest waiting
    ray = refusals(ray_engine.admit, lambda m, n: ray_engine._in_flight.__setitem__(m, n))
    assert ray == {"fast": (2, 2), "slow": (4, 10)}


def test_retry_after_says_about_when_the_models_next_job_ends():
    """A refusal's Retry-After: a tenth of the task timeout before any job ended (at most 60 s, what OpenAI's SDKs
    wait at most), then the model's recent job time over its workers: 10 s jobs on two workers, 5 s. (A tenth of the
    timeout alone was 60 s by default, however short the jobs: the SDK waited a minute for a queue that cleared in
    seconds.)"""
    from qwen_image_server.engine.admission import RetryAfter

    workers = [2]
    retry = RetryAfter(Settings(task_timeout=600), "m", lambda: workers[0])
    assert retry() == 60
    assert RetryAfter(Settings(task_timeout=5), "m")() == 1 and RetryAfter(Settings(task_timeout=7200), "m")() == 60
    retry.observe(10.0)
    assert retry() == 5
    workers[0] = 1
    assert retry() == 10
    for _ in range(20):  # the jobs got short: the mean follows
        retry.observe(0.2)
    assert retry() == 1
    retry.observe(500.0)
    assert retry() == 60, "never past what the SDK waits"
    budget = PixelBudget(Settings(max_queued_pixel_bytes=1), "m", retry)
    job = Job(mode="edit", prompt="p", seeds=[1], images=[np.zeros((2, 2, 3), np.uint8)])
    with budget.hold(job), pytest.raises(QueueFull) as refused:
        budget.check()
    assert refused.value.headers["Retry-After"] == "60"  # a spent pixel budget frees as a job ends too


def test_a_full_queue_of_the_embedded_engine_tells_the_wait_its_jobs_take(monkeypatch):
    """The embedded engine's model pool times its jobs (first pipeline start to last end) for its refusals."""
    import asyncio
    import itertools
    import time

    from worker_fakes import FakeWorkerProcess

    from qwen_image_server.engine.model_pool import ModelPool
    from qwen_image_server.engine.worker import Computed, Done, Ready
    from qwen_image_server.jobs import TaskResult
    from qwen_image_server.models.spec import ModelSpec

    async def run() -> None:
        spec = ModelSpec(id="m", source="/nowhere", pipeline_class="QwenImagePipeline", kind="text-to-image")
        pool = ModelPool(
            spec, Settings(queue_size=1, task_timeout=600), devices=[], threads=1, task_ids=itertools.count(), spawn=False
        )
        workers = [FakeWorkerProcess(pool, slot, state="loading") for slot in range(2)]
        pool.workers.extend(workers)  # type: ignore[arg-type]
        for worker in workers:
            pool.on_message(worker, Ready({"device": "cpu"}))  # type: ignore[arg-type]

        async def job(seconds: float) -> None:
            submitted = asyncio.ensure_future(pool.submit(Job(mode="generate", prompt="p", seeds=[1]), time.monotonic() + 30))
            await asyncio.sleep(0.01)
            (worker,) = [worker for worker in workers if worker.running is not None]
            task_id = worker.running.task.task_id
            pool.on_message(worker, Computed(task_id))  # type: ignore[arg-type]
            pool.on_message(worker, Done(TaskResult(task_id, [], 100.0, 100.0 + seconds)))  # type: ignore[arg-type]
            await submitted

        def refusal() -> str:
            with pytest.raises(QueueFull) as refused:
                pool.admit()
            return refused.value.headers["Retry-After"]

        pool.waiting_jobs = 1  # a full queue
        assert refusal() == "60"  # no job has ended yet: a tenth of the task timeout
        pool.waiting_jobs = 0
        await job(12.0)
        pool.waiting_jobs = 1
        assert refusal() == "6"  # 12 s jobs on two workers

    asyncio.run(run())
