"""Errors of streams and variations, in process: an error after the stream started is an in-band event."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def _png(size=(256, 256)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def short(make_api, tiny_t2i):
    """A server whose jobs time out after half a second; its engine is paused, so every job does."""
    api = make_api({"tiny": tiny_t2i}, task_timeout=0.5, max_steps=1000)
    api.engine.pause()
    return api


def test_error_after_the_stream_started_is_an_error_event(short, caplog):
    """The event carries the request's id, as an error envelope does, and the failure is logged with it, as the same
    failure of a request that is not a stream is (a stream's 5xx left no line in the log)."""
    import json
    import logging

    import openai  # here, not at the top: a test process that never runs this module does not import the SDK

    caplog.set_level(logging.WARNING)
    body = {"prompt": "slow", "stream": True, "partial_images": 1, "size": "1024x1024", "num_inference_steps": 1000}
    headers = {"X-Request-ID": "stream-rid-1"}
    with short.client.stream("POST", "/v1/images/generations", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.index("event: image_generation.partial_image") < text.index("event: error")
    error = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["error"]["message"] == "Task timeout" and error["request_id"] == "stream-rid-1"
    (logged,) = [r for r in caplog.records if "(stream) -> 504" in r.getMessage()]
    assert logged.qis_request_id == "stream-rid-1" and logged.getMessage().endswith("Task timeout")
    client = openai.OpenAI(base_url=f"{short.client.base_url}/v1", api_key="unused", http_client=short.client, max_retries=0)
    with pytest.raises(openai.APIError, match="Task timeout"):
        list(client.images.generate(prompt="slow", stream=True, size="1024x1024", extra_body={"num_inference_steps": 1000}))


def test_a_timeout_is_answered_once_not_retried_by_the_sdk(short):
    """A 504 says the job ran out of its time, which the same job would again: the answer tells clients not to retry
    (``X-Should-Retry: false``), which the SDK's default client (two retries of every 5xx) obeys. One run of the job,
    not three, each holding a worker for the whole task timeout."""
    import openai  # here, not at the top: a test process that never runs this module does not import the SDK

    client = openai.OpenAI(base_url=f"{short.client.base_url}/v1", api_key="unused", http_client=short.client)
    assert client.max_retries == 2
    with pytest.raises(openai.APIStatusError, match="Task timeout") as caught:
        client.images.generate(prompt="slow", size="1024x1024", extra_body={"num_inference_steps": 1000})
    assert caught.value.status_code == 504 and caught.value.response.headers["x-should-retry"] == "false"
    assert len(short.engine.jobs) == 1


def test_validation_errors_of_a_stream_are_plain_400s(api):
    r = api.client.post("/v1/images/generations", json={"prompt": "x", "stream": True, "partial_images": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"


def test_variation_errors(api):
    url = "/v1/images/variations"
    http = api.client
    assert http.post(url, data={"n": "1"}, files={"x": ("a", b"1")}).status_code == 400
    r = http.post(url, files={"image": ("a.png", b"garbage", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    r = http.post(url, files={"image": ("a.png", _png(), "image/png")}, data={"model": "qwen-image-edit-tiny"})
    assert r.status_code == 400  # a variation's message: it said "use /v1/images/edits"
    assert r.json()["error"]["message"] == (
        "Model qwen-image-edit-tiny is an edit model; variations are made by a text-to-image model"
    )
    r = http.post(url, files={"image": ("a.png", _png(), "image/png")}, data={"strength": "1.5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"


def test_a_variation_on_a_server_of_edit_models_only_says_what_makes_variations(make_api, tiny_edit):
    r = make_api({"edit": tiny_edit}).client.post("/v1/images/variations", files={"image": ("a.png", _png(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["message"] == "No model on this server does variations (a text-to-image model makes them)"


def test_stream_jobs_carry_the_preview_scale_of_the_settings(make_api, tiny_t2i):
    body = {"prompt": "p", "stream": True, "partial_images": 2, "num_inference_steps": 4}
    for settings, scale in (({}, 1.0), ({"preview_scale": 0.5}, 0.5), ({"preview_scale": 0.25}, 0.25)):
        api = make_api({"tiny": tiny_t2i}, **settings)
        with api.client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200 and "image_generation.completed" in response.read().decode()
        _, job = api.engine.jobs[-1]
        assert (job.partial_images, job.preview_scale) == (2, scale)


def test_preview_scale_outside_its_range_is_a_settings_error():
    from pydantic import ValidationError

    from qwen_image_server.config import Settings

    for bad in (0.0, 0.1, 1.5):
        with pytest.raises(ValidationError):
            Settings(preview_scale=bad)


def test_a_failed_pipeline_call_is_not_retried_by_the_sdk_and_a_dead_worker_is(make_api, tiny_t2i):
    """A pipeline call that raised would raise again for the same request: its 500 says not to retry it, and the
    SDK's default client (two retries of every 5xx: three full runs) runs it once. A worker that died is replaced:
    that 500 may be retried, and the retry is served."""
    import openai

    from qwen_image_server.errors import InferenceFailed

    api = make_api({"tiny": tiny_t2i})
    client = openai.OpenAI(base_url=f"{api.client.base_url}/v1", api_key="unused", http_client=api.client)
    api.engine.fail_next("tiny", InferenceFailed("RuntimeError: The size of tensor a (4487) must match"))
    with pytest.raises(openai.InternalServerError, match="Inference failed") as caught:
        client.images.generate(prompt="fails", size="256x256")
    assert caught.value.response.headers["x-should-retry"] == "false" and caught.value.code == "inference_failed"
    assert len(api.engine.jobs) == 1
    api.engine.fail_next("tiny", InferenceFailed("worker process exited unexpectedly (exit code -9)", retryable=True))
    made = client.with_options(max_retries=1, timeout=60).images.generate(prompt="served on retry", size="256x256")
    assert len(made.data) == 1 and len(api.engine.jobs) == 3
