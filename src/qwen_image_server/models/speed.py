"""Applying a run profile's speed settings to a loaded pipeline: attention backend, FP8 or 4-bit, batched CFG.

``apply_speed_settings`` runs once after loading (in ``PipelineRunner.__init__``); what
it reports (``SpeedSettings.info``) goes out with the worker's ``ready`` message and
shows on ``/ready``, so that what really runs (e.g. FP8 kept off by the start-up probe)
is visible. ``SpeedSettings.call(pipe)`` wraps each pipeline call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import fp8
from .attention import apply_attention_backend
from .cfg_batch import CfgBatching, apply_cfg_batch
from .profile import RunProfile


class SpeedSettings:
    """What ``apply_speed_settings`` set up on one pipeline."""

    def __init__(self, info: dict, cfg: CfgBatching | None):
        self.info = info
        self.cfg = cfg

    @contextlib.contextmanager
    def call(self, pipe) -> Iterator[None]:
        """Per-call state of the settings (batched CFG's recorded prompt encodings)."""
        if self.cfg is None:
            yield
            return
        with self.cfg.call(pipe):
            yield


def apply_speed_settings(pipe, profile: RunProfile, device: str, dtype: torch.dtype, model: str) -> SpeedSettings:
    """Set the attention backend, quantize (FP8 or 4-bit) and install batched CFG as ``profile`` asks.

    The attention backend comes first (a backend that cannot run here fails the load
    before anything is converted); batched CFG last, as it needs to know whether the
    backend takes an attention mask.
    """
    transformer = pipe.transformer
    attention = apply_attention_backend(transformer, profile.attention_backend, device, dtype, model)
    info: dict = {"attention": attention.summary()}
    if profile.quantize == "fp8":
        info["quantize"] = fp8.apply_fp8(transformer, device, dtype)
    elif profile.quantize == "int4":
        from .int4 import apply_int4
        from .memory_modes import OFFLOADED

        keep_on = "cpu" if "transformer" in OFFLOADED.get(profile.offload, ()) else None
        info["quantize"] = apply_int4(transformer, device, dtype, keep_on)
    cfg = apply_cfg_batch(transformer, profile.cfg_batch, device, attention.takes_mask, split=profile.offload != "sequential")
    if cfg is not None:
        info["cfg_batch"] = cfg.summary()
    return SpeedSettings(info, cfg)
