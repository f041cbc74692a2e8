"""True CFG's two transformer passes as one batch of two (``--cfg-batch on|auto|off``).

With ``true_cfg_scale > 1`` and a negative prompt, the Qwen-Image pipelines call the
transformer twice per step with the same latents, timestep and image shapes: first
with the prompt's embeddings (``cache_context("cond")``), then with the negative
prompt's (``"uncond"``). Without touching the pipelines' code:

- during one pipeline call, the pipeline's ``encode_prompt`` is wrapped to record its
  results: the prompt's first, the negative prompt's second;
- a diffusers ``ModelHook`` on the transformer sees the conditional call (its text
  embeddings are the first recorded ones), runs the transformer once on the batch
  ``[cond, uncond]`` and returns the conditional half, keeping the other;
- the next call, if it is the matching unconditional one (the same latents and image
  shapes, an equal timestep, the second recorded embeddings), gets the kept half
  without running the transformer. Anything else runs as usual, so an unexpected call
  order costs time, never correctness.

The two texts rarely have the same length: the shorter is padded with zeros at its end.
The batch is ordered longer text first, and each block's joint attention runs its two
halves separately, the shorter text cut back to its real length, without a mask
(``cfg_attention.py``: a mask would rule out the fast attention kernels); everything else
in the blocks runs batched. Should another attention processor have replaced Qwen-Image's,
the padding is masked out with ``encoder_hidden_states_mask`` instead (a key-padding mask
of the joint attention), and a backend that takes no mask (flash-attn,
``_native_flash``...) then gets the two calls unbatched. Either way each half equals its
unbatched pass (tests check this). Under ``--compile`` the shorter text's length (or the
mask's) is marked dynamic, like the text length itself, so no prompt length recompiles.

``auto`` batches when the device has memory for the second pass's activations: the
estimate is ``ACTIVATION_FACTOR`` × tokens × hidden size × element size per extra
image, which bounds the live tensors of one block at inference (q/k/v and their joint
concatenation, the 4x-wide MLP and its activation, the residual streams and their
modulated copies: about 20 hidden-sized tensors per token), plus ``HEADROOM_BYTES``. On
CUDA the free memory is the driver's free memory plus what torch's allocator holds
unused; elsewhere the available system memory. It is decided once per pipeline call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .cfg_attention import SPLIT_KEY, install_split_attention, split_installed, text_split_marker

log = logging.getLogger(__name__)

HOOK_NAME = "qwen_image_server_cfg_batch"
ACTIVATION_FACTOR = 24
HEADROOM_BYTES = 1 << 30


def free_memory_bytes(device: str) -> int:
    """Bytes a new allocation on ``device`` can use: CUDA free + allocator cache, or available system memory."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    import psutil

    return psutil.virtual_memory().available


def extra_activation_bytes(inner_dim: int, tokens: int, images: int, dtype: torch.dtype) -> int:
    """Estimated extra peak memory of batching ``images`` more samples of ``tokens`` tokens (see the module doc)."""
    return ACTIVATION_FACTOR * images * tokens * inner_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Kept:
    """The unconditional half of a batched call, and what the matching call must look like."""

    output: torch.Tensor
    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    mask: torch.Tensor | None
    timestep: torch.Tensor
    img_shapes: object
    guidance: object
    attention_kwargs: object

    def matches(self, kwargs: dict) -> bool:
        return (
            kwargs.get("hidden_states") is self.hidden_states
            and kwargs.get("encoder_hidden_states") is self.encoder_hidden_states
            and kwargs.get("encoder_hidden_states_mask") is self.mask
            and kwargs.get("guidance") is self.guidance
            and kwargs.get("attention_kwargs") is self.attention_kwargs
            and kwargs.get("img_shapes") == self.img_shapes
            and isinstance(kwargs.get("timestep"), torch.Tensor)
            and torch.equal(kwargs["timestep"], self.timestep)
        )


@dataclass
class _CallState:
    """What one pipeline call has recorded so far."""

    encodings: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    kept: _Kept | None = None
    fits: bool | None = None  # auto: decided at the first conditional call
    batched: int = 0  # steps run as one batch


