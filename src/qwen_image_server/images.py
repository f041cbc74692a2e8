"""Image bytes in and out: decoding uploads safely, encoding results in memory.

Shared by both sides of the pipe: the API process decodes uploads, the workers
encode results (and decode a shrunk mask edit's uploads again). Nothing here
writes to disk; stored images go through ``storage.py``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import types
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImage

#: An image's base64 data URL: the scheme and type in any case, parameters allowed before ``;base64`` (RFC 2397).
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+(?:;[^;,]*)*?;base64,", re.ASCII | re.IGNORECASE)
_OTHER_DATA_URL = re.compile(r"^data:([^;,]*)[;,]", re.ASCII | re.IGNORECASE)
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: The only decoders uploads reach (Pillow would otherwise try every format it knows: BMP, TIFF, PCX...).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


_URL_SAFE = str.maketrans("-_", "+/")


def is_url(value: str) -> bool:
    """Whether an image value is an http(s) URL (in any case) rather than base64 or a data URL."""
    return value.lstrip()[:8].lower().startswith(("http://", "https://"))


def decode_base64_image(value: str, param: str, not_base64_hint: str = "") -> bytes:
    """Bytes of a base64 string or ``data:image/...;base64,`` URL (line breaks and base64url's ``-`` and ``_`` taken
    too); other URLs are refused. ``not_base64_hint`` ends the message of a value that is not base64 (where it came
    from, what to send instead)."""
    value = value.strip()
    if is_url(value):  # fetched by the service, where allowed (serving/fetch.py)
        raise InvalidImage(f"'{param}' is a URL, not base64 or a data URL", param=param)
    value = _DATA_URL.sub("", value, count=1)
    other = _OTHER_DATA_URL.match(value)
    if other:
        kind = other.group(1).lower() or "no media type"
        if kind.startswith("image/"):  # an image, but not as base64 (RFC 2397's percent-encoded form)
            raise InvalidImage(f"'{param}' is a data URL of {kind} without ';base64': send data:{kind};base64,...", param=param)
        raise InvalidImage(
            f"'{param}' is a data URL of {kind}, not of an image: send a data:image/png, data:image/jpeg or data:image/webp URL",
            param=param,
        )
    if any(space in value for space in ("\n", "\r", " ", "\t")):
        value = "".join(value.split())  # MIME base64 (the base64 tool, encodebytes) breaks its lines every 76 characters
    if "-" in value or "_" in value:
        value = value.translate(_URL_SAFE)  # base64url's alphabet (RFC 4648, section 5)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"'{param}' is not valid base64 or a base64 data URL{not_base64_hint}", param=param) from None


def open_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully, refusing anything that is not an image or is too large. An EXIF orientation (a phone's
    photo taken sideways) is applied, as browsers show the image."""
    if not data:
        raise InvalidImage(f"'{param}' is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data...": printed raw into the log
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(
                    f"'{param}' is {width}x{height}, more than the {max_pixels} pixels this server accepts", param=param
                )
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own limit, before its size is read
        raise InvalidImage(f"'{param}' has more than the {max_pixels} pixels this server accepts", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage(f"'{param}' is not a decodable image (PNG, JPEG or WebP)", param=param) from None
    return eight_bit(_upright(image))


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (a PNG: Pillow's ``I;16`` modes, or ``I`` in older Pillows) as 8-bit ``L`` (``LA`` with
    a transparent colour: its tRNS chunk, which ``L`` would lose), its values scaled as a browser shows them; any other
    image as it is. Pillow's own conversions clip every value above 255, so such an image read as white, and a mask's
    grays as edited."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image, dtype=np.int32)
    gray = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # 2-D uint8: mode L
    key = image.info.get("transparency")
    if isinstance(key, int):  # a tRNS colour key (16-bit): its pixels, exactly, stay transparent
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; the same image, not a copy, when it says nothing to do (most
    uploads: a copy of each would double the memory of decoding). A damaged EXIF block is ignored rather than
    refusing an image that decodes (and Pillow's warnings about it stay out of the server's log)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data...", printed raw into the log
            if image.getexif().get(0x0112, 1) in (1, None):  # 0x0112: Orientation; 1: as stored
                return image
            return ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises several kinds on odd EXIF data
        return image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of ``image``; transparent parts become white (an alpha channel, or a PNG's transparent colour
    or palette entries: its tRNS chunk)."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def mask_has_alpha(mask: Image.Image) -> bool:
    """Whether a mask's transparency marks where to edit (else its white does): an alpha channel, or transparent
    colours or palette entries (a PNG's tRNS chunk, which browsers and image editors show as transparent)."""
    return mask.has_transparency_data


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """A repaint mask (255 = repaint) from an OpenAI-style mask.

    With an alpha channel, fully transparent pixels mark where to edit (OpenAI's
    convention). Without one, white pixels mark it (diffusers' convention).
    """
    if mask_has_alpha(mask):
        alpha = np.array(mask.convert("RGBA"), dtype=np.uint8)[:, :, 3]
        return np.where(alpha == 0, 255, 0).astype(np.uint8)
    gray = np.array(mask.convert("L"), dtype=np.uint8)
    return np.where(gray >= 128, 255, 0).astype(np.uint8)


def full_size_inpaint(source: tuple[bytes, bytes]) -> tuple[Image.Image, Image.Image]:
    """The original image (RGB) and repaint mask (L) of a shrunk mask edit, decoded again from the uploads."""
    image_data, mask_data = source
    unlimited = 2**62  # the API process has already checked these uploads against its limits
    image = Image.fromarray(to_rgb_array(open_image(image_data, "image", unlimited)))
    mask = Image.fromarray(mask_to_array(open_image(mask_data, "mask", unlimited)))
    return image, mask


_deflate: types.ModuleType
try:  # ISA-L's deflate (the isal package, a dependency): 6-18x faster than Pillow's PNG writer, see encode_png
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover  (an install without it still writes PNGs, with the standard zlib)
    _deflate = zlib

#: Deflate level of PNG responses (0-9 in zlib's terms): fast rather than small, see ``encode_png``.
PNG_DEFLATE_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = _deflate.crc32(data, _deflate.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(rgb: np.ndarray, deflate: types.ModuleType | None = None) -> bytes:
    """An 8-bit RGB PNG of an ``(height, width, 3)`` uint8 array.

    The client waits for this after the pipeline, so it is written for speed: every row
    has PNG's "Up" filter (the byte above subtracted, one numpy operation for the whole
    image) and the data is deflated at level 1 by ISA-L (``isal``; the standard ``zlib``
    when it is missing, or as ``deflate``). On photo-like 1024x1024 images on this
    project's 2-core machine: 10-11 ms against 73-111 ms for Pillow's writer at level 1
    (its default level 6 took 0.37-0.63 s), for files up to 6% larger than Pillow's at
    level 1.
    """
    lib = deflate or _deflate
    height, width, _ = rgb.shape
    rows = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up; the first row's "above" is zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    compressor = lib.compressobj(PNG_DEFLATE_LEVEL, lib.DEFLATED, 15)  # the zlib container: header and Adler-32
    data = compressor.compress(filtered) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filter set 0, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def encode_image(image: Image.Image, output_format: str, compression: int = 100) -> bytes:
    """Encode ``image`` as png (``encode_png``), jpeg or webp in memory.

    ``compression`` follows OpenAI's ``output_compression`` (0-100, 100 = best
    quality) for jpeg and webp; png is lossless and ignores it.
    """
    image = image.convert("RGB")
    if output_format == "png":
        return encode_png(np.asarray(image))
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=max(1, min(compression, 95)))
    else:
        image.save(buffer, format="WEBP", quality=max(1, compression))
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
