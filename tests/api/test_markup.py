"""OpenAI's ``markup``: a transparent image drawn over the first image of an edit to guide it. In process, on the fake
engine: its jobs hold the arrays a worker would get, so they show what was drawn where."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from test_errors import EDITS, _png, assert_error

BLUE, RED = (40, 90, 200), (255, 0, 0)


@pytest.fixture
def edits(fresh_api):
    return fresh_api


def _markup(width: int = 256, height: int = 256, box=(16, 16, 48, 48), colour=(*RED, 255), fmt: str = "PNG") -> bytes:
    """A transparent image with one square of ``colour`` (RGBA) in ``box``."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    image.paste(colour, box)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _image(width: int = 256, height: int = 256) -> bytes:
    return _png(width, height, "RGB", BLUE)


def _first_input(edits) -> np.ndarray:
    ((_, job),) = edits.engine.jobs
    return job.images[0]


def test_a_markup_part_is_drawn_over_the_image_before_the_edit(edits):
    files = [("image", ("a.png", _image(), "image/png")), ("markup", ("m.png", _markup(), "image/png"))]
    response = edits.client.post(EDITS, data={"prompt": "put a hat where the red square is"}, files=files)
    assert response.status_code == 200, response.text[:300]
    pixels = _first_input(edits)
    assert pixels.shape == (256, 256, 3)
    assert (pixels[16:48, 16:48] == RED).all()  # the opaque square covers the image
    outside = np.ones((256, 256), dtype=bool)
    outside[16:48, 16:48] = False
    assert (pixels[outside] == BLUE).all()  # where the markup is transparent the image shows through, exactly


def test_a_half_transparent_markup_is_blended_and_a_json_markup_is_read(edits):
    data = _markup(colour=(*RED, 128), fmt="WEBP")
    body = {"prompt": "a cat", "image": base64.b64encode(_image()).decode()}
    body["markup"] = {"image_url": "data:image/webp;base64," + base64.b64encode(data).decode()}
    response = edits.client.post(EDITS, json=body)
    assert response.status_code == 200, response.text[:300]
    blended = _first_input(edits)[20, 20].astype(int)
    expected = (np.array(RED) * 128 + np.array(BLUE) * 127) / 255
    assert np.abs(blended - expected).max() <= 1, (blended, expected)


def test_a_markup_is_drawn_over_the_first_of_several_images_only(edits):
    files = [
        ("image[]", ("a.png", _image(), "image/png")),
        ("image[]", ("b.png", _image(320, 256), "image/png")),
        ("markup", ("m.png", _markup(), "image/png")),
    ]
    response = edits.client.post(EDITS, data={"prompt": "the two together"}, files=files)
    assert response.status_code == 200, response.text[:300]
    ((_, job),) = edits.engine.jobs
    assert (job.images[0][16:48, 16:48] == RED).all()
    assert (job.images[1] == BLUE).all()


def test_a_markup_is_sized_as_the_image_is_shown(edits):
    """A photo taken sideways (EXIF orientation 6: stored 320x256, shown 256x320): the markup is the shown size."""
    photo = Image.new("RGB", (320, 256), BLUE)
    exif = photo.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    image = ("image", ("photo.jpg", buffer.getvalue(), "image/jpeg"))
    response = edits.client.post(
        EDITS, data={"prompt": "a cat"}, files=[image, ("markup", ("m.png", _markup(256, 320), "image/png"))]
    )
    assert response.status_code == 200, response.text[:300]
    assert (_first_input(edits)[16:48, 16:48] == RED).all()
    refused = edits.client.post(
        EDITS, data={"prompt": "a cat"}, files=[image, ("markup", ("m.png", _markup(320, 256), "image/png"))]
    )
    assert_error(
        refused, 400, param="markup", message="markup is 320x256 but the first image is 256x320; they must be the same size"
    )


@pytest.mark.parametrize(
    "markup, message",
    [
        (_png(256, 256, "RGB", RED), "markup has no transparent pixels"),
        (_png(256, 256, "RGBA", (*RED, 255)), "markup has no transparent pixels"),
        (_markup(128, 128, box=(0, 0, 8, 8)), "markup is 128x128 but the first image is 256x256"),
        (b"not an image", "'markup' is not a decodable image"),
        (b"", "'markup' is empty"),
    ],
    ids=["no-alpha", "opaque-alpha", "other-size", "not-an-image", "empty"],
)
def test_a_markup_that_cannot_be_drawn_is_a_400_naming_it(edits, markup, message):
    files = [("image", ("a.png", _image(), "image/png")), ("markup", ("m.png", markup, "image/png"))]
    error = assert_error(edits.client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="markup")
    assert error["message"].startswith(message), error["message"]
    assert edits.engine.jobs == []


def test_markup_with_a_mask_a_second_markup_and_a_markup_on_a_variation_are_refused(edits):
    image, markup = ("image", ("a.png", _image(), "image/png")), ("markup", ("m.png", _markup(), "image/png"))
    mask = ("mask", ("mask.png", _png(256, 256, "RGBA", (0, 0, 0, 0)), "image/png"))
    with_mask = edits.client.post(EDITS, data={"prompt": "a cat"}, files=[image, mask, markup])
    assert_error(with_mask, 400, param="markup", message="markup does not combine with a mask: send one of them")
    two = edits.client.post(EDITS, data={"prompt": "a cat"}, files=[image, markup, markup])
    assert assert_error(two, 400, param="markup")["code"] == "too_many_files"
    json_two = {
        "prompt": "a cat",
        "image": base64.b64encode(_image()).decode(),
        "markup": [base64.b64encode(_markup()).decode()] * 2,
    }
    assert assert_error(edits.client.post(EDITS, json=json_two), 400, param="markup")["code"] == "too_many_files"
    variation = edits.client.post("/v1/images/variations", files=[image, markup])
    assert_error(
        variation, 400, param="markup", message="a variation takes no markup (a markup guides an edit: POST /v1/images/edits)"
    )
    assert edits.engine.jobs == []


def test_a_16_bit_grey_markup_and_mask_keep_their_transparent_colour(edits):
    """A 16-bit grey PNG with a tRNS colour key: scaling it to 8 bits dropped the key, so such a markup was refused
    ("no transparent pixels") and such a mask read as black and white. The key's pixels, exactly, are transparent."""
    values = np.full((256, 256), 1000, np.uint16)  # the key: transparent
    values[16:48, 16:48] = 1001  # one step off the key (the same 8-bit grey): opaque
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG", transparency=1000)
    grey = buffer.getvalue()
    files = [("image", ("a.png", _image(), "image/png")), ("markup", ("m.png", grey, "image/png"))]
    response = edits.client.post(EDITS, data={"prompt": "a cat"}, files=files)
    assert response.status_code == 200, response.text[:300]
    pixels = _first_input(edits)
    assert (pixels[16:48, 16:48] == 1001 >> 8).all() and (pixels[100:200, 100:200] == BLUE).all()
    files = [("image", ("a.png", _image(), "image/png")), ("mask", ("m.png", grey, "image/png"))]
    response = edits.client.post(EDITS, data={"prompt": "a cat"}, files=files)
    assert response.status_code == 200, response.text[:300]
    mask = edits.engine.jobs[-1][1].mask
    assert not mask[16:48, 16:48].any() and mask[100:200, 100:200].all()  # the key's pixels are edited, the rest kept
