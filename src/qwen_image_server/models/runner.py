"""Loading a Qwen-Image pipeline on one device and running jobs with it.

A ``PipelineRunner`` belongs to exactly one owner (a worker process, or a
benchmark in-process): diffusers pipelines keep per-call state on ``self``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from ..errors import TaskCancelled, is_out_of_memory
from ..jobs import Job
from .compile import compile_and_warm, logged_compiles, warm_eager
from .determinism import apply_determinism, job_rng
from .lora_runtime import LoraSet
from .mask_blend import MaskBlend, inpaint_finish
from .memory import MemoryMode, build_random, load_pipeline, make_variant
from .previews import Previews, to_pil_images
from .processor import load_processor
from .prompt_cache import PromptCache
from .shared import ComponentCache
from .spec import ModelSpec
from .speed import apply_speed_settings
from .step_cache import StepCache, parse_policy
from .vae_tiling import vae_tiling
from .working_memory import DIFFUSERS_CONDITION_AREA, DIFFUSERS_EDIT_AREA, EDIT_PROMPT_TOKENS, GENERATION_TEXT_TOKENS

log = logging.getLogger(__name__)

_EDIT_MODULES = ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_plus", "pipeline_qwenimage_edit_inpaint")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on GPUs and float32 on CPU unless told otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


@contextlib.contextmanager
def edit_areas(edit_area: int | None, condition_area: int | None) -> Iterator[None]:
    """Make the edit pipelines resize inputs to other areas than diffusers' ~1 MP (and 384² for the VL encoder).

    The pipelines read these from module globals at call time, so they are swapped
    for the duration of one call. Used for models whose folder asks for it (the tiny
    models); real models keep diffusers' values.
    """
    if not edit_area and not condition_area:
        yield
        return
    import importlib

    mapping = {
        DIFFUSERS_EDIT_AREA: edit_area or DIFFUSERS_EDIT_AREA,
        DIFFUSERS_CONDITION_AREA: condition_area or DIFFUSERS_CONDITION_AREA,
    }
    saved: list[tuple[Any, str, object]] = []
    try:
        for name in _EDIT_MODULES:
            module: Any = importlib.import_module(f"diffusers.pipelines.qwenimage.{name}")
            original = module.calculate_dimensions

            def patched(target_area, ratio, _original=original):
                return _original(mapping.get(target_area, target_area), ratio)

            saved.append((module, "calculate_dimensions", original))
            module.calculate_dimensions = patched
            for const in ("VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"):
                if hasattr(module, const):
                    saved.append((module, const, getattr(module, const)))
                    setattr(module, const, mapping[getattr(module, const)])
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _no_loading_bars() -> None:
    """No progress bars while components and weights load ("Loading pipeline components", "Loading weights"): in a
    server's log (a worker's or a Ray replica's) they are noise, one line per redraw."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class PipelineRunner:
    """Owns one loaded pipeline (and variants built from its components) on one device."""

    def __init__(
        self, spec: ModelSpec, device: str = "auto", dtype: str = "auto", shared: ComponentCache | None = None, warm: bool = True
    ):
        """Load ``spec`` on ``device`` and warm it (``warm_up``) unless ``warm`` is False (then the caller does: a
        worker loads under its device's load lock and warms after releasing it)."""
        self.spec = spec
        _no_loading_bars()
        self.device = resolve_device(device)
        self.determinism = apply_determinism(spec.profile.deterministic)  # before this process's first cuBLAS call
        self.dtype = resolve_dtype(dtype, self.device)
        kwargs: dict = {"dtype": self.dtype}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.can_edit and not spec.is_random:
            kwargs["processor"] = self._load_processor()
        started = time.perf_counter()
        self.memory = MemoryMode.for_spec(spec, self.device)
        if spec.is_random:  # a packaged architecture, built on the device with random weights
            self.pipe = build_random(spec, self.memory, self.dtype, shared)
        else:
            # each component straight to where it lives; with ``shared``, a text encoder or VAE another model of
            # this process loaded from the same files is reused
            self.pipe = load_pipeline(spec, self.memory, self.dtype, kwargs, shared)
        self.pipe.set_progress_bar_config(disable=True)
        self.loras = LoraSet(self.pipe, spec.profile, self.dtype, self.memory.home("transformer"))  # before compiling
        self.speed = apply_speed_settings(self.pipe, spec.profile, self.device, self.dtype, spec.id)
        self._inpaint: Any = None  # diffusers pipelines, built on first use
        self._img2img: Any = None
        self.step_cache = StepCache(self.pipe.transformer)  # shared by the img2img and inpaint forms
        self.prompt_cache = PromptCache()  # prompt encodings, shared by the img2img and inpaint forms
        self.prompt_cache.install(self.pipe)
        # the last run's counters: transformer_calls, cached_calls (step cache), prompt_encodings, prompt_cache_hits
        self.last_stats: dict[str, int] = {}
        self.last_prompt_tokens = 0  # of the last run's prompt, as its pipeline read it
        log.info(
            "loaded %s (%s) on %s as %s in %.1fs, memory %s",
            spec.id,
            spec.pipeline_class,
            self.device,
            self.dtype,
            time.perf_counter() - started,
            self.memory.summary(),
        )
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Before the worker reports ready: with ``compile``, compile the transformer and run the warm set; eager on a
        GPU, one short run (``warm_eager``)."""
        if self.spec.profile.compile:
            compile_and_warm(self)
        elif self.device.startswith("cuda"):
            warm_eager(self)

    def _load_processor(self):
        """The edit pipelines' processor, loaded here for folders and hub ids alike.

        A hub id's ``processor/`` files are fetched (or, offline, found in the hub
        cache) at the model's revision; ``load_processor`` then picks transformers'
        standard loading where torchvision works and the image-only one elsewhere.
        """
        return load_processor(processor_folder(self.spec))

    def count_tokens(self, text: str) -> int:
        """Text tokens of ``text`` with the model's own tokenizer."""
        return len(self.pipe.tokenizer(text).input_ids)

    def _read_prompts(self, job: Job) -> tuple[str, str | None]:
        """The prompt and negative prompt as ``job``'s pipeline reads them (an edit's cut to ``EDIT_PROMPT_TOKENS``),
        and the prompt tokens it reads kept in ``last_prompt_tokens`` (``usage``). On the run's thread: the tokenizer
        is not to be called from two threads at once (the pipeline sets its truncation)."""
        negative = (job.negative_prompt or " ") if job.true_cfg_scale > 1 else None
        if job.mode not in ("edit", "inpaint"):  # diffusers cuts the embeddings, past the template's start
            self.last_prompt_tokens = min(self.count_tokens(job.prompt), GENERATION_TEXT_TOKENS)
            return job.prompt, negative
        prompt, self.last_prompt_tokens = self._cut(job.prompt, "prompt")
        if negative is not None:
            negative, _ = self._cut(negative, "negative prompt")
        return prompt, negative

    def _cut(self, text: str, what: str) -> tuple[str, int]:
        """``text`` cut to its first ``EDIT_PROMPT_TOKENS`` tokens, and the tokens kept."""
        ids = self.pipe.tokenizer(text).input_ids
        if len(ids) <= EDIT_PROMPT_TOKENS:
            return text, len(ids)
        log.info("%s: the %s's %d tokens are cut to its first %d", self.spec.id, what, len(ids), EDIT_PROMPT_TOKENS)
        # no half character at its end
        return self.pipe.tokenizer.decode(ids[:EDIT_PROMPT_TOKENS]).rstrip("\ufffd"), EDIT_PROMPT_TOKENS

    @property
    def img2img_pipe(self):
        """The variation (img2img) form of a text-to-image model, sharing its loaded components."""
        if self._img2img is None:
            from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline

            self._img2img = make_variant(QwenImageImg2ImgPipeline, self.pipe, self.memory)
            self.prompt_cache.install(self._img2img)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    @property
    def inpaint_pipe(self):
        """The mask-edit variant, sharing this pipeline's loaded components (no second copy of the weights)."""
        if self._inpaint is None:
            from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint import QwenImageEditInpaintPipeline

            self._inpaint = make_variant(QwenImageEditInpaintPipeline, self.pipe, self.memory)
            self.prompt_cache.install(self._inpaint)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def run(
        self,
        job: Job,
        should_stop: Callable[[], bool] = lambda: False,
        on_partial: Callable[[int, int, Image.Image], None] | None = None,
    ) -> list[Image.Image]:
        """Run one job and return its images in seed order.

        Raises ``TaskCancelled`` as soon as ``should_stop()`` is true at a step's end.
        With ``job.partial_images`` and ``on_partial``, previews are handed to
        ``on_partial(image_index, partial_index, image)`` during denoising.
        """
        if should_stop():
            raise TaskCancelled()
        preview: Previews | None = None
        blend: MaskBlend | None = None  # a mask with several images
        freed = [False]  # the step cache's state, held from the first transformer call, was freed after the last step

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if should_stop():
                raise TaskCancelled()
            if step == getattr(pipe, "_num_timesteps", 0) - 1:
                # The last step is done: the step cache's state (TaylorSeer keeps every block's attention outputs,
                # gigabytes at large sizes) is freed before the VAE decodes instead of after (working_memory.step_cache_bytes).
                self.step_cache.reset()
                freed[0] = True
            if blend is not None:
                callback_kwargs["latents"] = blend.at_step_end(pipe, step, callback_kwargs["latents"])
            if preview is not None:
                preview.at_step_end(pipe, step, callback_kwargs["latents"])
            return callback_kwargs

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        prompt, negative_prompt = self._read_prompts(job)
        kwargs: dict = dict(
            prompt=prompt,
            num_inference_steps=job.num_inference_steps,
            true_cfg_scale=job.true_cfg_scale,
            negative_prompt=negative_prompt,
            generator=generators,
            num_images_per_prompt=job.n,
            callback_on_step_end=on_step_end,
            output_type="pt",  # made 8-bit where the VAE ran: to_pil_images
        )
        pipe = self.pipe
        finish: Callable[[Image.Image], Image.Image] = functools.partial(fit_to_job, job=job)  # image -> the client's
        if job.mode == "generate":
            kwargs.update(width=job.width, height=job.height)
        elif job.mode == "variation":
            pipe = self.img2img_pipe
            kwargs.update(image=Image.fromarray(job.images[0]), width=job.width, height=job.height, strength=job.strength)
        else:
            images = [Image.fromarray(array) for array in job.images]
            if job.mode == "inpaint":
                if job.mask is None:
                    raise ValueError("an inpaint job needs a mask")
                mask = Image.fromarray(job.mask)
                finish = inpaint_finish(job, images[0], mask)
                if len(images) > 1:  # several images: the edit-plus call, its latents blended (mask_blend.py)
                    assert job.width is not None and job.height is not None  # the service sizes it
                    blend = MaskBlend(images[0], mask, job.seeds, job.width, job.height)
                    kwargs.update(image=images, width=job.width, height=job.height)
                else:
                    pipe = self.inpaint_pipe
                    kwargs.update(image=images[0], mask_image=mask, strength=1.0)
            else:
                kwargs.update(image=images if self.spec.multi_image else images[0], width=job.width, height=job.height)
        options = self.spec.options
        policy = parse_policy(job.cache if job.cache is not None else self.spec.profile.cache)
        self.last_stats = {}
        encoded, reused = self.prompt_cache.encoded, self.prompt_cache.reused
        with (
            edit_areas(options.get("edit_area"), options.get("condition_area")),
            self.loras.applied(pipe, job.lora, job.lora_scale),
            job_rng(pipe, generators, job.seeds[0], self.device),
            torch.inference_mode(),
            self.step_cache.run(policy, job.denoising_steps) as stats,
            vae_tiling(pipe.vae, self.spec.profile.vae_tiling == "on"),
            self.speed.call(pipe),
            logged_compiles(self.spec, job),
        ):
            if blend is not None:
                blend.prepare(pipe)
            if job.partial_images and on_partial:
                preview = Previews(job, on_partial, finish)
                preview.attach(pipe)
            try:
                result = to_pil_images(pipe(**kwargs).images)
            except Exception as exc:
                # A call that did not finish (stopped, out of memory) skipped diffusers' last step: under model
                # offload its last component stayed on the GPU, and the next call would hold two there at once.
                with contextlib.suppress(Exception):
                    pipe.maybe_free_model_hooks()
                if is_out_of_memory(exc):
                    held = stats["transformer_calls"] > 0 and not freed[0]  # denoising, with the state in memory
                    state = _state_bytes(pipe.transformer, policy, job)
                    advice = _step_cache_advice(policy, state)
                    exc.qis_advice = advice  # type: ignore[attr-defined]
                    if held and advice and job.cache is not None:
                        own = parse_policy(self.spec.profile.cache)  # what the memory plan counted for this model
                        if state > _state_bytes(pipe.transformer, own, job):
                            # the request's own full taylorseer keeps more than the plan allowed for: a 400 on its field
                            exc.qis_param = "cache"  # type: ignore[attr-defined]
                raise
            finally:
                if preview is not None:
                    preview.detach()
        stats["prompt_encodings"] = self.prompt_cache.encoded - encoded
        stats["prompt_cache_hits"] = self.prompt_cache.reused - reused
        self.last_stats = stats
        return [finish(image) for image in result]


