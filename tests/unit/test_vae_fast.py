"""The VAE's fast routes for images: the same images as diffusers runs it, without a 3-D convolution or a
``F.normalize`` on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from torch.overrides import TorchFunctionMode

from qwen_image_server.jobs import Job
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model
from qwen_image_server.models.vae_fast import prepare_vae


class CountConvs(TorchFunctionMode):
    """Counts the 2-D and 3-D convolutions and the ``F.normalize`` calls run inside it."""

    def __init__(self):
        super().__init__()
        self.calls = {"conv2d": 0, "conv3d": 0, "normalize": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.calls:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def vaes(tiny_t2i):
    """The tiny model's VAE as diffusers runs it, and a copy on the fast routes."""
    original = AutoencoderKLQwenImage.from_pretrained(tiny_t2i / "vae").eval()
    routed = copy.deepcopy(original)
    return original, routed, prepare_vae(routed)


def _run(fn):
    with torch.inference_mode(), CountConvs() as counter:
        out = fn()
    return out, counter.calls


def test_every_causal_convolution_but_the_strided_ones_and_every_norm_take_the_routes(vaes):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d, QwenImageRMS_norm

    original, routed, counts = vaes
    causal = [m for m in original.modules() if isinstance(m, QwenImageCausalConv3d)]
    strided = [m for m in causal if m.stride[0] != 1]
    assert strided, "the tiny VAE downsamples time: it has strided causal convolutions, which stay 3-D"
    assert counts["conv2d"] == len(causal) - len(strided) > 0
    assert counts["cpu_norm"] == sum(isinstance(m, QwenImageRMS_norm) for m in original.modules()) > 0


def test_decoding_one_frame_gives_the_same_image_without_3d_convolutions(vaes):
    original, routed, _ = vaes
    latent = torch.randn(2, 4, 1, 12, 20, generator=torch.Generator().manual_seed(3))
    expected, calls_3d = _run(lambda: original.decode(latent, return_dict=False)[0])
    actual, calls_2d = _run(lambda: routed.decode(latent, return_dict=False)[0])
    assert calls_3d["conv3d"] > 0 and calls_2d["conv3d"] == 0
    assert calls_3d["normalize"] > 0 and calls_2d["normalize"] == 0
    assert actual.shape == expected.shape == (2, 3, 1, 96, 160)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert float(expected.std()) > 0.01, "the comparison is over a real image, not a constant"


def test_encoding_one_frame_gives_the_same_latents_without_3d_convolutions(vaes):
    original, routed, _ = vaes
    image = torch.rand(1, 3, 1, 64, 96, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expected, calls_3d = _run(lambda: original.encode(image).latent_dist.mode())
    actual, calls_2d = _run(lambda: routed.encode(image).latent_dist.mode())
    assert calls_3d["conv3d"] > 0 and calls_2d["conv3d"] == 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_videos_still_run_the_3d_code_with_its_cache(vaes):
    """Frames after the first carry features of the frames before (cache_x): only the first frame is 2-D."""
    original, routed, _ = vaes
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected, _ = _run(lambda: original.decode(latent, return_dict=False)[0])
    actual, calls = _run(lambda: routed.decode(latent, return_dict=False)[0])
    assert calls["conv3d"] > 0 and calls["conv2d"] > 0
    assert actual.shape == expected.shape and actual.shape[2] > 1
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_half_precision_norms_are_computed_in_float32_as_diffusers_does(vaes):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

    original, routed, _ = vaes
    norm, fast = (
        copy.deepcopy(next(m for m in vae.modules() if isinstance(m, QwenImageRMS_norm))).bfloat16() for vae in (original, routed)
    )
    x = (torch.randn(1, norm.gamma.shape[0], 1, 16, 16, generator=torch.Generator().manual_seed(6)) * 300).bfloat16()
    expected, _ = _run(lambda: norm(x))
    actual, calls = _run(lambda: fast(x))
    assert calls["normalize"] == 0 and actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected)


def test_preparing_twice_changes_nothing(vaes):
    """A VAE shared by two models of one process is prepared once."""
    _, routed, counts = vaes
    first = routed.decoder.conv_in.forward
    assert prepare_vae(routed) == counts
    assert routed.decoder.conv_in.forward == first


def test_the_routes_refuse_to_go_in_over_a_hook(vaes):
    """The fast routes read a layer's weight themselves: installed over FP8 storage's casting hook they computed with
    float8 weights (``Input type (float) and bias type (Float8_e4m3fn)``), over an offload's hook with weights left on
    the CPU. The server prepares the VAE before any hook exists; a later change that did otherwise must fail loudly."""
    from diffusers.hooks import apply_layerwise_casting

    hooked = copy.deepcopy(vaes[0])
    apply_layerwise_casting(hooked, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="fast routes go in before any hook on its layers"):
        prepare_vae(hooked)


def test_another_vae_family_is_left_alone():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    assert prepare_vae(vae) == {"conv2d": 0, "cpu_norm": 0}


def test_the_server_loads_its_vae_on_the_routes(tiny_t2i):
    """A worker's pipeline decodes its images without a 3-D convolution, and the image is diffusers' own."""
    runner = PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu", warm=False)
    job = Job(mode="generate", prompt="a red cube", seeds=[5], width=128, height=96, num_inference_steps=2)
    image, calls = _run(lambda: runner.run(job)[0])
    assert calls["conv3d"] == 0 and calls["normalize"] == 0 and calls["conv2d"] > 0
    plain = AutoencoderKLQwenImage.from_pretrained(tiny_t2i / "vae").eval()
    runner.pipe.vae = plain  # the same weights as diffusers runs them
    reference, calls = _run(lambda: runner.run(job)[0])
    assert calls["conv3d"] > 0
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int))
    assert image.size == (128, 96) and difference.max() <= 1


def test_vae_tiling_decodes_in_tiles_for_its_model_only(tiny_t2i):
    """``vae_tiling=on`` decodes a 512x512 image as overlapping 256x256 tiles (nine decoder passes) and switches
    tiling off again after the call, so that a model sharing the VAE without the setting decodes it whole."""
    from dataclasses import replace

    from qwen_image_server.models.profile import RunProfile

    spec = resolve_model(str(tiny_t2i))
    runner = PipelineRunner(replace(spec, profile=RunProfile(vae_tiling="on")), device="cpu", warm=False)
    passes: list[tuple] = []
    runner.pipe.vae.decoder.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape[-2:])))
    job = Job(mode="generate", prompt="a red cube", seeds=[5], width=512, height=512, num_inference_steps=2)
    tiled = runner.run(job)[0]
    # tiles start every 192 px (24 latents) and are at most 256 px (32 latents): the last ones are cut by the edge
    assert tiled.size == (512, 512) and len(passes) == 9 and max(passes) == (32, 32), passes
    assert runner.pipe.vae.use_tiling is False, "switched for the call only"
    passes.clear()
    runner.spec = spec  # the same VAE for a model without the setting
    whole = runner.run(job)[0]
    assert passes == [(64, 64)] and whole.size == (512, 512)
    assert np.asarray(whole).shape == np.asarray(tiled).shape
