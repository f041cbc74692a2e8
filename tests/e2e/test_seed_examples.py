"""The two seed documents' examples, sent as written (only host and port changed), and the shapes they promise.

Seed 000 (English README of a Qwen-Image wrapper) and seed 002 (Chinese API
document of a Qwen-Image OpenAI-compatible server). Bodies are the documents'
literal JSON text; multipart bodies are what ``curl -F`` sends.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

JSON = {"Content-Type": "application/json"}

# Seed 002, "基本请求" / "基本图像生成" (cURL example), verbatim.
SEED_002_BASIC = """{
    "prompt": "一只可爱的小猫坐在花园里",
    "n": 1,
    "size": "1024x1024"
  }"""

# Seed 002, "高级请求" / "高级图像生成" (cURL example), verbatim.
SEED_002_ADVANCED = """{
    "prompt": "一只可爱的小猫坐在花园里，阳光明媚，花朵盛开",
    "negative_prompt": "模糊的，低质量的，水印",
    "n": 2,
    "aspect_ratio": "16:9",
    "guidance_scale": 5.0,
    "num_inference_steps": 40,
    "seed": 42,
    "response_format": "url"
  }"""

# Seed 000, "Image Generation" cURL example, verbatim.
SEED_000_GENERATION = """{
           "prompt": "A cute cat sleeping on a sofa"
         }"""


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=600) as client:
        yield client


def _decode_b64(value: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
    image.load()
    return image


def _assert_created_and_data(body: dict, n: int) -> list[dict]:
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    assert isinstance(body["data"], list) and len(body["data"]) == n
    return body["data"]


# --- seed 002 -------------------------------------------------------------------------


def test_seed_002_healthz(http):
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "qwen-image-tiny"}


def test_seed_002_models_list(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    ids = []
    for card in body["data"]:
        assert card["object"] == "model"
        assert isinstance(card["id"], str) and isinstance(card["owned_by"], str)
        assert isinstance(card["created"], int) and not isinstance(card["created"], bool)
        ids.append(card["id"])
    assert sorted(ids) == ["qwen-image-edit-plus-tiny", "qwen-image-edit-tiny", "qwen-image-tiny", "tiny-limits"]


@pytest.mark.timeout(600)  # one 1024x1024 image, 50 steps, on CPU
def test_seed_002_basic_generation(http):
    response = http.post("/v1/images/generations", content=SEED_002_BASIC.encode(), headers=JSON)
    assert response.status_code == 200, response.text[:300]
    (item,) = _assert_created_and_data(response.json(), 1)
    assert "url" not in item or item["url"] is None  # response_format defaults to b64_json
    image = _decode_b64(item["b64_json"])
    assert image.format == "PNG" and image.size == (1024, 1024)


@pytest.mark.timeout(600)  # two 1664x928 images, 40 steps, on CPU
def test_seed_002_advanced_generation_with_urls(http, server):
    response = http.post("/v1/images/generations", content=SEED_002_ADVANCED.encode(), headers=JSON)
    assert response.status_code == 200, response.text[:300]
    items = _assert_created_and_data(response.json(), 2)
    pixels = []
    for item in items:
        assert item.get("b64_json") is None
        url = item["url"]
        assert url.startswith(server.base_url + "/images/") and url.endswith(".png")
        fetched = httpx.get(url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(fetched.content))
        image.load()
        assert image.format == "PNG" and image.size == (1664, 928)  # 16:9
        pixels.append(np.asarray(image.convert("RGB")))
    assert [item["seed"] for item in items] == [42, 43]
    assert not np.array_equal(pixels[0], pixels[1])


def test_seed_002_unknown_model_error(http):
    # The document's own example: {"detail": "Model not available: Qwen-Image"} with 400.
    body = '{"model": "Qwen-Image", "prompt": "一只可爱的小猫坐在花园里"}'
    response = http.post("/v1/images/generations", content=body.encode(), headers=JSON)
    assert response.status_code == 400
    assert response.json()["detail"] == "Model not available: Qwen-Image"


# --- seed 000 -------------------------------------------------------------------------


def test_seed_000_generation(http):
    response = http.post("/v1/images/generations", content=SEED_000_GENERATION.encode(), headers=JSON)
    assert response.status_code == 200, response.text[:300]
    (item,) = _assert_created_and_data(response.json(), 1)
    image = _decode_b64(item["b64_json"])
    assert image.format == "PNG" and image.size == (256, 256)  # the tiny model's default size


def test_seed_000_multipart_edit(http, tmp_path):
    # curl -X POST .../v1/images/edits -F "image=@/path/to/your/image.png" -F "prompt=..."
    # curl sends the file part first, named after the file, typed from its extension.
    # (The document's shell quoting, "prompt="make the cat wear a party hat"", would split
    # the words; the intended prompt is sent.)
    path = tmp_path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
    files = [
        ("image", ("image.png", path.read_bytes(), "image/png")),
        ("prompt", (None, "make the cat wear a party hat")),
    ]
    response = http.post("/v1/images/edits", files=files)
    assert response.status_code == 200, response.text[:300]
    (item,) = _assert_created_and_data(response.json(), 1)
    image = _decode_b64(item["b64_json"])
    assert image.format == "PNG" and image.size == (256, 256)
    assert not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(path).convert("RGB")))
