"""Decoding uploads in the API process, with bounded memory.

Three rules keep a burst of large uploads from filling the API process:

- ``DecodeGate``: the model's admission is checked before any decoding (and again
  once a decoding slot is free), and at most ``max_concurrent_decodes`` requests
  decode at the same time; the others wait holding only their compressed bytes.
- Inputs are shrunk right after decoding to at most ``INPUT_AREA_FACTOR`` times the
  pixels the pipeline works at (never enlarged, aspect kept), so a queued job holds
  megapixels, not the 16 of a 4096² upload.
- Mask edits whose inputs were shrunk keep the uploaded image and mask bytes
  (``Job.inpaint_source``); the worker decodes them again (``images.full_size_inpaint``) to
  paste the original back at its own size outside the mask.

A markup (OpenAI's ``markup``: a transparent image drawn over the first input to guide the
edit) is drawn at the first image's full size, before that image is shrunk.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..config_urls import parse_prefix
from ..errors import InvalidImage
from ..images import mask_has_alpha, mask_to_array, open_image, to_rgb_array
from .fetch import ImageFetcher

if TYPE_CHECKING:
    from ..config import Settings

#: Input images may be at most this much longer than wide (or wider than long).
MAX_INPUT_ASPECT = 8
#: Inputs are kept at up to this many times the pixels the pipeline resizes them to.
INPUT_AREA_FACTOR = 2


@dataclass
class Upload:
    """One uploaded file: its bytes and the form or JSON field it came in; an image given by URL has its ``url`` and
    no bytes until it is fetched (``Inputs.decode``)."""

    data: bytes
    param: str
    url: str | None = None


@dataclass
class Decoded:
    """Decoded (and possibly shrunk) inputs of one request."""

    arrays: list[np.ndarray]  # HxWx3 uint8
    mask: np.ndarray | None  # HxW uint8 (255: repaint), the same size as arrays[0]
    inpaint_source: tuple[bytes, bytes] | None = None  # image and mask uploads, kept when a mask edit was shrunk


def fit_area(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """``width``x``height`` scaled down to at most ``max_pixels`` pixels, aspect kept; never enlarged."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` (a smaller one) with Lanczos; alpha is kept for ``to_rgb_array``'s white background."""
    if image.size == size:
        return image
    if image.has_transparency_data and image.mode not in ("RGBA", "LA"):  # a palette's or a tRNS colour's alpha
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A repaint mask brought to ``size``: a pixel is repainted when any pixel it covers was (thin strokes survive)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    small = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.BOX))
    return np.where(small > 0, 255, 0).astype(np.uint8)


def draw_markup(image: Image.Image, markup: Upload, max_input_pixels: int) -> Image.Image:
    """``image`` (an upload's, opened) with the markup drawn over it, as RGB (transparent parts of ``image`` white,
    as ``to_rgb_array`` makes them). The markup must be the image's size (both as shown: EXIF orientation applied)
    and be transparent somewhere: it is drawn over the image, which shows through where it is transparent."""
    drawn = open_image(markup.data, markup.param, max_input_pixels)
    if drawn.size != image.size:
        raise InvalidImage(
            f"markup is {drawn.size[0]}x{drawn.size[1]} but the first image is {image.size[0]}x{image.size[1]}; "
            "they must be the same size",
            param=markup.param,
        )
    overlay = drawn if drawn.mode == "RGBA" else drawn.convert("RGBA")
    del drawn
    if overlay.getchannel("A").getextrema()[0] == 255:
        raise InvalidImage(
            "markup has no transparent pixels: it is drawn over the first image, which shows through where the "
            "markup is transparent (send a PNG or WebP with an alpha channel)",
            param=markup.param,
        )
    # few full-size copies at a time (the decoding slot's memory: README, Admission): drawn in place, each freed
    if image.has_transparency_data:  # transparent parts of the image are white, as to_rgb_array makes them
        base = Image.new("RGBA", image.size, (255, 255, 255, 255))
        base.alpha_composite(image.convert("RGBA"))
    else:
        base = image.convert("RGBA")
    base.alpha_composite(overlay)
    del overlay
    return base.convert("RGB")


