"""Sizes: what a request asks for (``size``, ``width``/``height``, ``aspect_ratio``), checked against the server's
side limits, and the size arithmetic of Qwen-Image (16-pixel latent patches, edit areas)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Settings
from ..errors import InvalidRequest
from ..limits import SIZE_MULTIPLE, SIZE_PATTERN, fitting_side, side_problem
from ..protocol.images import ASPECT_RATIOS, _CommonRequest

__all__ = ["SIZE_MULTIPLE", "Size", "SizeRules", "parse_size", "patches", "scaled"]  # SIZE_MULTIPLE: from limits


@dataclass(frozen=True)
class Size:
    """The size a pipeline renders at, and the size returned (they differ only for seed 002's 4:3 and 3:4)."""

    width: int
    height: int
    out_width: int
    out_height: int


class SizeRules:
    """The server's side limits applied to requested sizes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def check_side(self, width: int, height: int, param: str) -> None:
        problem = side_problem(width, height, self.settings.min_image_side, self.settings.max_image_side)
        if problem:
            raise InvalidRequest(f"{param}: {problem}", param=param)

    def resolve(self, req: _CommonRequest, default: str | None) -> Size | None:
        """The requested size; ``default`` when none is asked for (None: the pipeline chooses). ``width``/``height``
        win over ``aspect_ratio``, which wins over ``size``; each one given must be valid, used or not (a malformed
        field is a 400 whatever else the request holds)."""
        given: list[Size] = []
        if req.width is not None or req.height is not None:
            if req.width is None or req.height is None:
                raise InvalidRequest("width and height must be given together", param="width" if req.width is None else "height")
            self.check_side(req.width, req.height, "width")
            given.append(Size(req.width, req.height, req.width, req.height))
        if req.aspect_ratio is not None:
            given.append(self._aspect_ratio(req.aspect_ratio))
        if req.size not in (None, "", "auto"):
            given.append(self._size(req.size, "size"))
        if given:
            return given[0]
        return None if default is None else self._size(default, "size")

    def _aspect_ratio(self, ratio: str) -> Size:
        if ratio not in ASPECT_RATIOS:
            raise InvalidRequest(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}", param="aspect_ratio")
        w, h = ASPECT_RATIOS[ratio]

        # The pipeline renders multiples of 16; 1140 is rendered as 1152 and center-cropped.
        def up(v: int) -> int:
            return math.ceil(v / SIZE_MULTIPLE) * SIZE_MULTIPLE

        self.check_side(up(w), up(h), "aspect_ratio")  # a server with lower side limits refuses the larger ratios
        return Size(up(w), up(h), w, h)

    def _size(self, size: str, param: str) -> Size:
        w, h = parse_size(size, param)
        self.check_side(w, h, param)
        return Size(w, h, w, h)

    def fit_sides(self, width: float, height: float) -> tuple[int, int]:
        """A size of ``width``:``height`` within the side limits: scaled as a whole (the aspect ratio kept) until
        both sides fit, each side then the multiple of 16 nearest it within the limits (``limits.fitting_side``).
        (Clamping each side alone turned a 4:3 input that came out below the least side into 9:8.)"""
        lo, hi = self.settings.min_image_side, self.settings.max_image_side
        scale = min(max(1.0, lo / min(width, height)), hi / max(width, height))
        w, h = (fitting_side(round(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE, lo, hi) for side in (width, height))
        assert w is not None and h is not None  # Settings refuses side limits that hold no multiple of 16
        return w, h

    def at_area(self, width: int, height: int, area: int) -> tuple[int, int]:
        """The size of ``width``:``height`` with about ``area`` pixels, within the side limits (``fit_sides``)."""
        ratio = width / height
        return self.fit_sides(math.sqrt(area * ratio), math.sqrt(area / ratio))


def parse_size(size: str, param: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as two integers (400 otherwise)."""
    match = SIZE_PATTERN.match(size)
    if not match:
        raise InvalidRequest(f"size must be 'auto' or WIDTHxHEIGHT (like 1024x1024), got {size!r}", param=param)
    return int(match.group(1)), int(match.group(2))


def patches(width: int, height: int) -> int:
    """Latent patches (16x16 pixels each) of an image: Qwen-Image's image tokens."""
    return math.ceil(width / SIZE_MULTIPLE) * math.ceil(height / SIZE_MULTIPLE)


def scaled(width: int, height: int, area: int) -> tuple[int, int]:
    """``width``x``height`` scaled to about ``area`` pixels, sides multiples of 32 (as the edit pipelines do)."""
    ratio = width / height
    w = round(math.sqrt(area * ratio) / 32) * 32
    h = round(w / ratio / 32) * 32
    return max(w, 32), max(h, 32)
