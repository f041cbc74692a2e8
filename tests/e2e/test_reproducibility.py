"""Seeds make images reproducible; no seed makes them differ; output_compression changes the encoding."""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import concurrently

GENERATIONS = "/v1/images/generations"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def _generate(http: httpx.Client, **fields) -> dict:
    body = {"prompt": "a small house by a lake", "num_inference_steps": 2, **fields}
    response = http.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def _raw(item: dict) -> bytes:
    return base64.b64decode(item["b64_json"])


def _pixels(item: dict) -> bytes:
    """The decoded pixel data of one returned image (RGB)."""
    image = Image.open(io.BytesIO(_raw(item)))
    assert image.size == (256, 256)
    return image.convert("RGB").tobytes()


def test_same_seed_gives_identical_pixels(http):
    # Sent together, the two requests are run by the model's two workers at once.
    bodies = concurrently(lambda: _generate(http, seed=1234), lambda: _generate(http, seed=1234))
    first, second = (body["data"][0] for body in bodies)
    assert first["seed"] == second["seed"] == 1234
    assert _pixels(first) == _pixels(second)
    assert _raw(first) == _raw(second)  # png encoding is deterministic too
    # And again later, on whichever worker is free.
    assert _pixels(_generate(http, seed=1234)["data"][0]) == _pixels(first)


def test_no_seed_gives_different_images_and_seeds(http):
    first, second = (body["data"][0] for body in concurrently(lambda: _generate(http), lambda: _generate(http)))
    assert isinstance(first["seed"], int) and isinstance(second["seed"], int)
    assert first["seed"] != second["seed"]
    assert _pixels(first) != _pixels(second)
    # The returned seed reproduces the image.
    again = _generate(http, seed=first["seed"])["data"][0]
    assert _pixels(again) == _pixels(first)


def test_different_seed_or_prompt_changes_the_image(http):
    base, other_seed, other_prompt = (
        _pixels(body["data"][0])
        for body in concurrently(
            lambda: _generate(http, seed=5),
            lambda: _generate(http, seed=6),
            lambda: _generate(http, seed=5, prompt="a red car on a bridge"),
        )
    )
    assert other_seed != base
    assert other_prompt != base


def test_n_3_equals_three_single_requests(http):
    batch = _generate(http, seed=7, n=3)["data"]
    assert [item["seed"] for item in batch] == [7, 8, 9]
    singles = [body["data"][0] for body in concurrently(*(lambda s=seed: _generate(http, seed=s) for seed in (7, 8, 9)))]
    for from_batch, single in zip(batch, singles, strict=True):
        assert _pixels(from_batch) == _pixels(single)
    assert len({_pixels(item) for item in batch}) == 3


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lower_output_compression_gives_smaller_files(http, output_format, pil_format):
    bodies = concurrently(
        *(lambda c=c: _generate(http, seed=11, output_format=output_format, output_compression=c) for c in (50, 100))
    )
    sizes = []
    for body in bodies:
        item = body["data"][0]
        image = Image.open(io.BytesIO(_raw(item)))
        assert image.format == pil_format and image.size == (256, 256)
        sizes.append(len(_raw(item)))
    assert sizes[0] < sizes[1]  # output_compression 50 < 100


def test_png_ignores_output_compression(http):
    bodies = concurrently(lambda: _generate(http, seed=12, output_compression=10), lambda: _generate(http, seed=12))
    lossy, best = (body["data"][0] for body in bodies)
    assert Image.open(io.BytesIO(_raw(lossy))).format == "PNG"
    assert _pixels(lossy) == _pixels(best)


def test_same_seed_edit_is_reproducible(http):
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="PNG")

    def edit():
        return http.post(
            "/v1/images/edits",
            data={"prompt": "make it green", "seed": "31", "num_inference_steps": "2"},
            files={"image": ("in.png", buffer.getvalue(), "image/png")},
        )

    results = []
    for response in concurrently(edit, edit):
        assert response.status_code == 200, response.text[:300]
        results.append(response.json()["data"][0])
    assert results[0]["seed"] == results[1]["seed"] == 31
    assert _pixels(results[0]) == _pixels(results[1])


def test_an_edit_made_again_reuses_its_prompt_encodings(http):
    """The worker keeps prompt embeddings per prompt and input image: the same edit with another seed runs no text
    encoder pass, a new prompt on the same image only its own (``stats`` counts both), and the kept embeddings give
    the image the encoder's own give."""
    unique = uuid.uuid4().hex[:8]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(17).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="PNG")

    def edit(prompt: str, seed: int) -> dict:
        response = http.post(
            "/v1/images/edits",
            data={
                "model": "qwen-image-edit-tiny",
                "prompt": f"{prompt} {unique}",
                "negative_prompt": f"blurry {unique}",
                "seed": str(seed),
                "num_inference_steps": "2",
            },  # fmt: skip
            files={"image": ("in.png", buffer.getvalue(), "image/png")},
        )
        assert response.status_code == 200, response.text[:300]
        return response.json()

    first = edit("make it green", 41)
    assert (first["stats"]["prompt_encodings"], first["stats"]["prompt_cache_hits"]) == (2, 0)  # prompt and negative
    again = edit("make it green", 42)
    assert (again["stats"]["prompt_encodings"], again["stats"]["prompt_cache_hits"]) == (0, 2)
    other = edit("make it red", 41)
    assert (other["stats"]["prompt_encodings"], other["stats"]["prompt_cache_hits"]) == (1, 1)
    assert _pixels(edit("make it green", 41)["data"][0]) == _pixels(first["data"][0])