def _pad(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings padded with zeros to ``length`` tokens, and their boolean mask (False on the padding)."""
    n, current = embeds.shape[:2]
    mask = torch.ones(n, current, dtype=torch.bool, device=embeds.device) if mask is None else mask.to(torch.bool)
    if current < length:
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - current))
        mask = torch.nn.functional.pad(mask, (0, length - current), value=False)
    return embeds, mask


class BatchedCfgHook(ModelHook):
    """Runs the conditional and unconditional transformer calls of a step as one batch (see the module doc)."""

    def __init__(self, mode: str, device: str, takes_mask: bool, free_bytes: Callable[[str], int] = free_memory_bytes):
        super().__init__()
        self.mode = mode
        self.device = device
        self.takes_mask = takes_mask
        self.free_bytes = free_bytes
        self.state: _CallState | None = None

    def new_forward(self, module, *args, **kwargs):
        # diffusers sets original_forward when it registers a hook with new_forward (its declared type is None).
        forward = cast(Callable[..., Any], self.fn_ref.original_forward)
        state = self.state
        if state is None or args:
            return forward(*args, **kwargs)
        kept, state.kept = state.kept, None
        if kept is not None and kept.matches(kwargs):
            return self._wrap(kept.output, kwargs)
        if len(state.encodings) != 2 or kwargs.get("encoder_hidden_states") is not state.encodings[0][0]:
            return forward(*args, **kwargs)
        if kwargs.get("encoder_hidden_states_mask") is not state.encodings[0][1]:
            return forward(*args, **kwargs)
        prepared = self._batch(module, kwargs, state)
        if prepared is None:
            return forward(*args, **kwargs)
        batch, uncond_first = prepared
        output = forward(**batch)[0]
        n = kwargs["hidden_states"].shape[0]
        cond_out, uncond_out = (output[n:], output[:n]) if uncond_first else (output[:n], output[n:])
        uncond_embeds, uncond_mask = state.encodings[1]
        state.kept = _Kept(
            uncond_out, kwargs["hidden_states"], uncond_embeds, uncond_mask, kwargs["timestep"],
            kwargs.get("img_shapes"), kwargs.get("guidance"), kwargs.get("attention_kwargs"),
        )  # fmt: skip
        state.batched += 1
        return self._wrap(cond_out, kwargs)

    @staticmethod
    def _wrap(sample: torch.Tensor, kwargs: dict):
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    def _batch(self, module, kwargs: dict, state: _CallState) -> tuple[dict, bool] | None:
        """The batched call's arguments and whether the unconditional half comes first; None: run unbatched."""
        cond_embeds, cond_mask = state.encodings[0]
        uncond_embeds, uncond_mask = state.encodings[1]
        hidden = kwargs["hidden_states"]
        n = hidden.shape[0]
        if cond_embeds.shape[0] != n or uncond_embeds.shape[0] != n or cond_embeds.shape[2:] != uncond_embeds.shape[2:]:
            return None
        length = max(cond_embeds.shape[1], uncond_embeds.shape[1])
        # The split attention needs each half's text whole up to its length: no padding of the pipeline's own.
        split = cond_mask is None and uncond_mask is None and split_installed(module)
        needs_mask = not split and (
            cond_mask is not None or uncond_mask is not None or cond_embeds.shape[1] != uncond_embeds.shape[1]
        )
        if needs_mask and not self.takes_mask:
            return None
        if state.fits is None:
            state.fits = self.mode == "on" or self._fits(module, hidden, length)
        if not state.fits:
            return None
        batch = dict(kwargs, return_dict=False)
        uncond_first = False
        if split:
            uncond_first = uncond_embeds.shape[1] > cond_embeds.shape[1]  # the longer text's half first
            short = min(cond_embeds.shape[1], uncond_embeds.shape[1])
            cond_embeds, _ = _pad(cond_embeds, None, length)
            uncond_embeds, _ = _pad(uncond_embeds, None, length)
            marker = text_split_marker(short, hidden.device)
            batch["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), SPLIT_KEY: marker}
        elif needs_mask:
            cond_embeds, cond_mask = _pad(cond_embeds, cond_mask, length)
            uncond_embeds, uncond_mask = _pad(uncond_embeds, uncond_mask, length)
            mask = torch.cat([cond_mask, uncond_mask])
            if length > 1:  # the text length is dynamic under --compile; the mask's must be too
                torch._dynamo.mark_dynamic(mask, 1)
            batch["encoder_hidden_states_mask"] = mask
        pair = [uncond_embeds, cond_embeds] if uncond_first else [cond_embeds, uncond_embeds]
        batch["encoder_hidden_states"] = torch.cat(pair)
        batch["hidden_states"] = torch.cat([hidden, hidden])
        timestep = kwargs["timestep"]
        batch["timestep"] = torch.cat([timestep, timestep]) if timestep.ndim else timestep
        if kwargs.get("guidance") is not None and kwargs["guidance"].ndim:
            batch["guidance"] = torch.cat([kwargs["guidance"], kwargs["guidance"]])
        if kwargs.get("img_shapes") is not None:
            batch["img_shapes"] = list(kwargs["img_shapes"]) * 2
        return batch, uncond_first

    def _fits(self, module, hidden: torch.Tensor, text_len: int) -> bool:
        config = module.config
        need = extra_activation_bytes(
            config.num_attention_heads * config.attention_head_dim, hidden.shape[1] + text_len, hidden.shape[0], hidden.dtype
        )
        free = self.free_bytes(self.device)
        fits = free >= need + HEADROOM_BYTES
        if not fits:
            log.info(
                "cfg batching off for this call: %.2f GiB free, %.2f GiB needed", free / 2**30, (need + HEADROOM_BYTES) / 2**30
            )
        return fits


class CfgBatching:
    """The cfg batching of one loaded transformer: the hook and the per-pipeline-call context."""

    def __init__(
        self,
        transformer,
        mode: str,
        device: str,
        takes_mask: bool,
        free_bytes: Callable[[str], int] = free_memory_bytes,
        split: bool = True,
    ):
        self.mode = mode
        self.transformer = transformer
        split = split and install_split_attention(transformer)
        self.hook = BatchedCfgHook(mode, device, takes_mask, free_bytes)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(self.hook, HOOK_NAME)
        if not split and not takes_mask:
            log.warning("--cfg-batch %s: the attention backend takes no attention mask, so steps whose prompt and negative "
                        "prompt differ in length run unbatched", mode)  # fmt: skip

    def summary(self) -> dict:
        padded = "split" if split_installed(self.transformer) else "masked" if self.hook.takes_mask else "unbatched"
        return {"mode": self.mode, "takes_mask": self.hook.takes_mask, "padded_text": padded}

    @contextlib.contextmanager
    def call(self, pipe) -> Iterator[_CallState]:
        """Batch CFG during one call of ``pipe`` (any pipeline sharing the hooked transformer)."""
        state = _CallState()
        own = vars(pipe).get("encode_prompt")
        encode = pipe.encode_prompt

        def recording(*args, **kwargs):
            result = encode(*args, **kwargs)
            state.encodings.append((result[0], result[1]))
            return result

        pipe.encode_prompt = recording
        self.hook.state = state
        try:
            yield state
        finally:
            self.hook.state = None
            if own is None:
                del pipe.encode_prompt
            else:
                pipe.encode_prompt = own


def apply_cfg_batch(transformer, mode: str, device: str, takes_mask: bool, split: bool = True) -> CfgBatching | None:
    """Install batched CFG on ``transformer`` for ``mode`` ``on``/``auto``; None for ``off``. ``split``: give padded
    texts the split attention (``cfg_attention.py``), else a mask. Under ``--offload sequential`` the split would run
    each attention projection twice per block, and accelerate moves a layer's weights to the GPU on every call: the
    masked attention moves them once (its slower kernels matter little beside the transfers)."""
    if mode == "off":
        return None
    return CfgBatching(transformer, mode, device, takes_mask, split=split)
