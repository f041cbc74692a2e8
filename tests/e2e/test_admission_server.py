"""Admission before work, over HTTP: a full queue, a failed model or a spent pixel budget answer 503 before
any upload is decoded; large inputs are shrunk and still give results of the right size."""

from __future__ import annotations

import base64
import io
import shutil
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Server, post_in_thread
from model_files import unloadable

pytestmark = pytest.mark.e2e

EDITS = "/v1/images/edits"
NOT_AN_IMAGE = b"these bytes are no image at all"


def _png(size, color=(20, 160, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def admission_server(tiny_t2i, tiny_edit, tmp_path_factory):
    """A text-to-image model, an edit model and an edit model that cannot load; one worker each, a queue of one,
    and a pixel budget of 300 kB per model (one 256x256 input is 196 kB)."""
    tmp = tmp_path_factory.mktemp("admission")
    broken = tmp / "broken-edit"
    shutil.copytree(tiny_edit, broken)
    unloadable(broken / "transformer" / "diffusion_pytorch_model.safetensors")
    server = Server(
        ["--model", f"gen={tiny_t2i}", "--model", f"edit={tiny_edit}", "--model", f"broken={broken}", "--workers", "1"],
        env={
            "TASK_QUEUE_SIZE": "1", "QIS_CPU_THREADS": "1", "QIS_MAX_STEPS": "1000", "QIS_MAX_QUEUED_PIXEL_BYTES": "300000",
            "QIS_WORKER_RESTART_LIMIT": "0", "QIS_WORKER_RETRY_SECONDS": "3600", "IMAGE_OUTPUT_DIR": str(tmp / "images"),
        },
        log_path=tmp / "server.log",
    )  # fmt: skip

    def loaded():
        models = server.http.get("/ready").json().get("models", {})
        return models and models["broken"]["state"] == "failed" and models["gen"]["ready"] and models["edit"]["ready"]

    try:
        _wait_for(loaded, timeout=300, what="two models ready and one failed")
        yield server
    finally:
        server.stop()


def _edit_model(server) -> dict:
    return server.status()["models"]["edit"]


def _wait_idle(server) -> None:
    _wait_for(lambda: (m := _edit_model(server))["queued_jobs"] == 0 and m["workers"][0]["state"] == "idle", what="edit idle")


def _long_edit(server, size, seed: int):
    """An edit that would run for minutes: the test cancels it (its client gives up after 300 s at the latest)."""
    body = {
        "model": "edit",
        "prompt": "long",
        "image": _b64(_png(size)),
        "size": "1024x1024",
        "num_inference_steps": 1000,
        "seed": seed,
    }
    return post_in_thread(server.base_url + EDITS, body, timeout=300)


def test_full_queue_refuses_an_edit_before_decoding_its_image(admission_server):
    server = admission_server
    _wait_idle(server)
    running, _ = _long_edit(server, (64, 64), 1)
    _wait_for(lambda: _edit_model(server)["workers"][0]["state"] == "busy", what="edit running")
    queued, _ = _long_edit(server, (64, 64), 2)
    _wait_for(lambda: _edit_model(server)["queued_jobs"] == 1, what="one edit queued")
    # No model named: the default edit model's queue is checked. Decoding these bytes would give a 400.
    refused = httpx.post(
        server.base_url + EDITS, files={"image": ("x.png", NOT_AN_IMAGE, "image/png")}, data={"prompt": "p"}, timeout=30
    )
    assert refused.status_code == 503, refused.text[:300]
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    as_json = httpx.post(server.base_url + EDITS, json={"model": "edit", "prompt": "p", "image": _b64(NOT_AN_IMAGE)}, timeout=30)
    assert as_json.status_code == 503 and as_json.json()["error"]["code"] == "queue_full"
    queued.cancel()
    running.cancel()
    _wait_idle(server)
    # With room in the queue the same body is decoded, and refused for what it is.
    invalid = httpx.post(
        server.base_url + EDITS, files={"image": ("x.png", NOT_AN_IMAGE, "image/png")}, data={"prompt": "p"}, timeout=30
    )
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "invalid_image"


def test_failed_model_refuses_before_decoding(admission_server):
    files = {"image": ("x.png", NOT_AN_IMAGE, "image/png")}
    response = httpx.post(admission_server.base_url + EDITS, files=files, data={"prompt": "p", "model": "broken"}, timeout=30)
    assert response.status_code == 503, response.text[:300]
    assert response.json()["error"]["code"] == "model_unavailable"


def test_spent_pixel_budget_gives_503_with_room_in_the_queue(admission_server):
    server = admission_server
    _wait_idle(server)
    running, _ = _long_edit(server, (256, 256), 3)  # 196 kB of the 300 kB budget
    _wait_for(lambda: _edit_model(server)["workers"][0]["state"] == "busy", what="edit running")
    assert _edit_model(server)["held_pixel_bytes"] == 256 * 256 * 3
    body = {"model": "edit", "prompt": "p", "image": _b64(_png((256, 256))), "num_inference_steps": 2}
    refused = httpx.post(server.base_url + EDITS, json=body, timeout=30)
    assert _edit_model(server)["queued_jobs"] == 0
    assert refused.status_code == 503, refused.text[:300]
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    running.cancel()
    _wait_idle(server)
    assert _edit_model(server)["held_pixel_bytes"] == 0


def test_large_input_is_shrunk_and_the_edit_keeps_the_right_size(admission_server):
    # The tiny edit model works at 256² (edit_area 65536); inputs are kept at up to twice that.
    body = {"model": "edit", "prompt": "p", "image": _b64(_png((1280, 768))), "num_inference_steps": 2, "seed": 1}
    response = httpx.post(admission_server.base_url + EDITS, json=body, timeout=300)
    assert response.status_code == 200, response.text[:300]
    # The input's aspect (5:3) at the working area (330x198), scaled as a whole until the short side reaches the 256
    # minimum: as without shrinking.
    assert response.json()["size"] == "432x256"


def test_mask_edit_of_a_shrunk_input_comes_back_at_the_input_size_with_unmasked_pixels_kept(admission_server):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)  # noise: any resampling would change it
    image = io.BytesIO()
    Image.fromarray(original).save(image, format="PNG")
    mask = Image.new("RGBA", (640, 640), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (100, 100, 300, 260))  # transparent: edit here
    mask_bytes = io.BytesIO()
    mask.save(mask_bytes, format="PNG")
    body = {
        "model": "edit",
        "prompt": "p",
        "image": _b64(image.getvalue()),
        "mask": _b64(mask_bytes.getvalue()),
        "num_inference_steps": 2,
    }
    response = httpx.post(admission_server.base_url + EDITS, json=body, timeout=300)
    assert response.status_code == 200, response.text[:300]
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert result.shape == (640, 640, 3)
    outside = np.ones((640, 640), bool)
    outside[100:260, 100:300] = False
    assert np.array_equal(result[outside], original[outside])
    assert not np.array_equal(result[~outside], original[~outside])


def test_large_input_of_a_variation_is_shrunk_and_the_variation_keeps_its_size(admission_server):
    files = {"image": ("big.png", _png((1024, 512)), "image/png")}
    response = httpx.post(
        admission_server.base_url + "/v1/images/variations",
        files=files,
        data={"model": "gen", "num_inference_steps": "2"},
        timeout=300,
    )
    assert response.status_code == 200, response.text[:300]
    assert response.json()["size"] == "512x256"  # 2:1 at the default area (362x181), scaled until the short side is 256
