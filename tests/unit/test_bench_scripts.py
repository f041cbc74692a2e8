"""Every benchmark script starts: its imports and options hold (one of them once imported a helper that had moved)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import imported_modules, run_cli

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "serve_process.py")  # that one is a helper


def test_every_script_is_listed():
    assert {"gpu.py", "overhead.py", "ray_overhead.py", "memory_modes.py", "two_models.py", "load.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_help_of_each_bench_script(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {script}")


def test_two_models_without_a_gpu_says_so_without_importing_torch():
    """Where no GPU driver is loaded (here: the GPU hidden) the benchmark ends at once, before torch (seconds)."""
    command = [sys.executable, "-X", "importtime", str(BENCH / "two_models.py")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA is not available" in done.stdout and "nothing was run" in done.stdout
    imported = imported_modules(done.stderr)
    assert "qwen_image_server.models.machine" in imported and "torch" not in imported


def _load_bench():
    spec = importlib.util.spec_from_file_location("load_bench", BENCH / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [[], ["--steps", "8", "--workers", "2", "--queue-size", "1"]])
def test_plan_command_accepts_the_server_load_bench_starts(argv, tiny_t2i, tiny_edit, tmp_path):
    """``python bench/load.py`` without ``--url`` starts a server of its own: the start checks (``plan``, as at
    ``serve``'s start) accept its options and environment. With its default 2 steps as the server's limit it once
    refused the tiny models, whose sidecar files ask for 4 by default, and the benchmark never ran."""
    load = _load_bench()
    args = load.argument_parser().parse_args(argv)
    options, env = load.server_options(args, {"text-to-image": tiny_t2i, "edit": tiny_edit}, tmp_path / "images")
    done = run_cli("plan", *options, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the plan fits" in done.stdout
    assert int(env["QIS_MAX_STEPS"]) >= args.steps  # every soak request stays within the limit
