"""Tiny offline Qwen-Image models for tests, CI, the demo and benchmarks.

The models are built from the real diffusers and transformers classes with
random weights and saved with ``save_pretrained``, so they load through exactly
the same code path as a downloaded ``Qwen/Qwen-Image`` folder. Nothing here
touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from .spec import SIDECAR_NAME

TinyKind = Literal["text-to-image", "edit", "edit-plus"]
#: Changes whenever the tiny models change, so that caches of older ones are not reused.
TINY_MODEL_VERSION = 5
TINY_KINDS: tuple[str, ...] = ("text-to-image", "edit", "edit-plus")

# Tokens the Qwen-Image prompt templates use; the byte-level vocabulary covers the rest.
_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Written to the model's sidecar file (see ``spec.py``), which only this server reads.
# The edit pipelines resize their inputs to about one megapixel, which would make a
# tiny model as slow as its VAE at 1 MP; a tiny model asks for a smaller area instead.
TINY_EDIT_AREA = 256 * 256
TINY_CONDITION_AREA = 64 * 64
TINY_DEFAULT_SIZE = "256x256"
TINY_DEFAULT_STEPS = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte to printable-character map, used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _make_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # type: ignore[arg-type]  # transformers annotates str; None means no unknown token
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS[1:]})
    return tokenizer


def build_tiny_model(out_dir: str | Path, kind: TinyKind = "text-to-image", seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen-Image pipeline of ``kind`` to ``out_dir``. A wrong kind or a folder that cannot
    be made fails before torch, diffusers and transformers are imported (seconds)."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    # The pipelines from their own modules: diffusers' package namespace types them as its placeholder classes.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)

    tokenizer = _make_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    hidden = 32
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    # transformers' config dataclasses take extra keys (the token ids) as **kwargs, which their type does not show.
    config = Qwen2_5_VLConfig(  # type: ignore[call-arg]
        text_config=text_config,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=1,  # attention dominates at large sizes (6,000 tokens at 1664x928): one head is 3x faster than 3
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    z_dim = 4
    # Three downsamplings, as in the real VAE: 8x8 pixels per latent, 16x16 per transformer token.
    # The VAE is most of a tiny model's time on a CPU (its convolutions run at full resolution): 4 base
    # channels decode a 256x256 image twice as fast as 8. (One residual block per stage is the least the
    # encoder builds right: its first block changes the channel count.)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    components = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    pipe: DiffusionPipeline
    if kind == "text-to-image":
        pipe = QwenImagePipeline(**components)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .processor import build_image_only_processor

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        processor = build_image_only_processor(image_processor, tokenizer)
        cls = QwenImageEditPipeline if kind == "edit" else QwenImageEditPlusPipeline
        pipe = cls(processor=processor, **components)
    pipe.save_pretrained(out)
    sidecar = {"default_size": TINY_DEFAULT_SIZE, "default_steps": TINY_DEFAULT_STEPS}
    if kind != "text-to-image":
        sidecar.update(edit_area=TINY_EDIT_AREA, condition_area=TINY_CONDITION_AREA)
    (out / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    if kind != "text-to-image":
        _store_as_standard_processor(out)
    return out


def _store_as_standard_processor(out: Path) -> None:
    """Make the saved processor load like a downloaded Qwen-Image-Edit one.

    The processor was built without a video processor (see ``processor.py``). On
    disk it is recorded as transformers' own ``Qwen2VLProcessor`` with the torchvision
    image processor and a video processor configuration, so that where torchvision
    works, transformers' standard loading finds everything it looks for.
    """
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    proc_dir = out / "processor"
    config_path = proc_dir / "processor_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["processor_class"] = "Qwen2VLProcessor"
    image = config["image_processor"]
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    config["video_processor"] = video
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # Older layouts keep each sub-processor in a file of its own; some loaders look there.
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n", encoding="utf-8")
    (proc_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n", encoding="utf-8")
    tokenizer_path = proc_dir / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tokenizer["processor_class"] = "Qwen2VLProcessor"
    tokenizer_path.write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")


DEMO_MODELS = (("qwen-image-tiny", "text-to-image"), ("qwen-image-edit-tiny", "edit"))


def demo_cache_dir() -> Path:
    """Where the demo's tiny models are built once: the user's cache directory."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwen-image-server")) / f"tiny-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """Build a tiny model into ``folder`` unless a complete one is already there. Built aside and renamed into place,
    so that processes side by side (two servers, two test runs sharing a cache) never see a half-written model: the
    first rename wins."""
    if folder.exists():
        if (folder / "model_index.json").is_file():  # complete: a rename puts a whole model in place at once
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # left half-written by an older, interrupted build
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build_tiny_model(staging, kind, seed=seed)  # type: ignore[arg-type]
        staging.chmod(0o755)  # mkdtemp makes it private
        try:
            os.replace(staging, folder)
        except OSError:  # built meanwhile by another process
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def demo_model_entries() -> list[str]:
    """``ID=PATH`` of the demo's tiny models, building them on first use."""
    root = demo_cache_dir()
    return [f"{ident}={ensure_tiny_model(root / ident, kind)}" for ident, kind in DEMO_MODELS]
