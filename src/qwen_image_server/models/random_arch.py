"""Building a ``random:`` model's pipeline directly on its device, with cheap seeded random weights.

Every module is constructed on the target device in the target dtype (a default
device and dtype while constructing), with the libraries' own initialisation
skipped, then filled in place: normal(0, 0.02) for matrices and kernels, ones for
norm scales, zeros for biases. No CPU copy of the weights is ever made, so the
full-size models (about 29 B parameters) are ready in seconds on a GPU. The same
seed gives the same weights on the same device. The architecture comes from
``random_source.py``; the tokenizer is the tiny models' byte-level one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .random_source import RandomSource, parse_random_source

log = logging.getLogger(__name__)

#: Standard deviation of the random matrices: small enough that bf16 activations stay finite through 60 blocks.
INIT_STD = 0.02


@contextlib.contextmanager
def _constructing(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors on ``device`` in ``dtype``, and torch's / transformers' weight initialisation skipped."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]  # 4.x only
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def init_random_(
    module: torch.nn.Module, seed: int, std: float = INIT_STD, fill_device: str | torch.device | None = None
) -> None:
    """Fill every parameter of ``module`` in place: norm scales 1, biases 0, everything else normal(0, ``std``).

    Parameters are visited in registration order with one generator, so the same seed gives the same weights. The
    generator is on the module's device, or on ``fill_device`` when given: each parameter's values are drawn there
    and copied in. A component that a memory mode keeps on the CPU of a GPU worker is filled that way: on the CPU,
    ``normal_`` drew about 150 million values a second here, no faster with more threads, so the 29 billion values of
    full-size Qwen-Image's transformer and text encoder took minutes per worker; the GPU draws them faster than they
    can be copied to the CPU. They are the values a resident build of the same seed gets.
    """
    device = next(module.parameters()).device
    if device.type == "meta":
        return
    fill = torch.device(fill_device) if fill_device is not None else device
    generator = torch.Generator(fill).manual_seed(seed)
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if name in ("bias", "beta") or name.endswith("_bias"):
                param.zero_()
            elif _is_norm(sub) or param.ndim == 1:
                param.fill_(1.0)
            elif fill == param.device and fill_device is None:
                param.normal_(0.0, std, generator=generator)
            else:
                param.copy_(torch.empty(param.shape, dtype=param.dtype, device=fill).normal_(0.0, std, generator=generator))


def text_encoder_config(arch: dict, tokenizer):
    """The Qwen2.5-VL configuration of ``arch``, its special token ids those of ``tokenizer``."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

    from .tiny import _SPECIAL_TOKENS

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    special = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    values = {key: value for key, value in arch["text_encoder"].items() if not key.startswith("_")}
    values["text_config"] = {**values["text_config"], **special}
    return Qwen2_5_VLConfig(
        **values,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )


def _config(values: dict) -> dict:
    return {key: value for key, value in values.items() if not key.startswith("_")}


def build_components(
    arch: dict,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    devices: dict[str, str] | None = None,
    on_component=None,
    reuse: dict | None = None,
) -> dict:
    """The pipeline components of ``arch`` on ``device`` in ``dtype``; on ``meta`` they take no memory and stay uninitialised.

    ``devices`` may put a component elsewhere (a memory mode that offloads it builds it on the CPU);
    ``on_component(name, module)`` is called as each one is ready (FP8 storage, before the next is built);
    ``reuse`` gives modules already built elsewhere (``component_key`` equal: the same weights), taken as they are.
    """
    devices = devices or {}
    reuse = reuse or {}
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from .tiny import _make_tokenizer

    tokenizer = _make_tokenizer()
    config = text_encoder_config(arch, tokenizer)
    transformer_config = _config(arch["transformer"])
    transformer_config["axes_dims_rope"] = tuple(transformer_config["axes_dims_rope"])
    builders = {
        "transformer": lambda: QwenImageTransformer2DModel(**transformer_config),
        "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype),
        "vae": lambda: AutoencoderKLQwenImage(**_config(arch["vae"])),
    }
    built = {}
    for offset, (name, build) in enumerate(builders.items()):
        if name in reuse:
            built[name] = reuse[name]
            continue
        with _constructing(devices.get(name, device), dtype):
            module = build()
        # Each module gets a seed of its own, so that shrinking one does not change the others' weights. One built
        # on the CPU for a GPU worker (offloaded) draws its values on that GPU.
        gpu = torch.device(device).type == "cuda"
        init_random_(module, seed * 1000 + offset, fill_device=device if gpu else None)
        built[name] = module.eval().requires_grad_(False)
        if on_component is not None:
            on_component(name, built[name])
    transformer, text_encoder, vae = built["transformer"], built["text_encoder"], built["vae"]
    scheduler = FlowMatchEulerDiscreteScheduler(**_config(arch["scheduler"]))
    components = dict(transformer=transformer, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, scheduler=scheduler)
    if "image_processor" in arch:
        components["processor"] = _processor(arch["image_processor"], tokenizer)
    return components


