"""Loading the Qwen2-VL processor that the edit pipelines need.

transformers' ``Qwen2VLProcessor`` insists on a video processor, and its video
processor needs torchvision. The edit pipelines only ever pass images, so where
torchvision is not importable (CPU-only installs: PyPI's torchvision does not
load with a CPU build of torch) the processor is built without one, from the
same files, with the PIL image backend. Where torchvision works, transformers'
own loading is used unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


@functools.cache
def torchvision_available() -> bool:
    """True when torchvision imports and its compiled operators load."""
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception:  # a wheel built for another torch raises RuntimeError, not ImportError
        return False
    return True


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor; behaves the same for text and images."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_image_only_processor(image_processor, tokenizer) -> ImageOnlyQwen2VLProcessor:
    """Wrap an image processor and a tokenizer the way the edit pipelines expect."""
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_processor(folder: str | Path):
    """Load the processor saved in ``folder`` (a pipeline's ``processor/``)."""
    if torchvision_available():
        return Qwen2VLProcessor.from_pretrained(folder)
    from transformers.models.auto.tokenization_auto import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return build_image_only_processor(image_processor, tokenizer)
