"""A mask with several images: an edit-plus model's call that repaints only where the mask says, in the first image.

diffusers has a mask-edit pipeline for one image (``QwenImageEditInpaintPipeline``,
which ``runner.py`` uses for a mask with one image) and none for several. OpenAI's
edits take a mask with several images and apply it to the first. This does what the
one-image pipeline does inside its loop, from the outside, at each step's end (the
pipelines' ``callback_on_step_end``): the latents outside the mask are replaced by the
first image's own, noised to the next step's level, so that the model paints the masked
region in keeping with the rest; after the last step they are the first image's
exactly. The runner then pastes the original pixels back outside the mask, as for one
image (``keep_unmasked``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image

from ..jobs import Job


class MaskBlend:
    """The first image's latents, the mask at latent size and the noise, made before the call (``prepare``: the VAE
    encodes the image there, as the pipeline encodes its inputs, before the denoising loop), then blended into the
    call's latents at each step's end (``at_step_end``)."""

    def __init__(self, image: Image.Image, mask: Image.Image, seeds: list[int], width: int, height: int):
        self.image, self.mask, self.seeds = image, mask, seeds
        self.width, self.height = width, height
        self.known: torch.Tensor | None = None  # the first image's packed latents, one row per output image
        self.keep: torch.Tensor | None = None  # 1 where the model paints, 0 where the first image is kept
        self.noise: torch.Tensor | None = None

    def prepare(self, pipe) -> None:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.utils.torch_utils import randn_tensor

        multiple = pipe.vae_scale_factor * 2
        width, height = self.width // multiple * multiple, self.height // multiple * multiple  # as the pipeline rounds
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        channels = pipe.transformer.config.in_channels // 4
        rows, cols = 2 * (height // multiple), 2 * (width // multiple)  # the latents' size, before packing
        batch = len(self.seeds)
        pixels = pipe.image_processor.preprocess(self.image, height, width).unsqueeze(2)
        pixels = pixels.to(device=device, dtype=pipe.vae.dtype)
        latents = pipe._encode_vae_image(pixels, generator=None).to(dtype)  # the pipeline's own encoding (its mode)
        self.known = pipe._pack_latents(latents, 1, channels, rows, cols).repeat(batch, 1, 1)
        masks = VaeImageProcessor(vae_scale_factor=multiple, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        mask = masks.preprocess(self.mask, height, width)  # 1 where white: where the model paints
        mask = torch.nn.functional.interpolate(mask, size=(rows, cols)).to(device=device, dtype=dtype)
        self.keep = pipe._pack_latents(mask.repeat(1, channels, 1, 1), 1, channels, rows, cols).repeat(batch, 1, 1)
        # the noise the call starts from (the same draws from the same seeds), as the one-image pipeline noises the
        # kept latents with the noise it started from
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]
        noise = randn_tensor((batch, channels, 1, rows, cols), generator=generators, device=device, dtype=dtype)
        self.noise = pipe._pack_latents(noise, batch, channels, rows, cols)

    def at_step_end(self, pipe, step: int, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` after step ``step`` with the first image's outside the mask, noised to the next step's level."""
        assert self.known is not None and self.keep is not None and self.noise is not None, "prepare() first"
        timesteps = pipe.scheduler.timesteps
        known = self.known
        if step < len(timesteps) - 1:
            known = pipe.scheduler.scale_noise(known, timesteps[step + 1 : step + 2], self.noise)
        return (1 - self.keep) * known + self.keep * latents


def inpaint_finish(job: Job, image: Image.Image, mask: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """What makes a mask edit's rendering (its previews too) the image the client gets: at the input's size (or the
    job's), the input pasted back outside the mask."""
    if job.inpaint_source is not None:  # the inputs were shrunk: paste back the uploaded original
        from ..images import full_size_inpaint

        image, mask = full_size_inpaint(job.inpaint_source)
    size = (job.out_width, job.out_height) if job.out_width and job.out_height else image.size
    return functools.partial(keep_unmasked, original=image, mask=mask, size=size)


def keep_unmasked(result: Image.Image, original: Image.Image, mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask edit at ``size`` (the input's unless another was asked for), the original pasted back
    outside the mask: at the input's size, only the masked pixels change."""

    def at_size(image: Image.Image, resample) -> Image.Image:
        return image if image.size == size else image.resize(size, resample)

    return Image.composite(
        at_size(result.convert("RGB"), Image.Resampling.LANCZOS),
        at_size(original.convert("RGB"), Image.Resampling.LANCZOS),
        at_size(mask.convert("L"), Image.Resampling.NEAREST),
    )
