"""A real server with an API key and an output folder it cannot write, as a user meets them: ``/metrics`` needs the
key and a generation shows in its numbers (and its log lines carry its request id); url images that cannot be stored
fail clearly through the openai SDK while b64 images still work. One server for both: each starts in seconds."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

KEY = "sk-metrics-e2e"
MODEL = "qwen-image-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(start_server, tiny_t2i, tmp_path_factory):
    """The server, and the folder whose file blocks its output folder."""
    root = tmp_path_factory.mktemp("blocked")
    blocked = root / "a-file"
    blocked.write_text("not a folder")
    server = start_server(
        "--model", f"{MODEL}={tiny_t2i}", "--api-key", KEY,
        env={"IMAGE_OUTPUT_DIR": str(blocked / "images"), "QIS_CPU_THREADS": "1"},
    )  # fmt: skip
    return server, root


def _samples(text: str) -> dict:
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_metrics_need_a_key_and_count_a_generation(keyed):
    server, _ = keyed
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        before = _samples(http.get("/metrics", headers=AUTH).text)
        refused = http.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert before[("qis_model_state", (("model", MODEL), ("state", "ready")))] == 1

        response = http.post(
            "/v1/images/generations",
            json={"prompt": "a cat", "n": 2, "num_inference_steps": 2, "some_unknown_field": 1},  # logged as ignored
            headers={**AUTH, "X-Request-ID": "metrics-rid-7"},
        )
        assert response.status_code == 200, response.text[:300]
        stats = response.json()["stats"]
        after = _samples(http.get("/metrics", headers=AUTH).text)

    def grew(name: str, *labels: tuple[str, str]) -> float:  # what this test added (the other test may run first)
        key = (name, tuple(sorted((("model", MODEL), *labels))))
        return after[key] - before.get(key, 0)

    assert grew("qis_images_total") == 2
    for counter in ("transformer_calls", "cached_calls", "prompt_encodings", "prompt_cache_hits"):
        assert grew(f"qis_{counter}_total") == stats[counter]
    assert stats["transformer_calls"] == 2 * 2 * 2 and stats["prompt_encodings"] >= 1  # 2 images, 2 steps, true CFG
    logs = server.logs(tail=None)
    assert "[metrics-rid-7]: " in logs, "the server's log format shows each line's request id"
    access = [line for line in logs.splitlines() if "uvicorn.access" in line and "POST /v1/images/generations" in line]
    assert any("[metrics-rid-7]: " in line and line.endswith('" 200') for line in access), access
    assert "Loading pipeline components" not in logs and "Loading weights" not in logs, "no loading progress bars"
    assert after[("qis_queue_depth", (("model", MODEL),))] == 0
    assert (after[("qis_queue_size", (("model", MODEL),))], after[("qis_task_timeout_seconds", (("model", MODEL),))]) == (32, 600)
    assert after[("qis_running_tasks", (("model", MODEL),))] == 0
    assert after[("qis_worker_restarts_total", (("model", MODEL),))] == 0
    assert grew("qis_job_pipeline_seconds_count") == 1
    assert grew("qis_job_pipeline_seconds_sum") == pytest.approx(stats["pipeline_seconds"])
    assert grew("qis_job_encode_seconds_count") == 1
    assert stats["encode_seconds"] > 0  # the worker timed its encoding
    assert grew("qis_job_encode_seconds_sum") == pytest.approx(stats["encode_seconds"])
    generated = ("qis_requests_total", (("model", MODEL), ("route", "/v1/images/generations"), ("status", "200")))
    assert after[generated] - before.get(generated, 0) == 1
    refusals = ("qis_requests_total", (("model", "none"), ("route", "/metrics"), ("status", "401")))
    assert after[refusals] - before.get(refusals, 0) == 1


def test_url_images_that_cannot_be_stored_fail_clearly_and_b64_still_works(keyed):
    server, root = keyed
    assert "url responses will fail: Could not store the image for response_format=url (Not a directory: " in server.logs()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    fast = {"num_inference_steps": 2}
    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(model=MODEL, prompt="a lighthouse", response_format="url", extra_body=fast)
    error = failed.value.body
    assert error["code"] == "storage_failed" and str(root) not in str(failed.value.response.text)
    assert error["message"].startswith("Could not store the image for response_format=url (Not a directory)")
    image = client.images.generate(model=MODEL, prompt="a lighthouse", response_format="b64_json", extra_body=fast)
    assert image.data[0].b64_json


def test_load_bench_sends_its_key_and_says_when_the_server_wants_one(keyed, tmp_path):
    """bench/load.py against a server with keys: without one, or with a wrong one, it stops before any load (exit 2,
    saying why); with the key (from the environment here) every request is answered, none refused for the key."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    server, _ = keyed
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", server.base_url, "--workers", "1", "--queue-size", "1"]
    cmd += ["--burst-factor", "1", "--soak", "0", "--size", "256x256", "--json", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "QIS_BENCH_API_KEY"} | {"PYTHONPATH": str(REPO / "src")}

    def load(*extra: str, **more: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], env=env | more, capture_output=True, text=True, timeout=120)

    done = load()
    assert done.returncode == 2 and "needs an API key" in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = load("--api-key", "sk-wrong")
    assert done.returncode == 2 and "refused the API key" in done.stderr, done.stderr
    assert not out.exists()
    done = load(QIS_BENCH_API_KEY=KEY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    burst = json.loads(out.read_text())["burst"]
    assert burst["requests"] == 2 and burst["statuses"] == {"200": 2} and burst["lost"] == burst["wrong"] == 0, burst