def _state_bytes(transformer, policy, job: Job) -> int:
    """About what ``policy``'s step cache keeps between steps for ``job`` (``working_memory.step_cache_bytes``); 0 without."""
    if policy is None:
        return 0
    from .working_memory import step_cache_bytes

    config = transformer.config
    width, height = job.width or 1024, job.height or 1024
    # an edit's input images join the sequence (a mask edit's too, of several images: the edit-plus call)
    inputs = len(job.images or []) if job.mode == "edit" or len(job.images or []) > 1 else 0
    image_tokens = (-(-width // 16)) * (-(-height // 16)) * (1 + inputs)
    return step_cache_bytes(
        policy.canonical(),
        image_tokens,
        GENERATION_TEXT_TOKENS,
        config.num_layers,
        config.num_attention_heads * config.attention_head_dim,
        transformer.dtype.itemsize,
        job.n,
    )


def _step_cache_advice(policy, state: int) -> str:
    """For a run that ran out of memory with the full ``taylorseer`` step cache: what its state held (about: ``state``
    bytes, ``_state_bytes``), and the policies that keep far less; "" for any other policy."""
    if policy is None or policy.name != "taylorseer" or policy["lite"]:
        return ""
    from .footprint import human

    return (
        f"; its step cache, taylorseer, keeps every block's attention outputs between steps (about {human(state)} "
        "here): cache=taylorseer:lite=true or cache=fbcache keeps far less"
    )


def processor_folder(spec: ModelSpec) -> Path:
    """The local ``processor/`` folder of a model: in its folder, or in the hub cache for a hub id."""
    if not spec.is_hub:
        return Path(spec.source) / "processor"
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=["processor/*"])) / "processor"


def fit_to_job(image: Image.Image, job: Job) -> Image.Image:
    """Crop or resize a rendered image to the job's output size, when it has one."""
    if job.out_width is None or job.out_height is None:
        return image
    size = (job.out_width, job.out_height)
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
