"""The engine's promises, observed over HTTP: parallel workers, a responsive API,
bounded queues, timeouts, cancellation on disconnect, and surviving dead workers.

Assertions are about behaviour (which requests overlapped, which succeeded),
never about how fast anything was.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import time

import httpx
from PIL import Image

from conftest import LIMITED, post_in_thread

GEN = "/v1/images/generations"
# Long enough to still be running when the tests act on it (half a minute or more on 2 cores; servers allow 1000
# steps), made of short steps (tens of milliseconds at 512x512, ten times less than at 1024x1024): a task told to stop
# ends at its next step's end, which the tests after it wait for.
LONG = {"prompt": "a long job", "size": "512x512", "num_inference_steps": 1000, "seed": 1}
SHORT = {"prompt": "a short job", "size": "256x256", "num_inference_steps": 2, "seed": 2}


def _wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _busy_workers(server, model: str) -> int:
    return sum(w["state"] == "busy" for w in server.status()["models"][model]["workers"])


def _interval(response: httpx.Response) -> tuple[float, float]:
    return float(response.headers["x-run-start"]), float(response.headers["x-run-end"])


def test_two_requests_run_at_the_same_time_and_health_answers_meanwhile(server):
    body = {"prompt": "concurrency", "size": "512x512", "num_inference_steps": 40}
    threads = [post_in_thread(server.base_url + GEN, {**body, "seed": s}) for s in (1, 2)]
    _wait_for(lambda: _busy_workers(server, "qwen-image-tiny") == 2, what="both workers busy")
    health = httpx.get(server.base_url + "/healthz", timeout=5)
    answered_at = time.time()
    still_running = [t.is_alive() for t, _ in threads]
    for thread, _ in threads:
        thread.join()
    responses = [box["response"] for _, box in threads]
    assert [r.status_code for r in responses] == [200, 200]
    assert health.json() == {"status": "ok", "model": "qwen-image-tiny"}
    assert any(still_running), "healthz should answer while generations are running"
    (a_start, a_end), (b_start, b_end) = (_interval(r) for r in responses)
    assert a_start < b_end and b_start < a_end, "the two requests should have run at the same time"
    assert responses[0].headers["x-workers"] != responses[1].headers["x-workers"]
    assert any(a_start <= answered_at <= a_end for a_start, a_end in map(_interval, responses))


def test_n_images_are_spread_over_idle_workers(server):
    r = httpx.post(server.base_url + GEN, json={**SHORT, "n": 2}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert sorted(r.headers["x-workers"].split(",")) == ["qwen-image-tiny#0", "qwen-image-tiny#1"]
    assert [d["seed"] for d in r.json()["data"]] == [2, 3]


def test_killed_worker_fails_its_task_with_500_and_is_replaced(server):
    model = "qwen-image-edit-plus-tiny"  # has its own 2 workers; no other test waits on them
    old_pids = server.worker_pids(model)
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 10)).save(buf, format="PNG")
    image_b64 = base64.b64encode(buf.getvalue()).decode()
    long_edit = {
        "model": model,
        "prompt": "long edit",
        "image": image_b64,
        "size": "512x512",
        "num_inference_steps": 1000,
        "n": 2,
    }
    thread, box = post_in_thread(server.base_url + "/v1/images/edits", long_edit)  # one image on each worker
    _wait_for(lambda: _busy_workers(server, model) == 2, what="both edit-plus workers busy")
    os.kill(old_pids[0], signal.SIGKILL)
    thread.join(timeout=300)
    response = box["response"]
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["message"].startswith("Inference failed: worker process exited unexpectedly")
    assert body["detail"] == body["error"]["message"]
    assert body["error"]["type"] == "server_error"
    # The surviving worker's half of the job was stopped, and the dead worker is replaced.
    # (the model stays ready meanwhile, on its other worker: wait for both to be idle)
    workers = lambda: server.status()["models"][model]["workers"]  # noqa: E731
    _wait_for(lambda: [w["state"] for w in workers()] == ["idle", "idle"], timeout=120, what="replacement worker ready")
    new_pids = server.worker_pids(model)
    assert old_pids[0] not in new_pids and old_pids[1] in new_pids
    ok = httpx.post(
        server.base_url + "/v1/images/edits", json={**long_edit, "size": "256x256", "num_inference_steps": 2}, timeout=300
    )
    assert ok.status_code == 200, ok.text[:300]
    assert len(ok.json()["data"]) == 2


# The tests below use the shared server's LIMITED model: one worker, a queue of one waiting request, a 5 s task
# timeout and a stuck worker killed 3 s after its task was told to stop, all its own (--queue-size 1@tiny-limits...);
# the server's other models keep the defaults. One torch thread: a long task that runs until its timeout or a cut
# then burns one core, not both.
LIMITED_LONG, LIMITED_SHORT = {**LONG, "model": LIMITED}, {**SHORT, "model": LIMITED}


def _wait_idle(server) -> None:
    _wait_for(
        lambda: (s := server.status()["models"][LIMITED])["queued_jobs"] == 0 and s["workers"][0]["state"] == "idle",
        what="worker idle and queue empty",
    )


def test_the_limited_model_reports_its_own_limits_and_the_others_the_defaults(server):
    models = server.status()["models"]
    assert (models[LIMITED]["queue_size"], models[LIMITED]["task_timeout"]) == (1, 5.0)
    assert (models["qwen-image-tiny"]["queue_size"], models["qwen-image-tiny"]["task_timeout"]) == (32, 600.0)


def test_timeout_stops_the_running_task_and_frees_its_worker(server):
    _wait_idle(server)
    r = httpx.post(server.base_url + GEN, json=LIMITED_LONG, timeout=300)
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"  # the same job would time out again
    assert r.json()["error"]["message"] == "Task timeout" == r.json()["detail"]
    # Had the long task kept running (minutes), this one could not finish within its own 5 s timeout.
    ok = httpx.post(server.base_url + GEN, json=LIMITED_SHORT, timeout=300)
    assert ok.status_code == 200, ok.text[:300]


def test_client_disconnect_stops_running_and_drops_queued_work(server):
    _wait_idle(server)
    running, _ = post_in_thread(server.base_url + GEN, LIMITED_LONG, timeout=2.5)
    _wait_for(lambda: _busy_workers(server, LIMITED) == 1, what="long task running")
    queued, _ = post_in_thread(server.base_url + GEN, {**LIMITED_LONG, "seed": 5}, timeout=2.5)
    running.join()
    queued.join()
    _wait_idle(server)
    ok = httpx.post(server.base_url + GEN, json=LIMITED_SHORT, timeout=300)
    assert ok.status_code == 200, ok.text[:300]


def test_full_queue_is_refused_at_once_with_503(server):
    _wait_idle(server)
    running, _ = post_in_thread(server.base_url + GEN, LIMITED_LONG, timeout=60)
    _wait_for(lambda: _busy_workers(server, LIMITED) == 1, what="long task running")
    queued, _ = post_in_thread(server.base_url + GEN, {**LIMITED_LONG, "seed": 5}, timeout=60)
    _wait_for(lambda: server.status()["models"][LIMITED]["queued_jobs"] == 1, what="one request queued")
    refused = httpx.post(server.base_url + GEN, json=LIMITED_SHORT, timeout=30)
    assert refused.status_code == 503
    body = refused.json()
    assert body["error"]["message"] == "Task queue is full" == body["detail"]
    # about when its next job ends: its jobs' run time over its one worker, which a job's 5 s timeout bounds
    assert 1 <= int(refused.headers["retry-after"]) <= 5, refused.headers["retry-after"]
    # The queue is the model's own: the server's other models still take requests.
    other = httpx.post(server.base_url + GEN, json={**SHORT, "model": "qwen-image-tiny"}, timeout=300)
    assert other.status_code == 200, other.text[:300]
    queued.cancel()
    running.cancel()
    _wait_idle(server)


def test_a_worker_stuck_in_its_task_is_killed_and_replaced(server):
    """A worker that cannot stop its task (frozen here with SIGSTOP, as one stuck in a call that never returns) is
    killed the model's --stuck-task-seconds after the task was told to stop; a new worker serves its next requests."""
    _wait_idle(server)
    before = server.status()["models"][LIMITED]
    (pid,) = [w["pid"] for w in before["workers"]]
    running, _ = post_in_thread(server.base_url + GEN, LIMITED_LONG, timeout=60)
    _wait_for(lambda: _busy_workers(server, LIMITED) == 1, what="long task running")
    os.kill(pid, signal.SIGSTOP)
    try:
        running.cancel()  # the client goes: the task is told to stop, which the frozen worker cannot do
        _wait_for(
            lambda: server.status()["models"][LIMITED]["worker_restarts"] == before["worker_restarts"] + 1,
            what="the stuck worker killed",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    _wait_idle(server)
    assert server.worker_pids(LIMITED) != [pid]
    ok = httpx.post(server.base_url + GEN, json=LIMITED_SHORT, timeout=300)
    assert ok.status_code == 200, ok.text[:300]
    assert "after it was told to stop; killing it" in server.logs(None)
