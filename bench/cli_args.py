"""Argument types the benchmark scripts share: a bad value is refused by argparse (exit 2, the flag named) before
anything starts, rather than a traceback after a model, a server or the GPU check."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def at_least(low: int, high: int | None = None):
    """An int flag's type: a whole number of at least ``low`` (and at most ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is above {high}")
        return value

    parse.__name__ = f"a whole number of at least {low}"  # how argparse names the type in its message
    return parse


#: The limits a server a benchmark starts is given (``SERVED_LIMITS``, as its environment), so that it serves every
#: size and step count the flags take (``served_size``, ``request_steps``); its largest side stays the default.
SERVED_MIN_SIDE, SERVED_SIDE, SERVED_MAX_STEPS = 16, 2048, 1000
SERVED_LIMITS = {"QIS_MIN_IMAGE_SIDE": str(SERVED_MIN_SIDE), "QIS_MAX_STEPS": str(SERVED_MAX_STEPS)}

#: ``num_inference_steps`` of a request to a server a benchmark starts.
request_steps = at_least(2, SERVED_MAX_STEPS)


positive = at_least(1)
not_negative = at_least(0)


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as ``(width, height)``; ValueError when it is not one."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT (such as 512x512)")
    return int(match[1]), int(match[2])


def image_size(text: str) -> str:
    """``WIDTHxHEIGHT``, both multiples of 16 and at least 16 (the server's and the VAE's steps)."""
    try:
        width, height = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be multiples of 16, at least 16")
    return f"{width}x{height}"


def served_size(text: str) -> str:
    """``image_size`` of a request to a server a benchmark starts: at most the server's default largest side."""
    size = image_size(text)
    if max(parse_size(size)) > SERVED_SIDE:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be at most {SERVED_SIDE}")
    return size


def device_name(text: str) -> str:
    """A torch device a benchmark can run on: ``cpu``, ``cuda`` or ``cuda:N`` (``mps``, ``xpu`` likewise)."""
    if not re.fullmatch(r"cpu|mps|(cuda|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N")
    return text


def writable_file(text: str) -> Path:
    """A file to write at the end of a run: its folder must exist now (not found out after the whole run)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder")
    return path
