"""Text embeddings kept for prompts a model has already encoded (with the same input images, for edits).

Most requests of a server share their negative prompt (the default, or a house one), and
retries and variations repeat their prompt. Each encoding is a full pass of the 7 B
Qwen2.5-VL text encoder: tens of milliseconds resident on a GPU, and with
``--offload text-encoder`` or ``group`` one pass of all its weights over PCIe (about 15 GB
in bf16). A ``PromptCache`` keeps the embeddings of recent prompts in host memory (so that
they take nothing from the GPU's memory plan; copying one back is well under a millisecond),
least recently used first out, within a number of entries and of bytes.

It wraps a pipeline's ``_get_qwen_prompt_embeds(prompt, device, dtype)``, which the
text-to-image pipeline and its img2img form call with the text alone. Edit pipelines
condition the encoder on their input images (``_get_qwen_prompt_embeds(prompt, image,
device, dtype)``, the images resized for the encoder): their entries are keyed by the
images' mode, size and a digest of their pixels as well (BLAKE2b, a few milliseconds for a
1024x1024 image), and by the pipeline class, whose image template differs. Iterating on one
image with new prompts then encodes only the new prompt (the negative prompt with that
image is kept), and a retry or another seed of the same edit encodes nothing. Images of
another type than PIL's are encoded every time. The text encoder's weights never change
in a worker (LoRAs apply to the transformer), so an entry stays right for the worker's
life. Callers get their own copies.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections import OrderedDict

import torch
from PIL import Image

log = logging.getLogger(__name__)

#: Entries and bytes kept at most by a worker's cache (Qwen-Image: about 7 KiB per token in bf16, so
#: 64 MiB holds about 90 prompts of 100 tokens; an edit's prompt with a 1024x1024 input image is about
#: 1,400 tokens with the image's, 10 MB, so 6 of those).
MAX_ENTRIES = 64
MAX_BYTES = 64 * 1024**2


#: ``image_key`` of images the cache cannot identify (anything but PIL images): such calls are not cached.
UNKEYED = object()
TEXT_ONLY = ["prompt", "device", "dtype"]
WITH_IMAGE = ["prompt", "image", "device", "dtype"]


def image_key(image) -> object:
    """What identifies the images a prompt is encoded with: for each PIL image its mode, size and a digest of its
    pixels, in order; ``None`` without images; ``UNKEYED`` where any image is of another type."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return (image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest())
    if isinstance(image, (list, tuple)):
        keys = tuple(image_key(one) for one in image)
        return UNKEYED if any(key is UNKEYED or key is None for key in keys) else ("list", keys)
    return UNKEYED


def _bytes(tensors: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class PromptCache:
    """Embeddings by prompt text, encoder template and device, for the pipelines of one worker (one owner)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0
        self.encoded = 0  # prompt encodings run by the installed pipelines (the responses' ``stats``)
        self.reused = 0  # and served from here
        self._last_image: tuple[object, object] | None = None  # the last image object keyed, and its key

    def _image_key(self, image) -> object:
        """``image_key``, taken once per image object: an edit pipeline passes the same image for its prompt and its
        negative prompt (the reference kept here means no other object can have its id meanwhile)."""
        if self._last_image is None or self._last_image[0] is not image:
            self._last_image = (image, image_key(image))
        return self._last_image[1]

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
        """Serve ``pipe``'s prompt encodings from this cache, with or without the images an edit pipeline conditions
        them on; False (and nothing changed) for a pipeline whose encoding takes other arguments."""
        encode = getattr(pipe, "_get_qwen_prompt_embeds", None)
        if encode is None:
            return False
        parameters = list(inspect.signature(encode).parameters)
        if parameters not in (TEXT_ONLY, WITH_IMAGE):
            return False
        with_image = parameters == WITH_IMAGE

        def cached(prompt=None, image=None, device=None, dtype=None):
            images = self._image_key(image) if with_image else None
            if images is UNKEYED:
                self.encoded += 1
                return encode(prompt, image, device, dtype)
            prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
            where = torch.device(device or pipe._execution_device)
            key: tuple = (
                prompts,
                str(where),
                str(dtype or pipe.text_encoder.dtype),
                pipe.prompt_template_encode,
                pipe.prompt_template_encode_start_idx,
                pipe.tokenizer_max_length,
            )
            if with_image:
                key += (type(pipe).__name__, images)
            found = self.get(key, where)
            if found is not None:
                self.reused += 1
                return found
            self.encoded += 1
            value = encode(prompt, image, device, dtype) if with_image else encode(prompt, device, dtype)
            self.put(key, value)
            return value

        if not with_image:  # the text-to-image form's signature, positional arguments included

            def cached_text(prompt=None, device=None, dtype=None):
                return cached(prompt, None, device, dtype)

            pipe._get_qwen_prompt_embeds = cached_text
        else:
            pipe._get_qwen_prompt_embeds = cached
        return True
