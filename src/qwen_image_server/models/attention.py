"""The transformer's attention backend (``--attention-backend NAME``), through diffusers' attention dispatcher.

The name is checked in the API process before anything loads (``validate_attention_backend``:
an unknown name is a start-up error listing the valid ones). In the worker,
``apply_attention_backend`` checks that the backend can run here before the first
request does: its package (flash-attn, sageattention, xformers, kernels...), and its
device and dtype constraints, by running it once on tiny tensors of the run's device
and dtype. It also finds out whether the backend takes an attention mask, which
batched CFG needs when the prompt and the negative prompt differ in length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .profile import ProfileError

log = logging.getLogger(__name__)


def backend_names() -> list[str]:
    """Every backend name diffusers' dispatcher knows (``AttentionBackendName``), whether usable here or not."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [member.value for member in AttentionBackendName]


def validate_attention_backend(name: str | None, model: str) -> None:
    """Refuse a backend name diffusers does not know, with the list of valid names (``ProfileError``)."""
    if name is None:
        return
    names = backend_names()
    if name.strip().lower() not in names:
        raise ProfileError(
            f"--attention-backend (or the model folder's attention_backend) for model {model}: {name!r} is not a "
            f"diffusers attention backend (valid: {', '.join(names)})"
        )


class AttentionBackendError(RuntimeError):
    """The configured attention backend cannot run in this worker; the message names it and what is missing."""


@dataclass(frozen=True)
class AttentionInfo:
    """The backend in use (None: diffusers' default) and whether it takes an attention mask."""

    backend: str | None
    takes_mask: bool

    def summary(self) -> dict:
        return {"backend": self.backend or "default", "takes_mask": self.takes_mask}


def _tiny_qkv(device: str, dtype, heads: int, head_dim: int):
    import torch

    q, k, v = (torch.randn(1, 8, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool, device=device)
    mask[..., -2:] = False  # key padding, as Qwen-Image's processor builds it for padded text
    return q, k, v, mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _runs(backend, device: str, dtype, heads: int, head_dim: int, with_mask: bool) -> str | None:
    """None when ``backend`` runs on tiny tensors (with a key-padding mask if asked), else why not."""
    import torch
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

    q, k, v, mask = _tiny_qkv(device, dtype, heads, head_dim)
    attn_mask = mask if with_mask else None
    try:
        name = backend or _AttentionBackendRegistry.get_active_backend()[0]
        for check in _AttentionBackendRegistry._constraints.get(name, []):  # device/dtype/shape rules, off by default
            check(query=q, key=k, value=v, attn_mask=attn_mask, is_causal=False)
        with torch.inference_mode():
            dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=backend)
    except Exception as exc:
        return _first_line(exc)
    return None


def apply_attention_backend(transformer, name: str | None, device: str, dtype, model: str) -> AttentionInfo:
    """Set ``name`` on ``transformer`` after checking that it runs here; ``AttentionBackendError`` otherwise.

    ``None`` keeps diffusers' default backend (only probed for mask support).
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    backend = None
    if name is not None:
        backend = AttentionBackendName(name.strip().lower())
        active = _AttentionBackendRegistry._active_backend  # set_attention_backend also changes the process-wide default
        try:
            transformer.set_attention_backend(backend.value)  # checks its package, fetches hub kernels
        except Exception as exc:
            _AttentionBackendRegistry.set_active_backend(active)
            raise AttentionBackendError(
                f"attention backend {backend.value!r} for model {model} is not usable: {_first_line(exc)}"
            ) from exc
        problem = _runs(backend, device, dtype, heads, head_dim, with_mask=False)
        if problem:
            transformer.reset_attention_backend()
            _AttentionBackendRegistry.set_active_backend(active)
            dtype_name = str(dtype).removeprefix("torch.")
            raise AttentionBackendError(
                f"attention backend {backend.value!r} for model {model} cannot run on {device} with {dtype_name}: {problem}"
            )
        # The model's attention layers hold the backend; the process-wide default stays, or a model of this process
        # that keeps the default (--share-components) would run this one's backend, and say "default".
        _AttentionBackendRegistry.set_active_backend(active)
    takes_mask = _runs(backend, device, dtype, heads, head_dim, with_mask=True) is None
    info = AttentionInfo(backend.value if backend is not None else None, takes_mask)
    if backend is not None:
        log.info("attention backend %s for %s (attention masks: %s)", backend.value, model, "yes" if takes_mask else "no")
    return info
