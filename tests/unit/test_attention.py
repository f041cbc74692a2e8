"""--attention-backend: names checked before loading, availability checked at load, the backend applied."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen_image_server.jobs import Job
from qwen_image_server.models.attention import AttentionBackendError, apply_attention_backend, backend_names
from qwen_image_server.models.configured import resolve_models
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import ModelConfigError, resolve_model


def test_unknown_backend_is_refused_before_loading_with_the_valid_names(tiny_t2i):
    with pytest.raises(ModelConfigError) as caught:
        resolve_models([("tiny", str(tiny_t2i))], {"attention_backend": ["flash-attention-9"]})
    message = str(caught.value)
    assert "--attention-backend" in message and "tiny" in message and "'flash-attention-9'" in message
    assert "native" in message and "sage" in message and "flash" in message


def test_known_backends_pass_the_check_and_reach_the_profile(tiny_t2i):
    assert {"native", "flash", "sage", "xformers"} <= set(backend_names())
    [spec] = resolve_models([("tiny", str(tiny_t2i))], {"attention_backend": ["native@tiny"]})
    assert spec.profile.attention_backend == "native"


def _transformer(folder):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(folder / "transformer")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_backend_with_a_missing_package_fails_the_load_naming_it(tiny_t2i):
    with pytest.raises(AttentionBackendError) as caught:
        apply_attention_backend(_transformer(tiny_t2i), "flash", "cpu", torch.float32, "tiny")
    message = str(caught.value)
    assert "'flash'" in message and "tiny" in message and "flash-attn" in message


@pytest.mark.skipif(importlib.util.find_spec("sageattention") is not None, reason="sageattention is installed here")
def test_runner_load_fails_for_a_backend_whose_package_is_missing(tiny_t2i):
    spec = resolve_models([("tiny", str(tiny_t2i))], {"attention_backend": ["sage"]})[0]
    with pytest.raises(AttentionBackendError, match="sageattention"):
        PipelineRunner(spec, device="cpu")


def test_backend_that_cannot_run_on_this_device_or_dtype_fails_clearly(tiny_t2i):
    transformer = _transformer(tiny_t2i)
    with pytest.raises(AttentionBackendError) as caught:
        apply_attention_backend(transformer, "_native_flash", "cpu", torch.float32, "tiny")
    message = str(caught.value)
    assert "'_native_flash'" in message and "cpu" in message and "float32" in message and "bfloat16" in message
    processors = {type(m.processor._attention_backend) for m in transformer.modules() if hasattr(m, "processor")}
    assert processors == {type(None)}, "a refused backend is not left set"
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _AttentionBackendRegistry._active_backend.value == "native", "nor made the process-wide default"


def test_mask_support_is_probed(tiny_t2i):
    transformer = _transformer(tiny_t2i)
    assert apply_attention_backend(transformer, None, "cpu", torch.float32, "tiny").takes_mask
    info = apply_attention_backend(transformer, "native", "cpu", torch.float32, "tiny")
    assert info.backend == "native" and info.takes_mask
    backends = {
        m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor") and m.processor is not None
    }
    assert {getattr(b, "value", b) for b in backends} == {"native"}


def test_a_models_backend_is_its_own_not_the_processs_default(tiny_t2i):
    """Two models in one process (``--share-components``), one with a backend of its own: the other keeps diffusers'
    default. diffusers' ``set_attention_backend`` also makes its backend the process-wide default, which the other
    model's attention (no backend of its own) then used."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    own, other = _transformer(tiny_t2i), _transformer(tiny_t2i)
    assert apply_attention_backend(own, "_native_math", "cpu", torch.float32, "own").backend == "_native_math"
    assert apply_attention_backend(other, None, "cpu", torch.float32, "other").backend is None
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    assert {m.processor._attention_backend.value for m in own.modules() if getattr(m, "processor", None)} == {"_native_math"}


def test_native_backend_gives_the_same_image_as_the_default(tiny_t2i):
    spec = resolve_model(str(tiny_t2i))
    job = Job(mode="generate", prompt="a red cube", seeds=[5], width=128, height=128, num_inference_steps=2)
    default = np.asarray(PipelineRunner(spec, device="cpu").run(job)[0])
    runner = PipelineRunner(replace(spec, profile=replace(spec.profile, attention_backend="native")), device="cpu")
    assert runner.speed.info["attention"] == {"backend": "native", "takes_mask": True}
    assert np.array_equal(np.asarray(runner.run(job)[0]), default)
