"""A burst of large edit-plus uploads keeps the API process's memory bounded.

4 requests at once, then 10 more, each of 4 PNGs of ~60 kB that decode to 4096x4096,
against one worker with a queue of one. Before admission control and input shrinking
this took the API process from ~325 MiB to over 1 GiB. The test reports the API
process's RSS before, at its peak and after (run with ``-s`` to see it), and asserts
a generous bound on the growth, not timings.
"""

from __future__ import annotations

import io
import threading
import time

import psutil
import pytest
from PIL import Image

from conftest import InFlight, concurrently

pytestmark = pytest.mark.e2e

EDITS = "/v1/images/edits"
MIB = 2**20


def _big_png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), color).save(buffer, format="PNG")
    return buffer.getvalue()


class PeakRss:
    """Samples a process's RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def burst_server(start_server, tiny_edit_plus):
    return start_server(
        "--model", f"plus={tiny_edit_plus}", "--workers", "1",
        env={"TASK_QUEUE_SIZE": "1", "QIS_CPU_THREADS": "1", "QIS_MAX_STEPS": "1000", "QIS_MAX_CONCURRENT_DECODES": "2"},
    )  # fmt: skip


def test_a_burst_of_large_uploads_keeps_the_api_process_bounded(burst_server):
    server = burst_server
    uploads = [_big_png((40 * i, 90, 200)) for i in range(4)]
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(uploads)]
    form = {"model": "plus", "prompt": "burst", "size": "256x256", "num_inference_steps": "1000"}

    def send():
        return server.http.post(EDITS, files=files, data=form, timeout=120).status_code

    def answered(request: InFlight):
        return request.box["response"].status_code if "response" in request.box else None

    api = psutil.Process(server.process.pid)
    before = api.memory_info().rss
    with PeakRss(server.process.pid) as rss:
        first = [InFlight(server.base_url + EDITS, timeout=300, files=files, data=form) for _ in range(4)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            model = server.status()["models"]["plus"]
            refused = [answered(request) for request in first if answered(request) is not None]
            if model["workers"][0]["state"] == "busy" and model["queued_jobs"] == 1 and len(refused) == 2:
                break
            time.sleep(0.1)
        held = server.status()["models"]["plus"]["held_pixel_bytes"]
        more = concurrently(*[send] * 10)
        box = [answered(request) or "running" for request in first]
        for request in first:  # the long jobs: their clients go away, which cancels them
            request.cancel()
    after = api.memory_info().rss
    print(
        f"\nAPI process RSS: before {before / MIB:.0f} MiB, peak {rss.peak / MIB:.0f} MiB, after {after / MIB:.0f} MiB; "
        f"held input pixels {held / MIB:.1f} MiB; first 4: {box}; next 10: {more}"
    )
    assert more == [503] * 10, "the queue is full: refused before decoding"
    assert sorted(map(str, box)) == ["503", "503", "running", "running"], "one runs, one waits, two are refused"
    # Two jobs held, each of 4 inputs shrunk to at most 2 x 65536 pixels (the tiny model's edit area), RGB.
    assert 0 < held <= 2 * 4 * 2 * 65536 * 3
    assert rss.peak - before < 300 * MIB
