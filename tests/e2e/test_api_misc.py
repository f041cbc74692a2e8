"""Health and readiness, model cards, response echoes, JSON edits, the seeds' extra fields, the url prefix."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import concurrently

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MODELS = {"qwen-image-tiny": "text-to-image", "qwen-image-edit-tiny": "edit", "qwen-image-edit-plus-tiny": "edit-plus"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def _generate(http: httpx.Client, **fields) -> dict:
    response = http.post(GENERATIONS, json={"prompt": "a windmill in a field", "num_inference_steps": 2, **fields})
    assert response.status_code == 200, response.text[:300]
    return response.json()


def _image(item: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    image.load()
    return image


def _pixels(item: dict) -> np.ndarray:
    return np.asarray(_image(item).convert("RGB"))


def _png_bytes(seed: int = 0, size: tuple[int, int] = (256, 256)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- health, readiness, models ---------------------------------------------------------------


def test_healthz(http):
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "qwen-image-tiny"}


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_ready_lists_every_model_and_its_workers(http):
    deadline = time.monotonic() + 60  # a worker replaced by another test may still be loading
    while (response := http.get("/ready")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["models"]) == set(MODELS)
    listing = http.get("/v1/models").json()
    cards = {card["id"]: card for card in listing["data"]}
    planned_gpus = {gpu["device"] for gpu in listing["gpus"]}
    for model_id, kind in MODELS.items():
        model = body["models"][model_id]
        assert model["kind"] == kind and model["ready"] is True
        workers = model["workers"]
        assert len(workers) == 2  # --workers 2
        assert len({w["pid"] for w in workers}) == 2
        # Each worker reports the device it loaded on: the one the memory plan (/v1/models) gave its slot.
        assert sorted(w["device"] for w in workers) == sorted(cards[model_id]["memory"]["devices"])
        for worker in workers:
            assert worker["name"].startswith(model_id + "#")
            assert worker["state"] in ("idle", "busy")
            # --device auto: a planned GPU wherever the server's machine (this one) has any, else the CPU.
            device = worker["device"]
            if torch.cuda.is_available():
                assert device in planned_gpus, (worker, planned_gpus)
            else:
                assert device == "cpu" and not planned_gpus, worker
            assert isinstance(worker["pid"], int)
            assert worker["memory"]["offload"] == "none" and worker["memory"]["weights_dtype"] == "auto"
            assert set(worker["memory"]["placement"]) == {"transformer", "text_encoder", "vae"}


def test_models_list_and_cards(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert set(cards) == set(MODELS)
    for model_id, card in cards.items():
        assert set(card) >= {"id", "object", "created", "owned_by"}
        assert card["object"] == "model" and isinstance(card["created"], int) and isinstance(card["owned_by"], str)
        one = http.get(f"/v1/models/{model_id}")
        assert one.status_code == 200
        assert one.json() == card


# --- echoes and the seeds' fields ---------------------------------------------------------------


def test_response_echoes_size_format_and_quality(http):
    body = _generate(http, size="320x256", output_format="webp", quality="low", seed=2)
    assert body["size"] == "320x256"
    assert body["output_format"] == "webp"
    assert body["quality"] == "low"
    assert body["background"] == "opaque"
    image = _image(body["data"][0])
    assert image.format == "WEBP" and image.size == (320, 256)


def test_default_echoes(http):
    body = _generate(http, seed=2)
    assert (body["size"], body["output_format"], body["quality"]) == ("256x256", "png", "auto")


def test_quality_low_is_accepted_without_explicit_steps(http):
    response = http.post(GENERATIONS, json={"prompt": "a windmill", "quality": "low", "seed": 4})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["quality"] == "low"
    assert _image(response.json()["data"][0]).size == (256, 256)


def test_seed_000_width_and_height(http):
    body, same = concurrently(
        lambda: _generate(http, width=320, height=256, seed=3),
        lambda: _generate(http, size="320x256", seed=3),
    )
    assert body["size"] == "320x256"
    assert _image(body["data"][0]).size == (320, 256)
    # width/height are the size: the same seed at size=320x256 is the same image.
    assert np.array_equal(_pixels(body["data"][0]), _pixels(same["data"][0]))


def test_seed_000_fields_are_honoured(http):
    base, other_cfg, other_negative = concurrently(
        lambda: _generate(http, seed=8, true_cfg_scale=4.0, negative_prompt="blurry"),
        lambda: _generate(http, seed=8, true_cfg_scale=1.0, negative_prompt="blurry"),
        lambda: _generate(http, seed=8, true_cfg_scale=4.0, negative_prompt="sharp, colourful"),
    )
    assert base["data"][0]["seed"] == 8
    assert not np.array_equal(_pixels(base["data"][0]), _pixels(other_cfg["data"][0]))
    assert not np.array_equal(_pixels(base["data"][0]), _pixels(other_negative["data"][0]))


def test_seed_002_guidance_scale_is_accepted_and_used(http):
    guided, same_as_true_cfg, unguided = concurrently(
        lambda: _generate(http, seed=9, guidance_scale=5.0),
        lambda: _generate(http, seed=9, true_cfg_scale=5.0),
        lambda: _generate(http, seed=9, guidance_scale=1.0),
    )
    assert guided["data"][0]["seed"] == 9
    assert np.array_equal(_pixels(guided["data"][0]), _pixels(same_as_true_cfg["data"][0]))
    assert not np.array_equal(_pixels(guided["data"][0]), _pixels(unguided["data"][0]))


# --- JSON edits -------------------------------------------------------------------------------------


def test_json_edit_with_base64_and_data_url_and_multipart_agree(http):
    data = _png_bytes(seed=6)
    common = {"prompt": "make it brighter", "seed": 13, "num_inference_steps": 2, "size": "256x256", "unknown_field": 1}
    plain, data_url, multipart = concurrently(
        lambda: http.post(EDITS, json={**common, "image": base64.b64encode(data).decode()}),
        lambda: http.post(EDITS, json={**common, "image": "data:image/png;base64," + base64.b64encode(data).decode()}),
        lambda: http.post(EDITS, data={k: str(v) for k, v in common.items()}, files={"image": ("in.png", data, "image/png")}),
    )
    for response in (plain, data_url, multipart):
        assert response.status_code == 200, response.text[:300]
    first = plain.json()
    assert first["size"] == "256x256" and len(first["data"]) == 1 and first["data"][0]["seed"] == 13
    assert _image(first["data"][0]).size == (256, 256)
    assert np.array_equal(_pixels(first["data"][0]), _pixels(data_url.json()["data"][0]))
    assert np.array_equal(_pixels(first["data"][0]), _pixels(multipart.json()["data"][0]))


def test_json_edit_with_several_images_on_edit_plus(http):
    images = [base64.b64encode(_png_bytes(seed=s)).decode() for s in (1, 2)]
    response = http.post(
        EDITS,
        json={
            "model": "qwen-image-edit-plus-tiny",
            "prompt": "combine",
            "images": images,
            "num_inference_steps": 2,
            "size": "256x256",
        },
    )
    assert response.status_code == 200, response.text[:300]
    assert _image(response.json()["data"][0]).size == (256, 256)


def test_edit_response_format_url(http, server):
    response = http.post(
        EDITS,
        data={"prompt": "make it red", "num_inference_steps": "2", "response_format": "url", "output_format": "jpeg"},
        files={"image": ("in.png", _png_bytes(seed=2), "image/png")},
    )
    assert response.status_code == 200, response.text[:300]
    url = response.json()["data"][0]["url"]
    assert url.startswith(server.base_url + "/images/") and url.endswith(".jpeg")
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).format == "JPEG"


# --- IMAGE_DOWNLOAD_URL_PREFIX ------------------------------------------------------------------------


def test_image_download_url_prefix(start_server, tiny_t2i):
    prefixed = start_server(
        "--model", f"qwen-image-tiny={tiny_t2i}",
        env={"IMAGE_DOWNLOAD_URL_PREFIX": "http://cdn.example/img", "QIS_CPU_THREADS": "1"},
    )  # fmt: skip
    with httpx.Client(base_url=prefixed.base_url, timeout=300) as client:
        body = _generate(client, response_format="url", seed=1)
        url = body["data"][0]["url"]
        assert url.startswith("http://cdn.example/img/")
        name = url[len("http://cdn.example/img/") :]
        assert "/" not in name and name.endswith(".png")
        served = client.get(f"/images/{name}")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(served.content))
        assert image.format == "PNG" and image.size == (256, 256)
        # It is the image the same request makes as b64_json.
        same = _generate(client, seed=1)
        assert np.array_equal(np.asarray(image.convert("RGB")), _pixels(same["data"][0]))
