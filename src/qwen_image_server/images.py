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
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidImage

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: The only decoders uploads reach (Pillow would otherwise try every format it knows: BMP, TIFF, PCX...).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_base64_image(value: str, param: str) -> bytes:
    """Bytes of a base64 string or ``data:image/...;base64,`` URL; other URLs are refused."""
    value = value.strip()
    if value.startswith(("http://", "https://")):
        raise InvalidImage("image URLs are not fetched; send the image as base64 or a data URL", param=param)
    value = _DATA_URL.sub("", value, count=1)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"'{param}' is not valid base64 or a base64 data URL", param=param) from None


def open_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully, refusing anything that is not an image or is too large."""
    if not data:
        raise InvalidImage(f"'{param}' is empty", param=param)
    try:
        with warnings.catch_warnings():
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
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        raise InvalidImage(f"'{param}' is not a decodable image (PNG, JPEG or WebP)", param=param) from None
    return image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of ``image``; transparent parts become white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """A repaint mask (255 = repaint) from an OpenAI-style mask.

    With an alpha channel, fully transparent pixels mark where to edit (OpenAI's
    convention). Without one, white pixels mark it (diffusers' convention).
    """
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
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


#: zlib level of PNG responses (0-9): fast rather than small, see ``encode_image``.
PNG_COMPRESS_LEVEL = 1


def encode_image(image: Image.Image, output_format: str, compression: int = 100) -> bytes:
    """Encode ``image`` as png, jpeg or webp in memory.

    ``compression`` follows OpenAI's ``output_compression`` (0-100, 100 = best
    quality) for jpeg and webp; png is lossless and ignores it.

    PNG uses zlib level ``PNG_COMPRESS_LEVEL``: the client waits for this encoding after
    the pipeline, and on photo-like 1024x1024 images level 6 (Pillow's default) took
    0.37-0.63 s on this project's CPU, level 1 0.07-0.09 s, for files about 17% larger.
    """
    buffer = io.BytesIO()
    image = image.convert("RGB")
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=max(1, min(compression, 95)))
    else:
        image.save(buffer, format="WEBP", quality=max(1, compression))
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
