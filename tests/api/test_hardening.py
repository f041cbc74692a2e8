"""Inputs that used to slip past the limits: each one gets a clear 400 (or stays within bounds). In process."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from PIL import Image
from test_errors import EDITS, GENERATIONS, _png, assert_error


@pytest.fixture(scope="module")
def http_client(api):
    return api.client


def _encoded(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_negative_prompt_is_bounded_like_the_prompt(http_client):
    body = {"prompt": "a cat", "negative_prompt": "x" * 4001}
    error = assert_error(http_client.post(GENERATIONS, json=body), 400, param="negative_prompt")
    assert "4000" in error["message"]


def test_seed_plus_n_beyond_the_seed_range_is_400(http_client):
    body = {"prompt": "a cat", "seed": 2**63 - 1, "n": 2, "num_inference_steps": 2}
    assert_error(http_client.post(GENERATIONS, json=body), 400, param="seed")


def test_too_many_unknown_fields_is_400(http_client):
    body = {"prompt": "a cat", **{f"f{i}": i for i in range(65)}}
    error = assert_error(http_client.post(GENERATIONS, json=body), 400)
    assert "65 unknown fields" in error["message"]


def test_unknown_field_names_are_logged_escaped(http_client, caplog):
    caplog.set_level(logging.INFO)
    forged = "x\n2030-01-01 00:00:00 ERROR forged line"
    response = http_client.post(GENERATIONS, json={"prompt": "a cat", "num_inference_steps": 2, forged: 1})
    assert response.status_code == 200, response.text[:300]
    logs = caplog.text
    assert "x\\n2030-01-01 00:00:00 ERROR forged" in logs
    assert "\n2030-01-01 00:00:00 ERROR forged" not in logs


@pytest.mark.parametrize("size", [(8, 1024), (2, 8000), (1024, 100)])
def test_input_images_of_extreme_aspect_ratio_are_400(http_client, size):
    files = {"image": ("thin.png", _png(*size), "image/png")}
    error = assert_error(http_client.post(EDITS, data={"prompt": "p"}, files=files), 400, param="image")
    assert "at most 8x" in error["message"]


def test_long_input_without_size_comes_back_within_the_side_limits(http_client):
    files = {"image": ("long.png", _png(1024, 160), "image/png")}  # 6.4:1
    response = http_client.post(EDITS, data={"prompt": "p", "num_inference_steps": "2", "seed": "1"}, files=files)
    assert response.status_code == 200, response.text[:300]
    width, height = (int(v) for v in response.json()["size"].split("x"))
    assert 256 <= width <= 2048 and 256 <= height <= 2048, (width, height)
    assert width > height


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PCX", "TGA", "ICO"])
def test_only_png_jpeg_and_webp_are_decoded(http_client, fmt):
    files = {"image": (f"in.{fmt.lower()}", _encoded(64, 64, fmt), "application/octet-stream")}
    error = assert_error(http_client.post(EDITS, data={"prompt": "p"}, files=files), 400, param="image")
    assert "PNG, JPEG or WebP" in error["message"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_still_decode(http_client, fmt):
    files = {"image": ("in", _encoded(256, 256, fmt), "application/octet-stream")}
    response = http_client.post(EDITS, data={"prompt": "p", "num_inference_steps": "2"}, files=files)
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize("count", [5, 6])
def test_too_many_files_names_the_real_limit_and_has_a_code(http_client, count):
    """Five images (room for a mask in the multipart limit, but one image too many) are the same error as six, and
    as five images in JSON."""
    files = [("image[]", (f"{i}.png", _png(64, 64), "image/png")) for i in range(count)]
    error = assert_error(http_client.post(EDITS, data={"prompt": "p", "model": "qwen-image-edit-plus-tiny"}, files=files), 400)
    assert error["code"] == "too_many_files"
    assert "at most 4 images" in error["message"]
    images = [base64.b64encode(_png(64, 64)).decode()] * count
    body = {"prompt": "p", "model": "qwen-image-edit-plus-tiny", "images": images}
    error = assert_error(http_client.post(EDITS, json=body), 400)
    assert error["code"] == "too_many_files" and "at most 4 images" in error["message"]


def test_empty_body_says_so(http_client):
    error = assert_error(http_client.post(GENERATIONS, headers={"content-type": "application/json"}), 400)
    assert "None" not in error["message"]
    assert "no body" in error["message"]


@pytest.mark.parametrize("files", [2, 3])
@pytest.mark.parametrize("extra", ["image", "mask"])
def test_too_many_files_for_a_variation_says_what_a_variation_takes(http_client, extra, files):
    """A variation takes one image and no mask: three files said "at most 1 images and one mask per request", two
    files another message with another code than the README's ``too_many_files``."""
    parts = [("image", ("a.png", _png(64, 64), "image/png")), ("image", ("b.png", _png(64, 64), "image/png"))][: files - 1]
    parts.append((extra, ("c.png", _png(64, 64), "image/png")))
    error = assert_error(http_client.post("/v1/images/variations", files=parts), 400, param=extra if files == 2 else "image")
    assert error["code"] == "too_many_files"
    assert error["message"] == "too many files: at most 1 image and no mask per request"
