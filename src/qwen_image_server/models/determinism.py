"""Same seed, same pixels: the per-job RNG discipline and the ``deterministic`` run-profile switch.

By default every random draw of a job comes from the job's own seeds: diffusers'
pipelines take a list of ``torch.Generator`` (one per image) for the initial noise
and the VAE sampling of inpaint inputs. Two places can still reach for torch's
*global* RNG: a scheduler's ``step`` (the pipelines call it without a generator, so
a scheduler with ``stochastic_sampling`` draws its per-step noise from the global
RNG of the device) and any component that samples without being handed a
generator. ``job_rng`` closes both: the scheduler is handed the job's generators,
and the global RNGs are seeded from the job's first seed for the call (and restored
after it), so a worker's history no longer leaks into a job's pixels.

What remains on CUDA is the arithmetic itself: cuDNN may pick other convolution
algorithms (autotuning, or engines marked non-deterministic), cuBLAS may split
reductions differently across streams unless its workspace is fixed, some kernels
accumulate with atomics, and TF32 changes float32 results. ``apply_determinism``
(the profile's ``deterministic: true``, ``--deterministic``, ``QIS_DETERMINISTIC``)
turns torch's deterministic mode on for the worker process. It has to run before
the process's first cuBLAS call, because cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG``
when its handle is created; ``PipelineRunner`` calls it before loading anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

#: cuBLAS workspace setting that makes its results independent of stream scheduling (see the CUDA docs).
CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def prepare_environment(enabled: bool) -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS before CUDA is used in this process.

    A value the operator set already (``:16:8`` uses less memory) is kept.
    """
    if not enabled:
        return
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current not in _DETERMINISTIC_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if torch.cuda.is_initialized() and current not in _DETERMINISTIC_WORKSPACES:
        log.warning(
            "deterministic mode was switched on after CUDA started in this process; "
            "cuBLAS handles made before now keep their workspace setting"
        )


def apply_determinism(enabled: bool) -> dict:
    """Switch this process to torch's deterministic algorithms (when ``enabled``) and report what is in effect.

    ``enabled``: deterministic algorithms (warn only, so an operator without a
    deterministic implementation still runs and is logged), cuDNN without
    autotuning and with deterministic engines only, full float32 precision (no
    TF32) for matmuls and convolutions, and cuBLAS' fixed workspace. Off: torch's
    defaults are left alone. The returned dict goes out in the worker's ready info.
    """
    prepare_environment(enabled)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        _set_full_fp32_precision()
    return determinism_info()


# torch.backends.cudnn is replaced by a module object at import; its per-operator
# settings (conv, rnn) are not in its static type.
_cudnn: Any = torch.backends.cudnn


def _set_full_fp32_precision() -> None:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the new API (mixing both raises)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        _cudnn.fp32_precision = "ieee"
        _cudnn.conv.fp32_precision = "ieee"  # an operator-level value set before wins over the parent's
        _cudnn.rnn.fp32_precision = "ieee"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _tf32_in_use() -> dict:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {
            "tf32_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
            "tf32_cudnn": _cudnn.conv.fp32_precision == "tf32",
        }
    return {
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),  # pragma: no cover - older torch
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


def determinism_info() -> dict:
    """The process's effective settings: ``deterministic`` (torch's deterministic algorithms on) and the flags behind it."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        **_tf32_in_use(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _device_indices(device: str) -> list[int]:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return []
    return [torch.device(device).index or 0] if ":" in device else [torch.cuda.current_device()]


@contextlib.contextmanager
def job_rng(pipe, generators: list[torch.Generator], seed: int, device: str) -> Iterator[None]:
    """For one pipeline call: the scheduler draws from the job's ``generators``, the global RNGs start from ``seed``.

    The scheduler's ``step`` is wrapped on the instance (``pipe.scheduler`` as it is
    when entered: after a LoRA preset swapped it in) and restored after the call;
    the global RNG states of the CPU and the job's GPU are restored too.
    """
    scheduler = pipe.scheduler
    original = scheduler.step
    had_own = "step" in vars(scheduler)
    takes_generator = "generator" in _parameters(original)

    def step(*args, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = generators if len(generators) > 1 else generators[0]
        return original(*args, **kwargs)

    if takes_generator:
        scheduler.step = step
    try:
        with torch.random.fork_rng(devices=_device_indices(device)):
            torch.manual_seed(seed)
            yield
    finally:
        if takes_generator:
            if had_own:
                scheduler.step = original
            else:
                del scheduler.step


def _parameters(function) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()
