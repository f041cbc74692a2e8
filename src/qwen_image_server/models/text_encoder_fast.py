"""Qwen2.5-VL as Qwen-Image's pipelines use it: the last hidden state, and nothing else.

Every Qwen-Image pipeline the server runs calls its text encoder
(``Qwen2_5_VLForConditionalGeneration``) with ``output_hidden_states=True`` and reads
``hidden_states[-1]`` alone: the decoder's output after its final norm. The stock forward
also computes for that call:

- the language-model head over every token: a 3584 x 152064 matrix (545 M parameters,
  1.09 GB in bf16) kept on the device for nothing, 1.1 TFLOP and 311 MB of logits for a
  1024-token prompt;
- every layer's hidden states (29 of them: 208 KB per token in bf16), kept until the
  pipeline drops the output;
- a key/value cache of every layer (``use_cache`` defaults to on).

``prepare_text_encoder`` removes the head from the loaded module and gives it a forward
that runs the decoder (``module.model``, vision tower included) without a cache and
returns its last hidden state as ``hidden_states[-1]``. The result is the same tensor the
stock forward returns there (transformers ties ``hidden_states[-1]`` to the decoder's
normed output). Under group offload the head was also a 1.09 GB transfer on every prompt
encoding and 1.09 GB of pinned host memory. ``bench/text_encoder.py`` measures time, FLOPs
and peak memory of both forwards.

Only the ``ForConditionalGeneration`` classes of Qwen2-VL and Qwen2.5-VL are prepared.
A pipeline that generates text with its encoder (diffusers' ``QwenImageLayeredPipeline``
captions an image without a prompt) needs the head; the server serves none. The memory
plan counts the text encoder without its head (``footprint.DROPPED``).
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)

#: Set on a prepared encoder, so that one shared by two models is prepared once.
MARK = "_qis_last_hidden_state_only"
#: The encoder classes whose ``model`` attribute is the whole decoder (vision tower included).
CLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")


def _last_hidden_state(self, *args, output_hidden_states=None, use_cache=None, logits_to_keep=None, **kwargs):
    """The decoder's output after its final norm, as ``hidden_states=(last,)``; no head, no cache."""
    from transformers.modeling_outputs import BaseModelOutput

    if kwargs.pop("labels", None) is not None:
        raise TypeError("this text encoder has no language-model head (the server removed it): it cannot compute a loss")
    out = self.model(*args, use_cache=False, **kwargs)
    last = out.last_hidden_state
    return BaseModelOutput(last_hidden_state=last, hidden_states=(last,))


def prepare_text_encoder(module: torch.nn.Module) -> bool:
    """Remove the head of a loaded Qwen2(.5)-VL text encoder and make its forward return the last hidden state only.
    True when it did; False for another class or one already prepared."""
    if getattr(module, MARK, False) or type(module).__name__ not in CLASSES:
        return False
    head, decoder = getattr(module, "lm_head", None), getattr(module, "model", None)
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return False
    kept = {id(p) for p in decoder.parameters()}  # a head tied to the embeddings frees nothing
    freed = sum(p.numel() * p.element_size() for p in head.parameters() if id(p) not in kept)
    del module.lm_head
    module.forward = types.MethodType(_last_hidden_state, module)
    setattr(module, MARK, True)
    log.info("text encoder: language-model head removed (%.0f MB freed)", freed / 1e6)
    return True
