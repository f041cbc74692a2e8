"""/metrics on a real server with an API key: it needs the key, and a generation shows in its numbers (and its log lines carry its request id)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

KEY = "sk-metrics-e2e"
MODEL = "qwen-image-tiny"


def _samples(text: str) -> dict:
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_metrics_need_a_key_and_count_a_generation(start_server, tiny_t2i):
    server = start_server("--model", f"{MODEL}={tiny_t2i}", "--api-key", KEY, env={"QIS_CPU_THREADS": "1"})
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        before = _samples(http.get("/metrics", headers=auth).text)
        assert before[("qis_images_total", (("model", MODEL),))] == 0
        assert before[("qis_model_state", (("model", MODEL), ("state", "ready")))] == 1

        response = http.post(
            "/v1/images/generations",
            json={"prompt": "a cat", "n": 2, "num_inference_steps": 2, "some_unknown_field": 1},  # logged as ignored
            headers={**auth, "X-Request-ID": "metrics-rid-7"},
        )
        assert response.status_code == 200, response.text[:300]
        stats = response.json()["stats"]
        after = _samples(http.get("/metrics", headers=auth).text)

    assert after[("qis_images_total", (("model", MODEL),))] == 2
    assert before[("qis_prompt_encodings_total", (("model", MODEL),))] == 0
    for counter in ("transformer_calls", "cached_calls", "prompt_encodings", "prompt_cache_hits"):
        assert after[(f"qis_{counter}_total", (("model", MODEL),))] == stats[counter]
    assert stats["transformer_calls"] == 2 * 2 * 2 and stats["prompt_encodings"] >= 1  # 2 images, 2 steps, true CFG
    assert "[metrics-rid-7]: " in server.logs(tail=None), "the server's log format shows each line's request id"
    assert after[("qis_queue_depth", (("model", MODEL),))] == 0
    assert after[("qis_running_tasks", (("model", MODEL),))] == 0
    assert after[("qis_worker_restarts_total", (("model", MODEL),))] == 0
    assert after[("qis_job_pipeline_seconds_count", (("model", MODEL),))] == 1
    assert after[("qis_job_pipeline_seconds_sum", (("model", MODEL),))] == pytest.approx(stats["pipeline_seconds"])
    assert after[("qis_job_encode_seconds_count", (("model", MODEL),))] == 1
    assert stats["encode_seconds"] > 0  # the worker timed its encoding
    assert after[("qis_job_encode_seconds_sum", (("model", MODEL),))] == pytest.approx(stats["encode_seconds"])
    generated = ("qis_requests_total", (("model", MODEL), ("route", "/v1/images/generations"), ("status", "200")))
    assert after[generated] == 1
    assert after[("qis_requests_total", (("model", "none"), ("route", "/metrics"), ("status", "401")))] == 1