def decode_inputs(
    images: list[Upload], mask: Upload | None, max_input_pixels: int, keep_pixels: int, markup: Upload | None = None
) -> Decoded:
    """Decode uploads and shrink each to at most ``keep_pixels`` pixels; ``markup`` is drawn over the first image
    first (the service never sends it with a mask).

    Runs in a thread. One full-size image is decoded at a time: each is shrunk
    before the next one is opened.
    """
    arrays: list[np.ndarray] = []
    first_size: tuple[int, int] | None = None
    for upload in images:
        image = open_image(upload.data, upload.param, max_input_pixels)
        width, height = image.size
        if max(width, height) > MAX_INPUT_ASPECT * min(width, height):
            raise InvalidImage(
                f"'{upload.param}' is {width}x{height}; its sides may differ by at most {MAX_INPUT_ASPECT}x", param=upload.param
            )
        if markup is not None and first_size is None:
            image = draw_markup(image, markup, max_input_pixels)
        first_size = first_size or image.size
        arrays.append(to_rgb_array(shrink(image, fit_area(width, height, keep_pixels))))
        del image
    if mask is None:
        return Decoded(arrays, None)
    mask_image = open_image(mask.data, mask.param, max_input_pixels)
    if mask_image.size != first_size:
        image_width, image_height = first_size or (0, 0)  # the service sends a mask only with an image
        raise InvalidImage(
            f"mask is {mask_image.size[0]}x{mask_image.size[1]} but the image is {image_width}x{image_height}; "
            "they must be the same size",
            param="mask",
        )
    has_alpha = mask_has_alpha(mask_image)
    mask_array = mask_to_array(mask_image)
    del mask_image
    if not mask_array.any():
        marks = "no transparent pixels" if has_alpha else "no white pixels: a mask without alpha edits where it is white"
        raise InvalidImage(f"mask marks nothing to edit ({marks})", param="mask")
    small = (arrays[0].shape[1], arrays[0].shape[0])
    if small == first_size:
        return Decoded(arrays, mask_array)
    return Decoded(arrays, shrink_mask(mask_array, small), inpaint_source=(images[0].data, mask.data))


def default_decodes() -> int:
    """The default ``max_concurrent_decodes``: two per CPU core of this machine."""
    return 2 * (os.cpu_count() or 1)


class DecodeGate:
    """At most ``limit`` requests decode their uploads at once; admission is checked before and after waiting."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        # threads of its own: a decode, or a fetch waiting on a slow origin, takes none of the event loop's default
        # executor, which other work shares (and which has fewer threads than a many-core machine's slots)
        self._threads = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="qis-decode")

    async def decode(self, admit: Callable[[], None], work: Callable[[], Decoded]) -> Decoded:
        """``admit()`` (raises to refuse), wait for a slot, ``admit()`` again, then run ``work`` in a thread.

        The slot is freed when the decoding thread ends, even if the caller is
        cancelled earlier (a client that went away): threads cannot be stopped.
        """
        admit()
        await self._slots.acquire()
        try:
            admit()
            future = asyncio.get_running_loop().run_in_executor(self._threads, work)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(future)


class Inputs:
    """A request's input images into arrays: those given by URL checked as soon as the request is read and fetched
    in its decoding slot (``fetch.py``), then decoded and shrunk (``decode_inputs``) behind the ``DecodeGate``."""

    def __init__(self, settings: Settings, observe: Callable[[str, int], None] | None = None):
        self.gate = DecodeGate(settings.max_concurrent_decodes or default_decodes())
        self.max_input_pixels = settings.max_input_pixels
        prefixes = [parse_prefix(prefix) for prefix in settings.image_url_prefixes]
        self.fetcher = ImageFetcher(prefixes, settings.image_url_timeout, settings.max_upload_bytes, observe)

    def check_urls(self, *uploads: Upload | None) -> None:
        """Refuse (400) an image URL that may not be fetched, before the request waits for anything."""
        for upload in uploads:
            if upload is not None and upload.url is not None:
                try:
                    self.fetcher.check(upload.url, upload.param)
                except InvalidImage:
                    self.fetcher.observe("refused", 0)
                    raise

    async def decode(
        self, admit: Callable[[], None], images: list[Upload], mask: Upload | None, keep: int, markup: Upload | None = None
    ) -> Decoded:
        """The uploads fetched where given by URL, decoded and shrunk to ``keep`` pixels each, once ``admit()`` lets
        the request in (raising to refuse it: before any fetching or decoding)."""
        self.check_urls(*images, mask, markup)
        cancelled = threading.Event()  # the request went away (its client, or the server's shutdown): fetch no more

        def work() -> Decoded:
            by_url = [u for u in (*images, mask, markup) if u is not None and u.url is not None and not u.data]
            fetched = self.fetcher.fetch_all([(u.url or "", u.param) for u in by_url], cancelled)
            for upload, data in zip(by_url, fetched, strict=True):
                upload.data = data
            return decode_inputs(images, mask, self.max_input_pixels, keep, markup)

        try:
            return await self.gate.decode(admit, work)
        except asyncio.CancelledError:
            cancelled.set()
            raise
