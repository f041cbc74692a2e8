"""Previews of a running pipeline (``partial_images``): the denoising estimate decoded at chosen steps, and the
8-bit images a pipeline's tensors become (previews and final images alike)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from PIL import Image

from ..jobs import Job


def _decode_beside_the_transformer(vae, latents):
    """The VAE's decode of a preview, in the middle of denoising. Under ``--offload model`` the VAE's offload hook
    (accelerate's) first sends the component before it in the chain, the transformer, back to the CPU, and the next
    step brings it back: about 41 GB each way per preview for full-size Qwen-Image. For a preview the transformer
    stays; the VAE comes to the device for it and goes back to where it was."""
    hook = getattr(vae, "_hf_hook", None)
    previous = getattr(hook, "prev_module_hook", None)
    if hook is None or previous is None:
        return vae.decode(latents, return_dict=False)[0]
    where = next(vae.parameters()).device
    hook.prev_module_hook = None
    try:
        return vae.decode(latents, return_dict=False)[0]
    finally:
        hook.prev_module_hook = previous
        with contextlib.suppress(Exception):  # after a decode that failed (a broken GPU), its error is the one to see
            vae.to(where)


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """A pipeline's ``output_type="pt"`` images (a batch of CHW values in [0, 1]) as 8-bit RGB images, made 8-bit
    on the device they are on: from a GPU 3 bytes a pixel reach the host instead of the 12 of float32 that
    diffusers' ``"pil"`` output copies and converts on the CPU. The same arithmetic (float32, x255, rounding half
    to even), so the same pixels."""
    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def preview_steps(num_steps: int, partial_images: int) -> list[int]:
    """Evenly spaced step indices (0-based) after which previews are made; never the last step."""
    picks = [round((j + 1) * num_steps / (partial_images + 1)) - 1 for j in range(partial_images)]
    return sorted({min(max(p, 0), num_steps - 2) for p in picks if num_steps >= 2})


class Previews:
    """Decodes previews from the denoising estimate while a pipeline runs.

    Flow matching moves ``x`` along a velocity ``v`` with ``x0 = x - sigma * v``.
    A forward pre-hook on the transformer records each step's input latents; at
    the step's end the scheduler has moved them to ``x'`` at ``sigma'``, so
    ``v = (x' - x) / (sigma' - sigma)`` and ``x0 = x' - sigma' * v`` is the
    current estimate of the final image, decoded with the pipeline's own VAE.
    """

    def __init__(
        self, job: Job, on_partial: Callable[[int, int, Image.Image], None], finish: Callable[[Image.Image], Image.Image]
    ):
        self.job = job
        self.on_partial = on_partial
        self.finish = finish  # as the final image is made: the client's size (and a mask edit's pasted original)
        self.steps: list[int] = []
        self.step_input = None
        self.img_shape = None
        self._hook = None

    def attach(self, pipe) -> None:
        def record(module, args, kwargs):
            self.step_input = kwargs.get("hidden_states")
            self.img_shape = kwargs.get("img_shapes")[0][0]

        self._hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def at_step_end(self, pipe, step: int, latents) -> None:
        if not self.steps:
            self.steps = preview_steps(pipe.num_timesteps, self.job.partial_images)
        if step not in self.steps or self.step_input is None:
            return
        scheduler = pipe.scheduler
        sigma, sigma_next = scheduler.sigmas[scheduler.step_index - 1], scheduler.sigmas[scheduler.step_index]
        x = self.step_input[:, : latents.shape[1]].to(latents.dtype)
        velocity = (latents - x) / (sigma_next - sigma)
        estimate = latents - sigma_next * velocity
        _, h, w = self.img_shape
        scale = pipe.vae_scale_factor * 2
        unpacked = pipe._unpack_latents(estimate, h * scale, w * scale, pipe.vae_scale_factor).to(pipe.vae.dtype)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(unpacked)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(unpacked)
        full_size = (unpacked.shape[-1] * pipe.vae_scale_factor, unpacked.shape[-2] * pipe.vae_scale_factor)
        latents = unpacked * std + mean
        if self.job.preview_scale < 1:  # a smaller decode (the VAE's work grows with the pixels), enlarged after
            smaller = torch.nn.functional.interpolate(latents[:, :, 0], scale_factor=self.job.preview_scale, mode="area")
            latents = smaller.unsqueeze(2)
        decoded = _decode_beside_the_transformer(pipe.vae, latents)[:, :, 0]
        images = to_pil_images(pipe.image_processor.postprocess(decoded, output_type="pt"))
        partial_index = self.steps.index(step)
        for index, image in enumerate(images):
            if image.size != full_size:
                image = image.resize(full_size, Image.Resampling.BILINEAR)
            self.on_partial(index, partial_index, self.finish(image))
