"""Limits shared by requests and start-up checks: the rules a ``size`` follows, the bounds of the numbers a LoRA's
defaults share with a request's fields, and the size and steps of a request that gives none (and the steps of each
OpenAI ``quality``, with the quality a run is echoed as). Plain functions, no settings: ``config.py`` and ``models/``
check configured values with them, ``serving/sizes.py`` checks requests."""

from __future__ import annotations

import re
from typing import Literal, get_args

#: A request's ``size`` (and a configured default or warmed size): ``WIDTHxHEIGHT`` in ASCII digits (int() would read
#: other scripts' digits too), with spaces around and ``X`` or ``×`` allowed.
SIZE_PATTERN = re.compile(r"^\s*([0-9]{1,5})\s*[xX×]\s*([0-9]{1,5})\s*$")
#: Sides are multiples of this (Qwen-Image's 16-pixel latent patches).
SIZE_MULTIPLE = 16
#: The published models' own defaults: the side of the square a request without a size gets, and its steps (the
#: server's limits may lower both: ``config.Settings``).
DEFAULT_SIDE = 1024
DEFAULT_STEPS = 50
#: What a request's ``lora_scale`` and ``true_cfg_scale`` accept (protocol/images.py): a LoRA's configured scale and
#: preset true_cfg_scale, which are those fields' defaults, are held to the same bounds.
LORA_SCALE_LIMITS = (0.0, 2.0)
TRUE_CFG_SCALE_LIMITS = (0.0, 20.0)

#: Steps used for each OpenAI ``quality`` value when ``num_inference_steps`` is not given.
QUALITY_STEPS: dict[str, int | None] = {
    "low": 20, "medium": 30, "standard": 30, "high": 50, "hd": 50, "xhigh": 75, "max": 100,
    "auto": None,  # the model's default
}  # fmt: skip
#: OpenAI's quality levels, the values a response may echo (its SDK's type), fewest steps first.
QualityLevel = Literal["low", "medium", "high", "xhigh", "max"]
QUALITY_LEVELS: tuple[QualityLevel, ...] = get_args(QualityLevel)


def quality_of(steps: int) -> QualityLevel:
    """The quality a run of ``steps`` steps is echoed as, as OpenAI echoes the quality used: the highest of its
    levels whose steps (``QUALITY_STEPS``) the run reached; ``low`` below them all."""
    reached = [level for level in QUALITY_LEVELS if (QUALITY_STEPS[level] or 0) <= steps]
    return reached[-1] if reached else QUALITY_LEVELS[0]


def side_problem(width: int, height: int, lo: int, hi: int) -> str | None:
    """Why ``width``x``height`` is not a size requests may ask for under the side limits ``lo``..``hi``, or None."""
    for side in (width, height):
        if not lo <= side <= hi:
            return f"width and height must be between {lo} and {hi}, got {width}x{height}"
        if side % SIZE_MULTIPLE:
            return f"width and height must be multiples of {SIZE_MULTIPLE}, got {width}x{height}"
    return None


def fitting_side(side: int, lo: int, hi: int) -> int | None:
    """``side`` (a multiple of ``SIZE_MULTIPLE``) brought within ``lo``..``hi``: the multiple there nearest to it, or
    None when that range holds none."""
    first, last = -(-lo // SIZE_MULTIPLE) * SIZE_MULTIPLE, hi // SIZE_MULTIPLE * SIZE_MULTIPLE
    if first > last:
        return None
    return min(max(side // SIZE_MULTIPLE * SIZE_MULTIPLE, first), last)


def size_problem(size: object, lo: int, hi: int) -> str | None:
    """Why ``size`` (a configured default or warmed size) is not a ``size`` requests may give under the side limits
    ``lo``..``hi``, or None: the rules of requests, so that a configured size is always a valid request value."""
    match = SIZE_PATTERN.match(size) if isinstance(size, str) else None
    if not match:
        return f"must be WIDTHxHEIGHT (like 1024x1024), got {size!r}"
    return side_problem(int(match.group(1)), int(match.group(2)), lo, hi)


def request_defaults(lo: int, hi: int, max_steps: int, size: str | None, steps: int | None) -> tuple[str, int]:
    """The size and steps of a request that gives none, under the side limits ``lo``..``hi`` and ``max_steps``: the
    configured ``size`` and ``steps`` (None: not configured), which must be values a request may give, else the
    published models' 1024x1024 and 50 brought within the limits. ``ValueError`` names the setting at fault."""
    if lo > hi:
        raise ValueError(f"QIS_MIN_IMAGE_SIDE={lo} must not exceed QIS_MAX_IMAGE_SIDE={hi}")
    side = fitting_side(DEFAULT_SIDE, lo, hi)
    if side is None:
        raise ValueError(
            f"QIS_MIN_IMAGE_SIDE={lo} to QIS_MAX_IMAGE_SIDE={hi} holds no multiple of {SIZE_MULTIPLE}: no request size "
            "would be valid"
        )
    if size is not None and (problem := size_problem(size, lo, hi)):
        raise ValueError(f"QIS_DEFAULT_SIZE: {problem} (the size of requests that give none)")
    if steps is not None and not 2 <= steps <= max_steps:  # as a request's num_inference_steps
        raise ValueError(
            f"QIS_DEFAULT_STEPS={steps} must be from 2 to QIS_MAX_STEPS={max_steps} (the steps of requests that give none)"
        )
    return size if size is not None else f"{side}x{side}", steps if steps is not None else min(DEFAULT_STEPS, max_steps)
