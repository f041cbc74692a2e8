"""From a validated request to a job, and from a job's result to an OpenAI response.

Knows the engine only through ``EngineClient``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..engine.base import EngineClient
from ..errors import InvalidRequest, ModelNotAvailable, StorageFailed, TooManyImages
from ..images import b64
from ..jobs import RUN_COUNTERS, EncodedImage, Job, JobResult, PartialImage
from ..limits import QUALITY_STEPS, quality_of
from ..models.lora import preset_for
from ..models.profile import LoraSpec
from ..models.spec import ModelSpec
from ..models.step_cache import CachePolicyError, compile_conflict, parse_policy
from ..protocol.images import EditRequest, GenerationRequest, VariationRequest, _CommonRequest
from ..protocol.responses import Echo, ImageData, ImagesResponse, InputTokensDetails, OutputTokensDetails, Usage
from ..storage import ImageStore, discard_later, in_store_thread
from .inputs import INPUT_AREA_FACTOR, Decoded, Inputs, Upload
from .rewrite import PromptRewriter
from .sizes import Size, SizeRules, parse_size, patches, scaled

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
MAX_UNKNOWN_FIELDS = 64


def log_safe(text: str, limit: int = 64) -> str:
    """Client-chosen text as one bounded, escaped log token (no newlines or control characters)."""
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    return escaped + ("..." if len(text) > limit else "")


@dataclass
class Prepared:
    """A validated request turned into a job, ready to run (or to stream)."""

    req: _CommonRequest
    spec: ModelSpec
    job: Job
    event: str  # image_generation / image_edit / image_variation: the streaming event prefix
    input_image_tokens: int


class ImageService:
    """Turns image requests into jobs on the engine and their results into responses."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        store: ImageStore,
        rewriter: PromptRewriter | None = None,
        observers: tuple[Callable[[Prepared, JobResult, dict], None], ...] = (),
        fetches: Callable[[str, int], None] | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.store = store
        self.rewriter = rewriter
        self.models = {spec.id: spec for spec in engine.models}
        #: Other names (``--model-alias``) → the model or LoRA id a request naming one runs as.
        self.aliases = {alias: name for spec in engine.models for alias, name in spec.aliases}
        #: LoRA ids: each runs on its base model's workers (``job.lora``) with its preset's defaults.
        self.loras: dict[str, tuple[ModelSpec, LoraSpec]] = {
            lora.name: (spec, lora) for spec in engine.models for lora in spec.profile.loras
        }
        #: Called with (prepared, result, stats) for every finished job, e.g. by the metrics (``api/metrics.py``).
        self.job_observers = observers
        self.inputs = Inputs(settings, fetches)  # decoding (and fetching) uploads; ``fetches(outcome, bytes)``: each URL
        self.sizes = SizeRules(settings)

    # --- models ------------------------------------------------------------------------
    def default_model(self, *, edit: bool = False, images: int = 1) -> ModelSpec | None:
        """The first served model that does the request's kind: for an edit of several ``images``, the first that
        edits several (an edit-plus model) where one is served."""
        suitable = [spec for spec in self.models.values() if (spec.can_edit if edit else spec.can_generate)]
        several = [spec for spec in suitable if spec.multi_image] if edit and images > 1 else []
        return next(iter(several or suitable), None)

    def health_model_id(self) -> str:
        spec = self.default_model() or self.default_model(edit=True)
        return spec.id if spec else ""

    def _run_as(self, requested: str) -> str:
        """The model or LoRA id a request naming ``requested`` runs as (an alias's target; else the name itself)."""
        return self.aliases.get(requested, requested)

    def _model(self, requested: str | None, *, edit: bool, images: int = 1, variation: bool = False) -> ModelSpec:
        what = "image edits" if edit else "variations (a text-to-image model makes them)" if variation else "image generation"
        if requested is None or requested == "":
            spec = self.default_model(edit=edit, images=images)
            if spec is None:
                raise InvalidRequest(f"No model on this server does {what}", param="model")
            return spec
        name = self._run_as(requested)
        spec = self.models.get(name) or (self.loras[name][0] if name in self.loras else None)
        if spec is None:
            raise ModelNotAvailable(requested)
        if edit and not spec.can_edit:
            raise InvalidRequest(f"Model {requested} does not do image edits; use an edit model", param="model")
        if not edit and not spec.can_generate:
            made = "variations are made by a text-to-image model" if variation else "use /v1/images/edits"
            raise InvalidRequest(f"Model {requested} is an edit model; {made}", param="model")
        return spec

    # --- request fields ----------------------------------------------------------------------
    def _check_common(self, req: _CommonRequest) -> None:
        s = self.settings
        extra = list((req.model_extra or {}).keys())
        if len(extra) > MAX_UNKNOWN_FIELDS:
            raise InvalidRequest(f"the request has {len(extra)} unknown fields; at most {MAX_UNKNOWN_FIELDS} are accepted")
        ignored = req.ignored_openai_fields()
        if extra or ignored:
            log.info("ignoring fields: %s", ", ".join(log_safe(name) for name in sorted(extra) + ignored))
        if len(req.prompt) > s.max_prompt_chars:
            raise InvalidRequest(f"prompt is longer than {s.max_prompt_chars} characters", param="prompt")
        if req.negative_prompt is not None and len(req.negative_prompt) > s.max_prompt_chars:
            raise InvalidRequest(f"negative_prompt is longer than {s.max_prompt_chars} characters", param="negative_prompt")
        if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
            raise InvalidRequest(f"seed + n - 1 must not exceed {MAX_SEED} (image i is made with seed + i)", param="seed")
        if req.n > s.max_n:
            raise InvalidRequest(f"n must be between 1 and {s.max_n}", param="n")
        if req.background == "transparent":
            raise InvalidRequest("background=transparent is not supported: Qwen-Image makes opaque images", param="background")
        if req.num_inference_steps is not None and req.num_inference_steps > s.max_steps:
            raise InvalidRequest(f"num_inference_steps must be between 2 and {s.max_steps}", param="num_inference_steps")

    def resolve_size(self, req: _CommonRequest, default: str | None) -> Size | None:
        """The requested size; ``default`` when none is asked for (None: the pipeline chooses)."""
        return self.sizes.resolve(req, default)

    def _steps(self, req: _CommonRequest, spec: ModelSpec, preset: dict) -> int:
        if req.num_inference_steps is not None:
            return req.num_inference_steps
        if "steps" in preset:  # what the LoRA is made for: ``quality`` does not change it
            return preset["steps"]
        steps = QUALITY_STEPS.get(req.quality or "auto")
        if steps:  # a client's hint: within the server's limit, like num_inference_steps
            return min(steps, self.settings.max_steps)
        return int(spec.options.get("default_steps", self.settings.default_steps))

    def _job(self, req: _CommonRequest, spec: ModelSpec, mode: str, size: Size | None) -> Job:
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        name = self._run_as(req.model) if req.model else None
        lora = name if name in self.loras else None
        preset = preset_for(spec.profile, lora)
        cfg = req.true_cfg_scale if req.true_cfg_scale is not None else req.guidance_scale
        cfg = preset.get("true_cfg_scale", self.settings.default_true_cfg_scale) if cfg is None else cfg
        return Job(
            mode=mode,  # type: ignore[arg-type]
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or " ",
            seeds=[seed + i for i in range(req.n)],
            width=size.width if size else None,
            height=size.height if size else None,
            out_width=size.out_width if size and (size.out_width, size.out_height) != (size.width, size.height) else None,
            out_height=size.out_height if size and (size.out_width, size.out_height) != (size.width, size.height) else None,
            num_inference_steps=self._steps(req, spec, preset),
            true_cfg_scale=float(cfg),
            output_format=req.output_format,
            output_compression=100 if req.output_compression is None else req.output_compression,
            partial_images=req.partial_images or 0 if req.stream else 0,
            preview_scale=self.settings.preview_scale,
            cache=self._cache(req, spec),
            lora=lora,
            lora_scale=self._lora_scale(req, spec, lora),
        )

    def _lora_scale(self, req: _CommonRequest, model: ModelSpec, lora: str | None) -> float | None:
        """The request's LoRA strength: only for a LoRA id whose adapter is swapped in per request (not fused)."""
        if req.lora_scale is None:
            return None
        if lora is None:  # the LoRA ids a request for this model could have named (a fused one's strength is fixed)
            names = ", ".join(name for name, (base, spec) in self.loras.items() if base.id == model.id and not spec.fuse)
            target = req.model or f"the default model ({model.id})"  # no model named: the one the request runs on
            which = f" ({names})" if names else f"; {model.id} has no LoRA whose strength a request may set"
            raise InvalidRequest(f"lora_scale applies to a LoRA model id, not to {target}{which}", param="lora_scale")
        spec = self.loras[lora][1]
        if spec.fuse:
            raise InvalidRequest(
                f"LoRA {lora} is fused into its base model's weights: its strength is fixed ({spec.scale:g})", param="lora_scale"
            )
        return req.lora_scale

    @staticmethod
    def _cache(req: _CommonRequest, spec: ModelSpec) -> str | None:
        """The request's step cache policy, canonical ("none": off), or None for the model's own."""
        if req.cache is None:
            return None
        try:
            policy = parse_policy(req.cache)
        except CachePolicyError as exc:
            raise InvalidRequest(f"cache: {exc}", param="cache") from None
        reason = compile_conflict(policy) if spec.profile.compile else None
        if reason:
            raise InvalidRequest(f"cache: model {spec.id} is compiled: {reason}", param="cache")
        return policy.canonical() if policy else "none"

    # --- preparing jobs ---------------------------------------------------------------------
    async def prepare_generation(self, req: GenerationRequest) -> Prepared:
        self._check_common(req)
        spec = self._model(req.model, edit=False)
        size = self.resolve_size(req, spec.options.get("default_size", self.settings.default_size))
        job = self._job(req, spec, "generate", size)
        self._admit(spec)
        return await self._prepared(req, spec, job, "image_generation", input_image_tokens=0)

    async def prepare_edit(
        self, req: EditRequest, images: list[Upload], mask: Upload | None, markup: Upload | None = None
    ) -> Prepared:
        self._check_common(req)
        spec = self._model(req.model, edit=True, images=len(images))
        if not images:
            raise InvalidRequest("image is required: send one file as 'image' (several as 'image[]')", param="image")
        if markup is not None and mask is not None:
            raise InvalidRequest("markup does not combine with a mask: send one of them", param="markup")
        if len(images) > 1 and not spec.multi_image:
            raise InvalidRequest(
                f"Model {spec.id} edits one image at a time; several images need an edit-plus model "
                "(Qwen-Image-Edit-2509 or 2511)",
                param="image",
            )
        if len(images) > self.settings.max_input_images:
            raise TooManyImages(f"at most {self.settings.max_input_images} images per request", param="image")
        size = self.resolve_size(req, None)
        edit_area = int(spec.options.get("edit_area", 1024 * 1024))
        decoded = await self._decode(spec, images, mask, INPUT_AREA_FACTOR * edit_area, markup)
        arrays = decoded.arrays
        job = self._job(req, spec, "inpaint" if mask else "edit", size)
        job.images = arrays
        if mask is not None:
            # The inpaint pipeline renders at its own size; the result comes back at the requested
            # size, or the input's, with the original kept outside the mask.
            job.mask, job.inpaint_source = decoded.mask, decoded.inpaint_source
            job.width = job.height = None
            if len(arrays) > 1:  # the edit-plus call, sized as the first image, whose mask it is (mask_blend.py)
                job.width, job.height = self.sizes.at_area(arrays[0].shape[1], arrays[0].shape[0], edit_area)
            if size is not None:
                job.out_width, job.out_height = size.out_width, size.out_height
        if size is None and mask is None:
            # The pipeline renders at the (last) input's aspect ratio and about its edit area; keep that
            # size within the server's side limits (a long, thin input would otherwise come back thinner).
            height, width = arrays[-1].shape[:2]
            w, h = scaled(width, height, edit_area)
            if self.sizes.fit_sides(w, h) != (w, h):  # scaled as a whole, from the input's own ratio
                job.width, job.height = self.sizes.at_area(width, height, edit_area)
        tokens = sum(patches(*scaled(a.shape[1], a.shape[0], edit_area)) for a in arrays)
        return await self._prepared(req, spec, job, "image_edit", input_image_tokens=tokens)

    async def prepare_variation(self, req: VariationRequest, image: Upload | None) -> Prepared:
        self._check_common(req)
        spec = self._model(req.model, edit=False, variation=True)
        if image is None:
            raise InvalidRequest("image is required: send the image to vary as 'image'", param="image")
        size = self.resolve_size(req, None)
        if size is None:
            dw, dh = parse_size(spec.options.get("default_size", self.settings.default_size), "size")
        area = size.width * size.height if size is not None else dw * dh  # the img2img pipeline resizes to the output
        arrays = (await self._decode(spec, [image], None, INPUT_AREA_FACTOR * area)).arrays
        height, width = arrays[0].shape[:2]
        if size is None:  # keep the input's aspect ratio at the model's default area, within the side limits
            w, h = self.sizes.at_area(width, height, dw * dh)
            size = Size(w, h, w, h)
        if not req.prompt.strip():  # a blank prompt is none: not echoed, no tokens
            no_cfg = req.true_cfg_scale is None and req.guidance_scale is None  # and nothing to guide towards
            req = req.model_copy(update={"prompt": "", **({"true_cfg_scale": 1.0} if no_cfg else {})})
        job = self._job(req, spec, "variation", size)
        job.images = arrays
        job.strength = req.strength
        return await self._prepared(req, spec, job, "image_variation", input_image_tokens=patches(size.width, size.height))

    async def _prepared(self, req: _CommonRequest, spec: ModelSpec, job: Job, event: str, input_image_tokens: int) -> Prepared:
        rewrite = self.settings.enable_prompt_rewrite if req.prompt_rewrite is None else req.prompt_rewrite
        if rewrite and self.rewriter is None:  # asked for where it cannot be, with a prompt or without
            raise InvalidRequest("prompt rewriting is not configured on this server", param="prompt_rewrite")
        if rewrite and self.rewriter is not None and job.prompt.strip():
            bound = self.settings.queue_size_for(spec.id)  # waiting for their rewrite, beside those in the queue
            job.prompt = await self.rewriter.rewrite_for(spec.id, bound, job.prompt, edit=event == "image_edit")
        return Prepared(req, spec, job, event, input_image_tokens)

    # --- running them ---------------------------------------------------------------------
    async def run(
        self, prepared: Prepared, base_url: str, on_partial: Callable[[PartialImage], None] | None = None
    ) -> tuple[ImagesResponse, JobResult]:
        """Run a prepared job and build OpenAI's response body."""
        if prepared.req.response_format == "url" and not prepared.req.stream:
            unusable = await in_store_thread(self.store.unusable, write=True)
            if unusable:  # refused before the job takes a GPU: it ran, then its image could not be kept
                raise StorageFailed(unusable)
        submitted = time.time()
        result = await self.engine.submit(prepared.spec.id, prepared.job, on_partial)
        data = []
        # A stream's events always carry b64_json (OpenAI's): nothing to store for them.
        stored = frozenset[str]()  # this response's images so far: a bound on the store never deletes them
        try:
            for image in result.images:
                if prepared.req.response_format == "url" and not prepared.req.stream:
                    name, url = await in_store_thread(
                        self._store, image.data, prepared.job.output_format, stored, base_url, write=True
                    )
                    stored |= {name}
                    data.append(ImageData(url=url, revised_prompt=prepared.job.prompt or None, seed=image.seed))
                else:
                    data.append(ImageData(b64_json=b64(image.data), revised_prompt=prepared.job.prompt or None, seed=image.seed))
        except BaseException:  # a later image not stored (a full disk), or the client gone: no one gets the names of
            discard_later(self.store, stored)  # those stored before, which held the space until they expired (in a
            raise  # bucket without lifecycle rules: for ever)
        stats = self.stats(result, submitted)
        for observe in self.job_observers:
            try:
                observe(prepared, result, stats)
            except Exception:  # an observer never fails the request
                log.exception("job observer failed")
        body = ImagesResponse(
            created=int(time.time()),
            data=data,
            **self.echo(prepared, result.images[0]).model_dump(),
            usage=self.usage(prepared, result),
            stats=stats,
        )
        return body, result

    def _store(self, data: bytes, output_format: str, keep: frozenset[str], base_url: str) -> tuple[str, str]:
        """Store an image for response_format=url: its name and URL (blocking: a store call, and presigning may fetch
        credentials)."""
        name = self.store.save(data, output_format, keep)
        try:
            return name, self.image_url(name, base_url)
        except BaseException:  # presigning failed: the image no client will have the URL of goes too
            self.store.delete(name)
            raise

    def image_url(self, name: str, base_url: str) -> str:
        """The URL of a stored image for response_format=url."""
        direct = self.store.public_url(name)
        if direct:
            return direct
        prefix = self.settings.image_download_url_prefix
        return f"{prefix.rstrip('/')}/{name}" if prefix else f"{base_url.rstrip('/')}/images/{name}"

    @staticmethod
    def echo(prepared: Prepared, image: EncodedImage) -> Echo:
        """The settings actually used, as OpenAI echoes them (the quality: the level of the steps that ran, fewer than
        those asked for in a variation)."""
        job = prepared.job
        return Echo(
            output_format=job.output_format,
            size=f"{image.width}x{image.height}",
            quality=quality_of(job.denoising_steps),
            safety_identifier=prepared.req.effective_safety_identifier(),
        )

    @staticmethod
    def stats(result: JobResult, submitted: float | None = None) -> dict:
        """The response's ``stats`` extension: what the run did (transformer calls, those served from the step
        cache; prompt encodings, those served from the prompt cache) and how long it took (seconds in the pipeline,
        from the worker's start and end; seconds waiting)."""
        timing = {"pipeline_seconds": round(result.finished - result.started, 6)}
        if submitted is not None:
            timing["queue_seconds"] = round(max(0.0, result.started - submitted), 6)
        return {**dict.fromkeys(RUN_COUNTERS, 0), **result.stats, **timing}

    @staticmethod
    def usage(prepared: Prepared, result: JobResult, inputs: bool = True) -> Usage:
        """OpenAI's usage: prompt text tokens (and input images' latent patches) in, output latent patches out; without
        ``inputs``, the output's only (a stream's completed events after the first, so that theirs add up)."""
        text = result.prompt_tokens if inputs else 0
        image_in = prepared.input_image_tokens if inputs else 0
        output = sum(patches(image.width, image.height) for image in result.images)
        return Usage(
            input_tokens=text + image_in,
            input_tokens_details=InputTokensDetails(text_tokens=text, image_tokens=image_in),
            output_tokens=output,
            output_tokens_details=OutputTokensDetails(image_tokens=output),
            total_tokens=text + image_in + output,
        )

    def _admit(self, spec: ModelSpec) -> None:
        """Refuse (503) now when the engine would refuse the job anyway."""
        self.engine.admit(spec.id)

    async def _decode(
        self, spec: ModelSpec, images: list[Upload], mask: Upload | None, keep: int, markup: Upload | None = None
    ) -> Decoded:
        """The uploads decoded and shrunk to ``keep`` pixels each, once the model admits work (503 before any decoding)."""
        return await self.inputs.decode(lambda: self._admit(spec), images, mask, keep, markup)
