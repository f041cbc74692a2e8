"""Qwen-Image's VAE on still images, faster than diffusers runs it and with the same results.

**2-D convolutions for one frame.** The VAE (``AutoencoderKLQwenImage``) is a video VAE.
Each ``QwenImageCausalConv3d`` pads the time axis in front with ``kernel_t - 1`` frames
(zeros, or the features of earlier frames it cached) and convolves in 3-D. An image is
one frame with nothing cached: the padded input is ``kernel_t - 1`` frames of zeros and
the frame itself, so of a 3x3x3 kernel only the last time slice ever meets a non-zero
value. That convolution is exactly a 2-D convolution of the frame with that slice: a
third of the multiply-adds, no padded copy of the input (three frames where one is
real), and on CPUs PyTorch's fast 2-D kernels instead of its slow 3-D path. Measured by
``bench/vae_fast.py`` with the full-size VAE at 512x512 on a 2-core CPU (float32):
decode and encode both 2x as fast.

**RMS norms on CPUs.** ``QwenImageRMS_norm`` normalises over the channel axis with
``F.normalize``, whose norm over a non-innermost axis PyTorch's CPU build computes
slowly when channels are few: 320 ms against 14 ms for the same result written as a
sum of squares, on a 4-channel 1664x928 feature map (1.25x at 96 channels). On a CPU
the norm is computed that way; on other devices diffusers' code runs as it is.

``prepare_vae`` installs both on a loaded VAE as a per-layer ``forward`` that takes the
fast route where it applies and the layer's own code for anything else (videos, cached
frames, other devices). Results differ from diffusers' only in the order of float
additions. It runs as the VAE is loaded, before any offload hook wraps the layers'
``forward``.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Set on a layer given its fast ``forward``, so that a VAE shared by two models is prepared once.
MARK = "_qis_fast_forward"


def _eligible(conv: torch.nn.Conv3d) -> bool:
    """A causal convolution whose single-frame output is one 2-D convolution: stride and dilation 1 in time,
    exactly ``kernel_t - 1`` padded frames in front (so one input frame gives one output frame), and the same
    zero padding on both sides of each spatial axis (what ``conv2d``'s ``padding`` does)."""
    pad = getattr(conv, "_padding", None)
    if not isinstance(pad, tuple) or len(pad) != 6:
        return False
    return (
        conv.stride[0] == 1
        and conv.dilation[0] == 1
        and pad[0] == pad[1]
        and pad[2] == pad[3]
        and pad[4] == conv.kernel_size[0] - 1
        and pad[5] == 0
        and conv.padding_mode == "zeros"
    )


def _single_frame_conv(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    if cache_x is not None or x.dim() != 5 or x.shape[2] != 1:
        return type(self).forward(self, x, cache_x)
    out = F.conv2d(
        x[:, :, 0],
        self.weight[:, :, -1],
        self.bias,
        stride=self.stride[1:],
        padding=(self._padding[2], self._padding[0]),
        dilation=self.dilation[1:],
        groups=self.groups,
    )
    return out.unsqueeze(2)


def _cpu_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":  # installed on channel-first norms only
        return type(self).forward(self, x)
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # F.normalize: x / max(|x|, 1e-12), the norm over the channels
    normalized = (x32 * torch.rsqrt(x32.square().sum(dim=1, keepdim=True).clamp_min(1e-24))).to(x.dtype)
    return normalized * self.scale * self.gamma + self.bias


def _install(module: torch.nn.Module, forward) -> None:
    if getattr(module, MARK, False):
        return
    if hasattr(module, "_diffusers_hook") or hasattr(module, "_hf_hook"):
        # The fast routes read the layer's weight and bias themselves: installed over a hook (FP8 storage's cast,
        # an offload's move) they would bypass it and compute with FP8 or CPU weights
        raise RuntimeError(f"{type(module).__name__}: the VAE's fast routes go in before any hook on its layers")
    module.forward = types.MethodType(forward, module)
    setattr(module, MARK, True)


def prepare_vae(vae: torch.nn.Module) -> dict[str, int]:
    """Give ``vae``'s layers the fast routes above; returns how many layers got each (``conv2d``, ``cpu_norm``).

    A VAE of another family (no Qwen-Image layers) is left as it is (zero counts). Calling it
    again on the same VAE (a component shared by two models) changes nothing.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d, QwenImageRMS_norm

    counts = {"conv2d": 0, "cpu_norm": 0}
    for module in vae.modules():
        if isinstance(module, QwenImageCausalConv3d) and _eligible(module):
            _install(module, _single_frame_conv)
            counts["conv2d"] += 1
        elif isinstance(module, QwenImageRMS_norm) and module.channel_first:
            _install(module, _cpu_rms_norm)
            counts["cpu_norm"] += 1
    if any(counts.values()):
        log.debug("vae: %d causal 3-D convolutions run images in 2-D, %d RMS norms have a CPU route", *counts.values())
    return counts
