"""Deterministic mode on a CUDA GPU (skipped without one): the same edit gives the same pixels, in one process and in two at once."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Each run is a fresh process, as a worker is: deterministic mode must be on before the process's first cuBLAS call.
_EDIT_TWICE = textwrap.dedent(
    """
    import hashlib, sys
    from dataclasses import replace
    import numpy as np
    from qwen_image_server.jobs import Job
    from qwen_image_server.models.runner import PipelineRunner
    from qwen_image_server.models.spec import resolve_model

    spec = resolve_model(sys.argv[1], "tiny-edit")
    runner = PipelineRunner(replace(spec, profile=replace(spec.profile, deterministic=True)), device="cuda")
    # the server's own, or the other deterministic size an operator may have set (determinism.py keeps it)
    assert runner.determinism["deterministic"] and runner.determinism["cublas_workspace_config"] in (":4096:8", ":16:8")
    image = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    job = Job(mode="edit", prompt="make it green", seeds=[31], images=[image], num_inference_steps=2)
    for _ in range(2):
        print(hashlib.sha256(np.asarray(runner.run(job)[0]).tobytes()).hexdigest())
    """
)


def test_same_edit_gives_equal_pixels_in_deterministic_mode(tiny_edit):
    runs = [
        subprocess.Popen([sys.executable, "-c", _EDIT_TWICE, str(tiny_edit)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    hashes = []
    for process in runs:  # both on the GPU at once, like a model's two workers
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0
        hashes += out.split()[-2:]
    assert len(hashes) == 4 and len(set(hashes)) == 1, hashes
