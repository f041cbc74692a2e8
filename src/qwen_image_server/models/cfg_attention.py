"""Batched CFG's joint attention without a padding mask.

Batching true CFG's two transformer passes (``cfg_batch.py``) puts the prompt's and the
negative prompt's texts in one tensor, so the shorter one is padded at its end. A
key-padding mask would keep the padding out of the joint attention, but a mask rules
out the fastest attention kernels: on an H100 (full-size Qwen-Image, 1024x1024) a whole
transformer call took 190 ms with PyTorch's default attention and 247 ms with the
memory-efficient kernel, the one that takes masks; a masked batch of two would cost
more than the two calls it replaces.

``SplitTextAttnProcessor``, installed on every block when CFG batching is on, runs the
joint attention of a batched call as two calls of diffusers' own processor, one per
half of the batch: the longer text's half as it is, the shorter text's half with its
text (and text RoPE frequencies) cut to its real length. Neither needs a mask, so the
configured backend runs unmasked, and the values are those of the unbatched passes.
The rest of each block (modulation, norms, MLPs: about two thirds of its matmul work)
stays one batched call. The cut-off padding tokens get zeros from the attention; they
never reach a real token, since no attention ever reads them as keys.

The batch is ordered longer text first. The shorter text's length arrives as the
length of a marker tensor in the transformer's ``attention_kwargs`` (``SPLIT_KEY``):
a tensor, so that a compiled block sees a dynamic size rather than a constant it would
recompile for. Calls without the marker are diffusers' processor unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

log = logging.getLogger(__name__)

#: The ``attention_kwargs`` key of the marker whose length is the shorter text's.
SPLIT_KEY = "qis_cfg_text_split"


class SplitTextAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint attention; a batched CFG call's two halves attend separately, unmasked (module doc)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        qis_cfg_text_split: torch.Tensor | None = None,
    ):
        call: Any = super().__call__  # diffusers annotates its tensors as FloatTensor
        if qis_cfg_text_split is None or encoder_hidden_states is None:
            return call(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                attention_mask=attention_mask,
                image_rotary_emb=image_rotary_emb,
            )
        half = hidden_states.shape[0] // 2
        short = qis_cfg_text_split.shape[0]
        short_rope = image_rotary_emb
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            short_rope = (img_freqs, txt_freqs[:short])
        long_img, long_txt = call(
            attn, hidden_states[:half], encoder_hidden_states=encoder_hidden_states[:half], image_rotary_emb=image_rotary_emb
        )
        short_img, short_txt = call(
            attn, hidden_states[half:], encoder_hidden_states=encoder_hidden_states[half:, :short], image_rotary_emb=short_rope
        )
        padded_txt = short_txt.new_zeros(short_txt.shape[0], encoder_hidden_states.shape[1], short_txt.shape[2])
        padded_txt[:, :short] = short_txt
        return torch.cat([long_img, short_img]), torch.cat([long_txt, padded_txt])


def install_split_attention(transformer) -> bool:
    """Give every block of ``transformer`` the split processor (keeping its backend settings); False if one cannot.

    A block whose processor is not diffusers' Qwen double-stream processor (or already
    the split one) is left as it is, and then none is changed: batched calls keep the
    masked path.
    """
    blocks = list(getattr(transformer, "transformer_blocks", []))
    processors = [getattr(getattr(block, "attn", None), "processor", None) for block in blocks]
    if not blocks or not all(isinstance(p, QwenDoubleStreamAttnProcessor2_0) for p in processors):
        names = sorted({type(p).__name__ for p in processors if not isinstance(p, QwenDoubleStreamAttnProcessor2_0)})
        log.info("cfg batching: attention processors %s are not Qwen-Image's; padded steps use a mask", names or "(none)")
        return False
    for block, old in zip(blocks, processors, strict=True):
        if type(old) is SplitTextAttnProcessor:
            continue
        new = SplitTextAttnProcessor()
        new.__dict__.update(vars(old))  # the attention backend and parallel config set on it
        block.attn.set_processor(new)
    return True


def split_installed(transformer) -> bool:
    """Whether every block runs the split processor (nothing has replaced it since it was installed)."""
    blocks = getattr(transformer, "transformer_blocks", [])
    return bool(len(blocks)) and all(type(block.attn.processor) is SplitTextAttnProcessor for block in blocks)


def text_split_marker(short_length: int, device: torch.device) -> torch.Tensor:
    """The marker of ``SPLIT_KEY``: ``short_length`` elements (no values used), its length dynamic under compile."""
    marker = torch.empty(short_length, dtype=torch.bool, device=device)
    if short_length > 1:  # torch specialises sizes 0 and 1 anyway
        torch._dynamo.mark_dynamic(marker, 0)
    return marker