def _processor(values: dict, tokenizer):
    """The edit pipelines' Qwen2-VL processor with the published image-processor values."""
    from .processor import build_image_only_processor, torchvision_available

    if torchvision_available():
        from transformers import Qwen2VLImageProcessor

        image_processor_class: type = Qwen2VLImageProcessor
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor_class = Qwen2VLImageProcessorPil
    return build_image_only_processor(image_processor_class(**_config(values)), tokenizer)


def build_pipeline(random: RandomSource, device: str | torch.device, dtype: torch.dtype, **placement):
    """The diffusers pipeline of a parsed ``random:`` source, every module built on ``device``
    (or where ``placement``'s ``devices`` says; see ``build_components``)."""
    import diffusers

    arch = random.architecture()
    components = build_components(arch, device, dtype, seed=random.seed, **placement)
    return getattr(diffusers, arch["pipeline_class"])(**components)


def build_random_pipeline(source: str, device: str | torch.device, dtype: torch.dtype, **placement):
    """The pipeline of a ``random:ORG/NAME[?KEY=VALUE&...]`` source (see ``random_source.py``)."""
    return build_pipeline(parse_random_source(source), device, dtype, **placement)


#: safetensors' names of the dtypes a ``random:`` module is built in.
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def model_tensors(source: str):
    """The tensors a ``random:`` source's components would hold, as a folder's safetensors headers list them
    (``weights_files.ModelTensors``): built on the meta device (no memory, no weights), in bf16 as the
    published files are, with the architecture's own config values for the working-memory estimate."""
    from .weights_files import Tensor, architecture_tensors

    random = parse_random_source(source)
    arch = random.architecture()
    components = build_components(arch, "meta", torch.bfloat16)
    tensors = {
        name: tuple(
            Tensor(key, _SAFETENSORS_DTYPES.get(value.dtype, "BF16"), value.numel(), value.dim())
            for key, value in components[name].state_dict().items()
        )
        for name in ("transformer", "text_encoder", "vae")
    }
    return architecture_tensors(arch, tensors)


def tensor_rows(source: str) -> dict[str, list[list]]:
    """``model_tensors(source)`` as the packaged tensor table holds it: component → ``[name, dtype, numel, ndim]``."""
    return {c: [[t.name, t.dtype, t.numel, t.ndim] for t in ts] for c, ts in model_tensors(source).components.items()}


def write_tensor_tables(path=None) -> None:
    """Write the packaged tensor table (``random_source.TENSOR_TABLES``) of every packaged architecture, built on the
    meta device with the installed diffusers and transformers. Run it after changing an architecture's JSON:
    ``python -c "from qwen_image_server.models.random_arch import write_tensor_tables; write_tensor_tables()"``."""
    import gzip
    from importlib import metadata, resources

    from .random_source import TENSOR_TABLES, architectures

    made_with = {package: metadata.version(package) for package in ("diffusers", "transformers")}
    tables = {name: {"made_with": made_with, "components": tensor_rows(f"random:{name}")} for name in sorted(architectures())}
    target = Path(path) if path else Path(str(resources.files(__package__).joinpath("architectures", TENSOR_TABLES)))
    # mtime 0: the same tables give the same bytes
    target.write_bytes(gzip.compress(json.dumps(tables, separators=(",", ":"), sort_keys=True).encode(), 9, mtime=0))


def parameter_counts(name: str, **overrides: int) -> dict[str, int]:
    """Parameters of each module of a packaged architecture, counted on the meta device (no memory)."""
    text = "&".join(f"{key}={value}" for key, value in overrides.items())
    random = parse_random_source(f"random:{name}" + (f"?{text}" if text else ""))
    components = build_components(random.architecture(), "meta", torch.bfloat16)
    return {key: sum(p.numel() for p in components[key].parameters()) for key in ("transformer", "text_encoder", "vae")}
