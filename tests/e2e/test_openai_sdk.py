"""The official ``openai`` SDK against the real server: images.generate and images.edit as a user calls them.

Every test here runs on both engines (``any_server``: the embedded one and Ray Serve).
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def client(any_server):
    return openai.OpenAI(base_url=any_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _decode(b64_json: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    image.load()
    return image


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_b64_json_returns_a_png_of_the_default_size(client):
    result = client.images.generate(model="qwen-image-tiny", prompt="a red fox in the snow", extra_body={**FAST, "seed": 1})
    assert isinstance(result.created, int) and result.created > 1_600_000_000
    assert len(result.data) == 1
    item = result.data[0]
    assert item.url is None and item.b64_json
    image = _decode(item.b64_json)
    assert image.format == "PNG" and image.size == (256, 256)
    assert result.size == "256x256" and result.output_format == "png"
    assert item.model_extra["seed"] == 1


def test_generate_url_is_fetchable_and_is_the_same_image_as_b64(client, any_server):
    kwargs = dict(model="qwen-image-tiny", prompt="a lighthouse at dusk", extra_body={**FAST, "seed": 21})
    with ThreadPoolExecutor(2) as pool:
        by_url, by_b64 = pool.map(lambda fmt: client.images.generate(response_format=fmt, **kwargs), ["url", "b64_json"])
    item = by_url.data[0]
    assert item.b64_json is None
    assert item.url.startswith(any_server.base_url + "/images/") and item.url.endswith(".png")
    fetched = httpx.get(item.url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(fetched.content))
    assert image.format == "PNG" and image.size == (256, 256)
    # The stored file is the very image a b64_json request with the same seed returns.
    assert np.array_equal(_pixels(image), _pixels(_decode(by_b64.data[0].b64_json)))


@pytest.mark.parametrize("size", ["256x256", "320x256"])
@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_size(client, output_format, pil_format, size):
    result = client.images.generate(
        model="qwen-image-tiny", prompt="a bowl of fruit", size=size, output_format=output_format, extra_body={**FAST, "seed": 3}
    )
    image = _decode(result.data[0].b64_json)
    width, height = map(int, size.split("x"))
    assert image.format == pil_format
    assert image.size == (width, height)
    assert result.size == size and result.output_format == output_format


def test_n_2_returns_two_distinct_images_with_consecutive_seeds(client):
    result = client.images.generate(model="qwen-image-tiny", prompt="a sailing boat", n=2, extra_body={**FAST, "seed": 100})
    assert len(result.data) == 2
    assert [item.model_extra["seed"] for item in result.data] == [100, 101]
    first, second = (_pixels(_decode(item.b64_json)) for item in result.data)
    assert first.shape == second.shape == (256, 256, 3)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(("size", "expected"), [("256x256", (256, 256)), ("320x256", (320, 256))])
def test_edit_one_image(client, size, expected):
    source = _noise(320, 240, seed=1)
    result = client.images.edit(
        model="qwen-image-edit-tiny",
        image=("input.png", _png(source), "image/png"),
        prompt="make it blue",
        size=size,
        extra_body={**FAST, "seed": 5},
    )
    assert len(result.data) == 1
    image = _decode(result.data[0].b64_json)
    assert image.format == "PNG" and image.size == expected
    assert result.size == size


def test_edit_several_images_on_the_edit_plus_model_uses_every_image(client):
    first = ("first.png", _png(_noise(256, 256, seed=1)), "image/png")
    second = ("second.png", _png(_noise(256, 256, seed=2)), "image/png")
    other = ("other.png", _png(np.full((256, 256, 3), 30, np.uint8)), "image/png")
    kwargs = dict(model="qwen-image-edit-plus-tiny", prompt="put them side by side", extra_body={**FAST, "seed": 9})
    with ThreadPoolExecutor(2) as pool:  # the model has two workers
        result, changed = pool.map(lambda images: client.images.edit(image=images, **kwargs), [[first, second], [first, other]])
    assert len(result.data) == 1
    image = _decode(result.data[0].b64_json)
    assert image.format == "PNG"
    assert result.size == f"{image.size[0]}x{image.size[1]}"
    # Same seed, a different second image: the output changes, so the second image is really used.
    assert not np.array_equal(_pixels(image), _pixels(_decode(changed.data[0].b64_json)))


def test_edit_with_a_markup_edits_the_marked_up_image(client):
    """The SDK's ``markup=``: drawn over the image, so the same seed gives another image than without it, and the
    same one as an edit of the image with the marks already drawn in."""
    source = _noise(256, 256, seed=3)
    markup = np.zeros((256, 256, 4), np.uint8)  # transparent, but for a red ring
    markup[40:200, 40:200] = (255, 0, 0, 255)
    markup[60:180, 60:180] = 0
    drawn = source.copy()
    drawn[markup[:, :, 3] == 255] = (255, 0, 0)
    kwargs = dict(model="qwen-image-edit-tiny", prompt="a hat inside the red ring", extra_body={**FAST, "seed": 6})
    marked = client.images.edit(
        image=("input.png", _png(source), "image/png"), markup=("marks.png", _png(markup, "RGBA"), "image/png"), **kwargs
    )
    plain = client.images.edit(image=("input.png", _png(source), "image/png"), **kwargs)
    pre_drawn = client.images.edit(image=("drawn.png", _png(drawn), "image/png"), **kwargs)
    assert _decode(marked.data[0].b64_json).size == (256, 256)
    assert np.array_equal(_pixels(_decode(marked.data[0].b64_json)), _pixels(_decode(pre_drawn.data[0].b64_json)))
    assert not np.array_equal(_pixels(_decode(marked.data[0].b64_json)), _pixels(_decode(plain.data[0].b64_json)))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("input.png", _png(source), "image/png"), markup=("m.png", _png(drawn), "image/png"), **kwargs)
    assert caught.value.param == "markup" and "no transparent pixels" in caught.value.body["message"]


def test_several_images_on_the_plain_edit_model_is_a_bad_request(client):
    images = [("a.png", _png(_noise(256, 256, 1)), "image/png"), ("b.png", _png(_noise(256, 256, 2)), "image/png")]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="qwen-image-edit-tiny", image=images, prompt="merge", extra_body=FAST)
    error = caught.value
    assert error.status_code == 400
    assert error.type == "invalid_request_error" and error.param == "image"
    assert "qwen-image-edit-tiny" in error.body["message"]


def test_masked_edit_changes_only_the_transparent_region(client):
    source = _noise(256, 256, seed=4)
    mask = np.full((256, 256, 4), 255, np.uint8)  # opaque: keep
    mask[64:192, 80:200, 3] = 0  # transparent: the region to edit
    result = client.images.edit(
        model="qwen-image-edit-tiny",
        image=("input.png", _png(source), "image/png"),
        mask=("mask.png", _png(mask, "RGBA"), "image/png"),
        prompt="a yellow square",
        extra_body={**FAST, "seed": 2},
    )
    image = _decode(result.data[0].b64_json)
    assert image.format == "PNG" and image.size == (256, 256)
    out = _pixels(image)
    inside = mask[:, :, 3] == 0
    assert np.array_equal(out[~inside], source[~inside]), "pixels outside the mask must be the input's, exactly"
    changed = np.any(out[inside] != source[inside], axis=-1)
    assert changed.mean() > 0.9, "the masked region must be repainted"


def test_a_mask_with_several_images_repaints_the_first_within_the_mask(client):
    """OpenAI applies the mask to the first image when several are sent; it was a 400 here. The result has the first
    image's size and its pixels outside the mask; inside, the model painted with the other images in view (the latents
    kept outside the mask at every step: test_mask_blend.py)."""
    first, second = _noise(320, 256, seed=11), _noise(256, 256, seed=12)  # the first's size, not the last's
    mask = np.full((256, 320, 4), 255, np.uint8)
    mask[64:192, 96:224, 3] = 0  # transparent: the region to edit
    inside = mask[:, :, 3] == 0

    def edit(images):
        return client.images.edit(
            model="qwen-image-edit-plus-tiny",
            image=[(f"{i}.png", _png(a), "image/png") for i, a in enumerate(images)],
            mask=("mask.png", _png(mask, "RGBA"), "image/png"),
            prompt="paint the second into the first",
            extra_body={**FAST, "seed": 3},
        )

    with ThreadPoolExecutor(2) as pool:  # the model has two workers
        masked, other_second = pool.map(edit, [[first, second], [first, first[:, 32:288]]])
    out = _pixels(_decode(masked.data[0].b64_json))
    assert out.shape == first.shape and masked.size == "320x256"
    assert np.array_equal(out[~inside], first[~inside]), "pixels outside the mask must be the first image's, exactly"
    assert np.any(out[inside] != first[inside], axis=-1).mean() > 0.9, "the masked region must be repainted"
    other = _pixels(_decode(other_second.data[0].b64_json))
    assert not np.array_equal(out[inside], other[inside]), "the second image is used"


def test_unknown_model_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="dall-e-3", prompt="x", extra_body=FAST)
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == "Model not available: dall-e-3"
    assert caught.value.code == "model_not_found"


def test_streamed_generation_and_edit_through_the_sdk(client):
    """``stream=True`` as the SDK sends it: its typed events (partial images, then the completed one with its usage)
    parse, and the completed image is the one a plain request with the same seed returns."""
    steps = {"num_inference_steps": 4}  # previews come at steps before the last: two need three steps at least
    kwargs = dict(model="qwen-image-tiny", prompt="a red fox in the snow", size="256x256", extra_body={**steps, "seed": 9})
    events = list(client.images.generate(stream=True, partial_images=2, **kwargs))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    completed = events[-1]
    assert completed.size == "256x256" and completed.usage.output_tokens > 0
    plain = client.images.generate(**kwargs)
    assert np.array_equal(_pixels(_decode(completed.b64_json)), _pixels(_decode(plain.data[0].b64_json)))

    edit = client.images.edit(
        model="qwen-image-edit-tiny", image=("input.png", _png(_noise(256, 256)), "image/png"), prompt="make it blue",
        stream=True, partial_images=1, extra_body={**FAST, "seed": 5},
    )  # fmt: skip
    events = list(edit)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert _decode(events[-1].b64_json).size == (256, 256)
