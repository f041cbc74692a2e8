"""Text embeddings kept for prompts a text-to-image model has already encoded.

Most requests of a server share their negative prompt (the default, or a house one), and
retries and variations repeat their prompt. Each encoding is a full pass of the 7 B
Qwen2.5-VL text encoder: tens of milliseconds resident on a GPU, and with
``--offload text-encoder`` or ``group`` one pass of all its weights over PCIe (about 15 GB
in bf16). A ``PromptCache`` keeps the embeddings of recent prompts in host memory (so that
they take nothing from the GPU's memory plan; copying one back is well under a millisecond),
least recently used first out, within a number of entries and of bytes.

It wraps a pipeline's ``_get_qwen_prompt_embeds(prompt, device, dtype)``, which the
text-to-image pipeline and its img2img form call with the text alone. Edit pipelines
condition the encoder on their input image (``_get_qwen_prompt_embeds(prompt, image, ...)``)
and are left alone. The text encoder's weights never change in a worker (LoRAs apply to the
transformer), so an entry stays right for the worker's life. Callers get their own copies.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

#: Entries and bytes kept at most by a worker's cache (Qwen-Image: about 7 KiB per token in bf16, so
#: 64 MiB holds about 90 prompts of 100 tokens).
MAX_ENTRIES = 64
MAX_BYTES = 64 * 1024**2


def _bytes(tensors: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class PromptCache:
    """Embeddings by prompt text, encoder template and device, for the pipelines of one worker (one owner)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, device: torch.device | str = "cpu") -> tuple | None:
        """The kept value of ``key`` as copies on ``device``, or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return tuple(t.to(device, copy=True) if isinstance(t, torch.Tensor) else t for t in found)

    def put(self, key: tuple, value: tuple) -> None:
        """Keep a copy of ``value`` in host memory under ``key`` (not when it alone exceeds the bytes allowed)."""
        size = _bytes(value)
        if size > self.max_bytes or self.max_entries < 1:
            return
        kept = tuple(t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t for t in value)
        if key in self._entries:
            self._bytes -= _bytes(self._entries.pop(key))
        self._entries[key] = kept
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= _bytes(dropped)

    def install(self, pipe) -> bool:
        """Serve ``pipe``'s text-only prompt encodings from this cache; False where they depend on more than the
        text (edit pipelines) and nothing was changed."""
        encode = getattr(pipe, "_get_qwen_prompt_embeds", None)
        if encode is None or list(inspect.signature(encode).parameters) != ["prompt", "device", "dtype"]:
            return False

        def cached(prompt=None, device=None, dtype=None):
            prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
            where = torch.device(device or pipe._execution_device)
            key = (
                prompts,
                str(where),
                str(dtype or pipe.text_encoder.dtype),
                pipe.prompt_template_encode,
                pipe.prompt_template_encode_start_idx,
                pipe.tokenizer_max_length,
            )
            found = self.get(key, where)
            if found is not None:
                return found
            value = encode(prompt, device, dtype)
            self.put(key, value)
            return value

        pipe._get_qwen_prompt_embeds = cached
        return True
