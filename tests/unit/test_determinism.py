"""Same seed, same pixels: jobs draw only from their own seeds; the ``deterministic`` switch sets torch's flags."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from multiprocessing import Pipe

import numpy as np
import pytest
import torch

from qwen_image_server.config import Settings
from qwen_image_server.jobs import Job
from qwen_image_server.models import determinism
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.profile import ProfileError, RunProfile, build_profile
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model


@pytest.fixture
def torch_flags(monkeypatch):
    """Torch's process-wide flags as they were, restored after the test (deterministic mode is process-wide)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cudnn.rnn.fp32_precision,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    torch.backends.cuda.matmul.fp32_precision = saved[4]
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = saved[5], saved[6]


def test_deterministic_mode_sets_torch_flags_and_cublas_workspace(torch_flags):
    torch.backends.cudnn.benchmark = True  # as a speed setting might have left it
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    info = determinism.apply_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert info == {
        "deterministic": True, "cudnn_benchmark": False, "cudnn_deterministic": True,
        "tf32_matmul": False, "tf32_cudnn": False, "cublas_workspace_config": ":4096:8",
    }  # fmt: skip


def test_deterministic_mode_keeps_an_operators_smaller_cublas_workspace(torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert determinism.apply_determinism(True)["cublas_workspace_config"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # not a deterministic setting: replaced
    assert determinism.apply_determinism(True)["cublas_workspace_config"] == ":4096:8"


def test_off_leaves_torch_defaults_alone(torch_flags):
    torch.backends.cudnn.benchmark = True
    info = determinism.apply_determinism(False)
    assert info["deterministic"] is False and info["cudnn_benchmark"] is True
    assert torch.backends.cudnn.benchmark is True and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_the_setting_comes_from_flags_environment_and_sidecar(monkeypatch, tiny_t2i):
    assert RunProfile().deterministic is False
    assert build_profile("m", {}, {"deterministic": ["true"]}).deterministic is True
    assert build_profile("m", {"deterministic": True}, {"deterministic": ["false"]}).deterministic is False  # flag wins
    with pytest.raises(ProfileError, match="deterministic for model m"):
        build_profile("m", {"deterministic": "sometimes"}, {})
    monkeypatch.setenv("QIS_DETERMINISTIC", "1")
    settings = Settings(models=[f"tiny={tiny_t2i}"])
    assert settings.deterministic is True
    (spec,) = resolve_configured(settings)
    assert spec.profile.deterministic is True and spec.profile.summary()["deterministic"] is True
    monkeypatch.delenv("QIS_DETERMINISTIC")
    (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"]))
    assert spec.profile.deterministic is False


def test_the_worker_reports_the_effective_setting_when_ready(torch_flags, tiny_t2i):
    from qwen_image_server.engine.worker import Ready, Stop, worker_main

    spec = resolve_model(str(tiny_t2i), "tiny")
    spec = replace(spec, profile=replace(spec.profile, deterministic=True))
    ours, theirs = Pipe()
    threads = torch.get_num_threads()
    worker = threading.Thread(target=worker_main, args=(spec, "cpu", "auto", 1, theirs, "w0"), daemon=True)
    worker.start()
    assert ours.poll(120), "the worker did not report"
    ready = ours.recv()
    ours.send(Stop())
    worker.join(timeout=30)
    torch.set_num_threads(threads)
    assert isinstance(ready, Ready), ready
    info = ready.info
    assert info["determinism"]["deterministic"] is True
    assert info["determinism"]["cublas_workspace_config"] == ":4096:8"


def _stochastic(runner: PipelineRunner) -> PipelineRunner:
    """A scheduler that adds fresh noise at every step, as a LoRA preset or a model folder may ask for."""
    pipe = runner.pipe
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, stochastic_sampling=True)
    return runner


@pytest.fixture(scope="module")
def edit_runner(tiny_edit):
    return _stochastic(PipelineRunner(resolve_model(str(tiny_edit)), device="cpu"))


@pytest.fixture(scope="module")
def t2i_runner(tiny_t2i):
    return _stochastic(PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu"))


def test_an_edit_ignores_the_workers_global_rng_state(edit_runner):
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    job = Job(mode="edit", prompt="make it green", seeds=[31], images=[image], num_inference_steps=3)
    outputs = []
    for perturbation in (0, 12345):  # two workers with different histories
        torch.manual_seed(perturbation)
        state = torch.get_rng_state()
        outputs.append(np.asarray(edit_runner.run(job)[0]))
        assert torch.equal(torch.get_rng_state(), state), "the job left the process's global RNG where it was"
    assert np.array_equal(outputs[0], outputs[1])
    other_seed = np.asarray(edit_runner.run(replace(job, seeds=[32]))[0])
    assert not np.array_equal(other_seed, outputs[0])


def test_stochastic_steps_draw_from_each_images_own_seed(t2i_runner):
    job = Job(mode="generate", prompt="a red cube", seeds=[7, 8], width=64, height=64, num_inference_steps=3)
    torch.manual_seed(1)
    batch = [np.asarray(image) for image in t2i_runner.run(job)]
    torch.manual_seed(2)
    singles = [np.asarray(t2i_runner.run(replace(job, seeds=[seed]))[0]) for seed in (7, 8)]
    # A batch of two and two batches of one may round differently in the CPU's matmuls (a step of 1 in a few
    # pixels on some CPUs); noise drawn from the process's RNG (seeded 1, then 2) would change every pixel.
    for batched, single in zip(batch, singles, strict=True):
        difference = np.abs(batched.astype(int) - single.astype(int))
        assert difference.max() <= 2 and (difference > 0).mean() < 0.001, (difference.max(), (difference > 0).mean())
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).mean() > 5


def test_the_scheduler_is_left_as_it_was(t2i_runner):
    scheduler = t2i_runner.pipe.scheduler
    t2i_runner.run(Job(mode="generate", prompt="p", seeds=[1], width=64, height=64, num_inference_steps=2))
    assert t2i_runner.pipe.scheduler is scheduler and "step" not in vars(scheduler)
