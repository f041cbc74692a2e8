"""Streaming partial images and variations through the openai SDK on real pipelines; usage and echoes.

(Errors of streams and variations are tested in process: tests/api/test_streaming_errors.py.)
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def client(any_server):
    """Tests taking ``client`` run on both engines (embedded and Ray Serve)."""
    return openai.OpenAI(base_url=any_server.base_url + "/v1", api_key="unused")


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _png(size=(256, 256), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 60 + np.array(color) * 0.7).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_generate_stream_sends_partials_then_completed(client):
    events = list(
        client.images.generate(
            model="qwen-image-tiny", prompt="a lighthouse", stream=True, partial_images=2, size="256x256",
            extra_body={"seed": 11, "num_inference_steps": 6},
        )
    )  # fmt: skip
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = np.asarray(_decode(events[-1].b64_json))
    for event in events[:2]:
        preview = _decode(event.b64_json)
        assert preview.size == (256, 256) and preview.format == "PNG"
        assert event.size == "256x256" and event.output_format == "png" and event.background == "opaque"
        assert not np.array_equal(np.asarray(preview), final), "a preview is not a copy of the final image"
    # previews are the denoising estimate: the later one is closer to the final image than the earlier one
    distance = [np.abs(np.asarray(_decode(e.b64_json)).astype(int) - final).mean() for e in events[:2]]
    assert distance[1] < distance[0], distance
    done = events[-1]
    assert done.usage.output_tokens == 256 and done.usage.input_tokens == done.usage.input_tokens_details.text_tokens > 0
    # The streamed image is the image a plain request with the same seed makes.
    plain = client.images.generate(
        model="qwen-image-tiny", prompt="a lighthouse", size="256x256", extra_body={"seed": 11, "num_inference_steps": 6}
    )
    assert np.array_equal(final, np.asarray(_decode(plain.data[0].b64_json)))


def test_stream_with_n_2_sends_each_images_events(client):
    events = list(
        client.images.generate(
            model="qwen-image-tiny", prompt="two boats", stream=True, partial_images=1, n=2, output_format="jpeg",
            extra_body={"seed": 4, "num_inference_steps": 4},
        )
    )  # fmt: skip
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert sorted(e.model_extra["image_index"] for e in partials) == [0, 1]
    assert [e.model_extra["image_index"] for e in completed] == [0, 1]
    assert [e.model_extra["seed"] for e in completed] == [4, 5]
    assert events[-2:] == completed
    assert all(_decode(e.b64_json).format == "JPEG" for e in events)


def test_stream_without_partials_sends_only_completed(client):
    events = list(client.images.generate(model="qwen-image-tiny", prompt="x", stream=True, extra_body={"num_inference_steps": 2}))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_edit_stream(client):
    events = list(
        client.images.edit(
            model="qwen-image-edit-tiny", image=("in.png", _png(), "image/png"), prompt="make it blue", stream=True,
            partial_images=1, extra_body={"num_inference_steps": 4},
        )
    )  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert _decode(events[0].b64_json).size == _decode(events[1].b64_json).size


def test_variations_through_the_sdk(client):
    source = _png((320, 240))
    result = client.images.create_variation(
        model="qwen-image-tiny", image=("in.png", source, "image/png"), n=2, extra_body={"seed": 9, "num_inference_steps": 4}
    )
    images = [_decode(d.b64_json) for d in result.data]
    assert [d.model_extra["seed"] for d in result.data] == [9, 10]
    # auto: the input's aspect (4:3) at the model's default area (296x222 for 256x256), scaled as a whole within the
    # side limits (>= 256)
    assert all(im.size == (336, 256) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    again = client.images.create_variation(
        model="qwen-image-tiny",
        image=("in.png", source, "image/png"),
        size="256x256",
        extra_body={"seed": 9, "num_inference_steps": 4},
    )
    assert _decode(again.data[0].b64_json).size == (256, 256)
    assert result.usage.output_tokens == 2 * (336 // 16) * (256 // 16)


def test_variation_strength_moves_further_from_the_input(server):
    source = _png((256, 256))

    def vary(strength):
        r = httpx.post(
            server.base_url + "/v1/images/variations", timeout=120,
            files={"image": ("in.png", source, "image/png")},
            data={"seed": "3", "num_inference_steps": "8", "strength": str(strength), "size": "256x256"},
        )  # fmt: skip
        assert r.status_code == 200, r.text[:300]
        return np.asarray(_decode(r.json()["data"][0]["b64_json"])).astype(int)

    # The tiny model's random VAE does not reproduce the input's pixels, but a low
    # strength keeps what it encodes: two low strengths stay close, a full one does not.
    low, lower, full = vary(0.2), vary(0.1), vary(1.0)
    assert np.abs(low - lower).mean() < np.abs(low - full).mean()


def test_usage_and_echoes_in_plain_responses(client):
    r = client.images.generate(
        model="qwen-image-tiny",
        prompt="abc",
        size="320x256",
        quality="low",
        output_format="webp",
        extra_body={"num_inference_steps": 2},
    )
    assert (r.size, r.quality, r.output_format) == ("320x256", "low", "webp")
    assert r.usage.input_tokens_details.text_tokens == 3  # the tiny tokenizer has one token per byte
    assert r.usage.output_tokens == (320 // 16) * (256 // 16)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.data[0].revised_prompt == "abc"
