"""Decoding uploads safely, masks, encoding."""

import base64
import io
import platform
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen_image_server import images
from qwen_image_server.errors import InvalidImage
from qwen_image_server.images import decode_base64_image, encode_image, encode_png, mask_to_array, open_image, to_rgb_array


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
    # as clients write it too: broken into lines (the base64 tool, encodebytes), and in base64url's alphabet
    assert decode_base64_image(base64.encodebytes(raw).decode(), "image") == raw
    assert decode_base64_image("data:image/png;base64," + base64.encodebytes(raw).decode().replace("\n", "\r\n"), "x") == raw
    noisy = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    url_safe = base64.urlsafe_b64encode(noisy).decode()
    assert url_safe != base64.b64encode(noisy).decode() and decode_base64_image(url_safe, "image") == noisy
    with pytest.raises(InvalidImage, match="not valid base64"):
        decode_base64_image(encoded[:-5] + "!" + encoded[-4:], "image")
    with pytest.raises(InvalidImage, match="is a URL, not base64 or a data URL"):
        decode_base64_image("https://example.com/x.png", "image")


def test_mask_conventions():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[1:3, 1:3, 3] = 0  # transparent = edit (OpenAI)
    assert mask_to_array(Image.fromarray(rgba, "RGBA")).tolist() == np.where(rgba[:, :, 3] == 0, 255, 0).tolist()
    gray = np.zeros((4, 4), np.uint8)
    gray[0, 0] = 255  # white = edit without alpha
    assert mask_to_array(Image.fromarray(gray, "L"))[0, 0] == 255 and mask_to_array(Image.fromarray(gray, "L")).sum() == 255


def test_sixteen_bit_grayscale_is_read_as_a_browser_shows_it():
    """A 16-bit grayscale PNG (Pillow's I;16) was converted by clipping every value above 255: the image read as
    white, and a mask's grays as white (edited). Its values are scaled to 8 bits instead, for images and masks."""
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    data = _png(Image.fromarray(gradient))  # uint16: mode I;16
    decoded = open_image(data, "image", 10**6)
    assert decoded.mode == "L"
    rgb = to_rgb_array(decoded)
    assert rgb.shape == (4, 256, 3) and np.array_equal(rgb[..., 0], (gradient >> 8).astype(np.uint8))
    band = np.full((8, 8), 20000, np.uint16)  # a 30% gray: not edited
    band[:, 4:] = 60000  # a light gray: edited
    mask = mask_to_array(open_image(_png(Image.fromarray(band)), "mask", 10**6))
    assert mask[:, :4].max() == 0 and mask[:, 4:].min() == 255
    as_int = Image.fromarray(gradient.astype(np.int32))  # mode I: how older Pillows open a 16-bit gray PNG
    assert np.array_equal(to_rgb_array(images.eight_bit(as_int))[..., 0], (gradient >> 8).astype(np.uint8))


def test_a_damaged_exif_block_is_ignored_without_a_warning_in_the_log():
    """Pillow warns "Corrupt EXIF data..." through ``warnings``, which printed it raw into the server's log."""
    import warnings

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + bytes(22)  # its first directory far past the block's end
    damaged = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = open_image(damaged, "image", 10**6)
    assert image.size == (16, 8) and [str(w.message) for w in caught] == []


def test_transparent_input_becomes_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb_array(rgba).tolist() == [[[255, 255, 255]] * 2] * 2


def _keyed_png(mode: str, key, pixels: np.ndarray) -> Image.Image:
    """A PNG whose transparency is a colour key (tRNS without an alpha channel), read back as an upload is."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG", transparency=key)
    return open_image(buffer.getvalue(), "mask", 10**6)


@pytest.mark.parametrize("mode,key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_a_colour_keyed_png_is_transparent_where_its_key_is(mode, key):
    """PNG's tRNS chunk makes one colour of an RGB or grey image transparent (browsers and editors show it so): as a
    mask it marks where to edit, as an image it becomes white there, as an alpha channel would."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[2:6, 2:6] = 255  # white centre, black (the key: transparent) around it
    mask = _keyed_png(mode, key, pixels)
    assert images.mask_has_alpha(mask)
    edit = mask_to_array(mask) == 255
    assert edit[0, 0] and not edit[3, 3] and edit.sum() == 64 - 16
    rgb = to_rgb_array(mask)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[3, 3].tolist() == [255, 255, 255]
    assert not images.mask_has_alpha(Image.new(mode, (2, 2)))


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_formats(fmt, pil):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    decoded = Image.open(io.BytesIO(encode_image(image, fmt, 80)))
    assert decoded.format == pil and decoded.size == (48, 32)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks (kind, data), each one's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, out = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        offset += 12 + length
    assert offset == len(data)
    return out


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (64, 80), (33, 257)])
def test_png_is_exact_valid_and_written_fast(backend, shape):
    """The server's own PNG writer: Pillow reads back the same pixels; the chunks, the zlib stream (its Adler-32)
    and the Up filter of every row are valid; the deflate level is one of zlib's fast ones (FLEVEL 0-1, never 6)."""
    rng = np.random.default_rng(sum(shape))
    height, width = shape
    smooth = (np.add.outer(np.arange(height), np.arange(width))[..., None] * [1, 2, 3]) % 256
    for pixels in (rng.integers(0, 256, (*shape, 3)), smooth, np.full((*shape, 3), 255)):
        array = pixels.astype(np.uint8)
        data = encode_png(array, deflate=None if backend == "isal" else zlib)
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (width, height)
        assert np.array_equal(np.asarray(decoded), array)
        kinds = _chunks(data)
        assert [kind for kind, _ in kinds] == [b"IHDR", b"IDAT", b"IEND"]
        assert kinds[0][1] == struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        idat = kinds[1][1]
        assert idat[1] >> 6 <= 1, f"zlib FLEVEL {idat[1] >> 6}"  # 2 would be Pillow's default level 6
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width * 3 + 1)  # checks the Adler-32
        assert (rows[:, 0] == 2).all()
        unfiltered = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint64) % 256  # Up: each row adds the one above
        assert np.array_equal(unfiltered.reshape(height, width, 3), array)


def test_png_responses_use_the_fast_deflate_and_ignore_output_compression():
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):  # where pyproject.toml installs isal
        assert images._deflate.__name__ == "isal.isal_zlib"  # the dependency is installed and in use
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    data = encode_image(image, "png", 10)  # output_compression does not apply to png
    assert data == encode_png(np.asarray(image))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))
    rgba = image.convert("RGBA")
    assert encode_image(rgba, "png") == data  # results are RGB
