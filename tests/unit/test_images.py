"""Decoding uploads safely, masks, encoding."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from qwen_image_server.errors import InvalidImage
from qwen_image_server.images import decode_base64_image, encode_image, mask_to_array, open_image, to_rgb_array


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_garbage_and_empty_are_invalid_images():
    for data in (b"", b"not an image", _png(Image.new("RGB", (8, 8)))[:40]):
        with pytest.raises(InvalidImage):
            open_image(data, "image", 10**6)


def test_too_many_pixels_refused():
    with pytest.raises(InvalidImage, match="more than"):
        open_image(_png(Image.new("RGB", (100, 100))), "image", 5000)


def test_base64_and_data_urls():
    raw = _png(Image.new("RGB", (4, 4)))
    encoded = base64.b64encode(raw).decode()
    assert decode_base64_image(encoded, "image") == raw
    assert decode_base64_image("data:image/png;base64," + encoded, "image") == raw
    with pytest.raises(InvalidImage, match="not valid base64"):
        decode_base64_image("***", "image")
    with pytest.raises(InvalidImage, match="not fetched"):
        decode_base64_image("https://example.com/x.png", "image")


def test_mask_conventions():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[1:3, 1:3, 3] = 0  # transparent = edit (OpenAI)
    assert mask_to_array(Image.fromarray(rgba, "RGBA")).tolist() == np.where(rgba[:, :, 3] == 0, 255, 0).tolist()
    gray = np.zeros((4, 4), np.uint8)
    gray[0, 0] = 255  # white = edit without alpha
    assert mask_to_array(Image.fromarray(gray, "L"))[0, 0] == 255 and mask_to_array(Image.fromarray(gray, "L")).sum() == 255


def test_transparent_input_becomes_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb_array(rgba).tolist() == [[[255, 255, 255]] * 2] * 2


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_formats(fmt, pil):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    decoded = Image.open(io.BytesIO(encode_image(image, fmt, 80)))
    assert decoded.format == pil and decoded.size == (48, 32)


def test_png_is_lossless_and_written_with_the_fast_zlib_level():
    """The client waits for this encoding: zlib's fastest levels (its header's FLEVEL 0 = levels 0-1), never 6."""
    import struct
    import zlib

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    data = encode_image(image, "png", 10)  # output_compression does not apply to png
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))
    offset, idat = 8, b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        if kind == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    assert idat[1] >> 6 == 0, f"zlib FLEVEL {idat[1] >> 6}"  # 2 would be Pillow's default level 6
    assert zlib.decompress(idat)  # a whole zlib stream
