"""The working memory of one worker's calls, beside its weights: denoising and decoding the largest image, the step
cache's keep between steps, one text-encoder call. ``footprint`` adds it to the weights; the runner reads the step
cache's figure to free it before the final decode. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .step_cache import parse_policy
from .weights_files import REFERENCE_INNER_DIM

if TYPE_CHECKING:
    from .profile import RunProfile
    from .spec import ModelSpec
    from .weights_files import ModelTensors

GIB = 1024**3
MIB = 1024**2

# --- constants of the working-memory estimate (all measured or derived for full-size Qwen-Image) ---
#: Measured on an H100 80GB, bf16, everything resident: weights 53.8 GiB; peak 58.0 GiB at 1024x1024
#: (4096 image tokens) and 60.8 GiB at 1328x1328 (6889 tokens). The working memory over the weights,
#: 4.2 and 7.0 GiB, fitted as a line in the output's image tokens (16x16-pixel latent patches):
ACT_PER_OUTPUT_TOKEN = (7.0 - 4.2) * GIB / (6889 - 4096)  # ≈ 1.03 MiB per token (denoising and VAE decode)
ACT_BASE = 4.2 * GIB - 4096 * ACT_PER_OUTPUT_TOKEN  # ≈ 0.094 GiB
#: Other transformer widths than Qwen-Image's (``REFERENCE_INNER_DIM``) scale the figures above linearly.
#: Input images of edits join the transformer's sequence but are not decoded: their tokens cost the
#: transformer's share only, estimated from its architecture as about 16 hidden vectors per token
#: alive inside a block (norms, q/k/v, attention output, the 4x MLP and its activation).
VECTORS_PER_INPUT_TOKEN = 16
#: With ``vae_tiling`` (``vae_tiling.py``) the VAE decodes 256x256-pixel tiles: the decode's share of the line above
#: (most of it) gives way to a tile's working memory plus the decoded tiles and the image. Measured by
#: ``bench/vae_fast.py --tiling --cpu-peak`` with the full-size VAE on a CPU in float32: 0.67-0.68 GiB above the
#: weights at 1024x1024 and 0.75 GiB at 2048x2048 (6.2 GiB untiled at 1024x1024); halved for bf16, as a line in
#: output tokens. The transformer's own share of an output token is then counted as an input token's.
TILED_DECODE_BASE = int(0.33 * GIB)
TILED_DECODE_PER_OUTPUT_TOKEN = 3 * 1024
#: The text encoder (Qwen2.5-VL) as the server runs it (``text_encoder_fast``: no language-model head, no
#: hidden states of every layer, no cache): 0.21-0.24 GiB above the weights for 1024 tokens at full width in bf16,
#: measured by ``bench/text_encoder.py`` on a CPU (with 2 and with 8 layers), up to 124 K values per token, written
#: as 4 x hidden + 6 x intermediate (the stock forward: 0.41 GiB with 2 layers, 0.48 with 8: each layer keeps one
#: more hidden state). Its longest input: diffusers' tokenizer limit (1024) plus the edit template (64), plus the
#: vision tokens of each input image (28x28 pixels each at the condition area).
#: diffusers' edit pipelines cut nothing, and an edit whose prompt and input images came to more text tokens than
#: the transformer has positions for (4096, less the image's) failed inside it: the runner cuts an edit's prompt and
#: negative prompt to ``EDIT_PROMPT_TOKENS`` (``PipelineRunner._read_prompts``).
EDIT_PROMPT_TOKENS = 1024
TEXT_TOKENS = EDIT_PROMPT_TOKENS + 64
VISION_PATCH = 28
#: The text tokens the transformer sees beside a generation's image: diffusers cuts the prompt's embeddings to its
#: default ``max_sequence_length`` (an edit's carry the input images' vision tokens: ``TEXT_TOKENS``).
GENERATION_TEXT_TOKENS = 512
#: Values per image token of the transformer's output projection (2x2 patches of 16 latent channels): what the
#: lite form of ``taylorseer`` keeps.
PROJ_OUT_VALUES = 64
#: The areas the edit pipelines resize their inputs to (diffusers' module constants and literals): the transformer's
#: input image, and the text encoder's condition image.
DIFFUSERS_EDIT_AREA = 1024 * 1024
DIFFUSERS_CONDITION_AREA = 384 * 384


def _patches(side: int) -> int:
    """Image tokens of a square image: 16x16-pixel latent patches."""
    return (-(-side // 16)) ** 2


#: The transformer's share of the working memory per token, in bf16 at Qwen-Image's width (``VECTORS_PER_INPUT_TOKEN``).
TOKEN_SHARE = VECTORS_PER_INPUT_TOKEN * REFERENCE_INNER_DIM * 2


def _width_scale(inner_dim: int, run_bytes: int) -> float:
    """The measured figures (Qwen-Image's width, bf16) scaled to a transformer's width and run dtype."""
    return inner_dim / REFERENCE_INNER_DIM * run_bytes / 2


def activation_bytes(
    output_tokens: int,
    input_tokens: int,
    inner_dim: int,
    run_bytes: int,
    batch: int = 1,
    cfg_batch: bool = False,
    vae_tiling: bool = False,
) -> int:
    """Working memory of denoising and decoding: the measured line in output tokens plus the transformer's
    share for input-image tokens, scaled by the transformer's width and the run dtype, times the batch
    (``cfg_batch`` runs the transformer on two at once; ``vae_tiling`` decodes in tiles, when that needs less)."""
    scale = _width_scale(inner_dim, run_bytes)
    per_token = TOKEN_SHARE
    outputs = output_tokens * ACT_PER_OUTPUT_TOKEN
    if vae_tiling:
        outputs = min(outputs, TILED_DECODE_BASE + output_tokens * (per_token + TILED_DECODE_PER_OUTPUT_TOKEN))
    per_image = ACT_BASE + outputs + input_tokens * per_token
    transformer_share = (output_tokens + input_tokens) * per_token
    return int(scale * batch * (per_image + (transformer_share if cfg_batch else 0)))


def denoising_bytes(
    output_tokens: int, input_tokens: int, inner_dim: int, run_bytes: int, batch: int = 1, cfg_batch: bool = False
) -> int:
    """Working memory while denoising only (the VAE has not decoded yet): the measured line's base and the
    transformer's share of every token, with the same scaling as ``activation_bytes``."""
    tokens = (output_tokens + input_tokens) * TOKEN_SHARE
    return int(_width_scale(inner_dim, run_bytes) * batch * (ACT_BASE + tokens * (2 if cfg_batch else 1)))


def step_cache_bytes(
    cache: str | None,
    image_tokens: int,
    text_tokens: int,
    layers: int,
    inner_dim: int,
    run_bytes: int,
    batch: int = 1,
    out_values: int = PROJ_OUT_VALUES,
) -> int:
    """What the step cache policy ``cache`` keeps from one denoising step to the next, counted from diffusers' hooks.

    Each cache context keeps its own (true CFG's cond and uncond: two; a batched CFG call keeps the pair in one), per
    image of the batch: ``taylorseer`` keeps ``order + 1`` Taylor factors of every block's attention output (its image
    and text tokens at full width), in the run dtype; its ``lite`` form those of the output projection only;
    ``fbcache`` the first block's output (image and text) and residual (image), and the other blocks' residuals (image
    and text). The runner frees it at the last step's end, before the final decode; a streamed request's previews
    decode while it is kept.
    """
    policy = parse_policy(cache)
    if policy is None:
        return 0
    contexts = 2 * batch
    if policy.name == "taylorseer":
        factors = policy["order"] + 1
        if policy["lite"]:
            return contexts * factors * image_tokens * out_values * run_bytes
        return contexts * factors * layers * (image_tokens + text_tokens) * inner_dim * run_bytes
    return contexts * (3 * image_tokens + 2 * text_tokens) * inner_dim * run_bytes


def text_encoder_bytes(text_encoder: dict, tokens: int, run_bytes: int) -> int:
    """Working memory of one text-encoder call on ``tokens`` tokens (see ``TEXT_TOKENS``)."""
    per_token = 4 * text_encoder["hidden_size"] + 6 * text_encoder["intermediate_size"]
    return int(tokens * per_token * run_bytes)


@dataclass(frozen=True)
class Work:
    """Bytes of working memory: ``activations`` (denoising and decoding, with the step cache's keep while it is
    alive), ``step_cache`` (that keep alone), ``text_encoder`` (one text-encoder call)."""

    activations: int
    step_cache: int
    text_encoder: int


def working_memory(
    spec: ModelSpec,
    model: ModelTensors,
    profile: RunProfile,
    *,
    run_bytes: int,
    max_image_side: int,
    max_input_images: int = 1,
    max_batch_size: int = 1,
    preview_scale: float = 1.0,
) -> Work:
    """The working memory of ``spec``'s calls at the largest allowed image under ``profile`` (see ``footprint``)."""
    inputs = 0 if not spec.can_edit else (max_input_images if spec.multi_image else 1)
    edit_area = int(spec.options.get("edit_area") or DIFFUSERS_EDIT_AREA)
    condition_area = int(spec.options.get("condition_area") or DIFFUSERS_CONDITION_AREA)
    output_tokens = _patches(max_image_side)
    input_tokens = inputs * (edit_area // 256)
    text_tokens = TEXT_TOKENS + inputs * (condition_area // (VISION_PATCH * VISION_PATCH))
    cfg_batch = profile.cfg_batch == "on"
    activations = activation_bytes(
        output_tokens,
        input_tokens,
        model.inner_dim,
        run_bytes,
        max_batch_size,
        cfg_batch=cfg_batch,
        vae_tiling=profile.vae_tiling == "on",
    )
    transformer_text = text_tokens if spec.can_edit else GENERATION_TEXT_TOKENS
    kept = step_cache_bytes(
        profile.cache, output_tokens + input_tokens, transformer_text, model.layers, model.inner_dim, run_bytes, max_batch_size
    )
    if kept:  # alive while denoising and a streamed request's previews decode, freed before the final decode
        denoising = denoising_bytes(output_tokens, input_tokens, model.inner_dim, run_bytes, max_batch_size, cfg_batch)
        preview = activation_bytes(
            int(output_tokens * preview_scale**2),
            input_tokens,
            model.inner_dim,
            run_bytes,
            max_batch_size,
            cfg_batch=cfg_batch,
            vae_tiling=profile.vae_tiling == "on",
        )
        activations = max(activations, max(denoising, preview) + kept)
    return Work(activations, kept, text_encoder_bytes(model.text_encoder, text_tokens, run_bytes))
