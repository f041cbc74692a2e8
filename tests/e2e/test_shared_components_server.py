"""--share-components on a real server: one worker process serves a text-to-image and an edit model, their
identical text encoder and VAE loaded once; images as without sharing; a killed process comes back for both."""

from __future__ import annotations

import base64
import io
import os
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image

GEN = {"prompt": "a windmill", "seed": 5, "num_inference_steps": 2, "size": "256x256"}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


def _ready(server, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(server.base_url + "/ready", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready again:\n{server.logs()}")


@pytest.fixture(scope="module")
def shared(start_server, tiny_t2i, tiny_edit):
    return start_server(
        "--model", f"qwen-image-tiny={tiny_t2i}", "--model", f"qwen-image-edit-tiny={tiny_edit}", "--share-components",
        env={"QIS_CPU_THREADS": "1", "QIS_MAX_STEPS": "1000", "QIS_WORKER_RESTART_LIMIT": "2"},
    )  # fmt: skip


def test_one_process_serves_both_models_with_one_text_encoder_and_vae(shared):
    models = shared.status()["models"]
    t2i, edit = models["qwen-image-tiny"]["workers"], models["qwen-image-edit-tiny"]["workers"]
    assert len(t2i) == len(edit) == 1
    assert t2i[0]["pid"] == edit[0]["pid"] and t2i[0]["process"] == edit[0]["process"]
    assert (t2i[0]["name"], edit[0]["name"]) == ("qwen-image-tiny#0", "qwen-image-edit-tiny#0")
    assert "shared_components" not in t2i[0]["memory"]  # the first model loads them
    assert edit[0]["memory"]["shared_components"] == ["text_encoder", "vae"]
    assert "model qwen-image-edit-tiny shares the text_encoder already loaded in this process" in shared.logs(tail=None)


def test_both_models_serve_and_make_the_images_they_make_alone(shared, server):
    with httpx.Client(timeout=300) as http:
        together = http.post(shared.base_url + "/v1/images/generations", json=GEN)
        alone = http.post(server.base_url + "/v1/images/generations", json=GEN)
        files = {"image": ("in.png", _png(), "image/png")}
        form = {"prompt": "make it red", "seed": "2", "num_inference_steps": "2", "size": "256x256"}
        edited = http.post(shared.base_url + "/v1/images/edits", data={**form, "model": "qwen-image-edit-tiny"}, files=files)
        edited_alone = http.post(
            server.base_url + "/v1/images/edits", data={**form, "model": "qwen-image-edit-tiny"}, files=files
        )
    for response in (together, alone, edited, edited_alone):
        assert response.status_code == 200, response.text[:300]
    assert np.array_equal(_pixels(together.json()), _pixels(alone.json()))
    assert np.array_equal(_pixels(edited.json()), _pixels(edited_alone.json()))


def test_a_killed_shared_process_fails_its_task_and_comes_back_for_both_models(shared):
    pid = shared.status()["models"]["qwen-image-tiny"]["workers"][0]["pid"]
    body = {**GEN, "num_inference_steps": 400, "stream": True, "partial_images": 3}  # a preview after step 100
    with httpx.stream("POST", shared.base_url + "/v1/images/generations", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert any(line.startswith("event: image_generation.partial_image") for line in lines)  # it runs
        os.kill(pid, signal.SIGKILL)
        rest = "\n".join(lines)
    assert "event: error" in rest and "worker process exited unexpectedly" in rest
    status = _ready(shared)
    workers = [status["models"][m]["workers"][0] for m in ("qwen-image-tiny", "qwen-image-edit-tiny")]
    assert workers[0]["pid"] == workers[1]["pid"] != pid, "one new process serves both"
    ok = httpx.post(shared.base_url + "/v1/images/generations", json=GEN, timeout=300)
    assert ok.status_code == 200, ok.text[:300]
