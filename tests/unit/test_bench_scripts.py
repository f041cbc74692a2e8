"""Every benchmark script starts: its imports and options hold (one of them once imported a helper that had moved)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import imported_modules, run_cli

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("serve_process.py", "cli_args.py"))  # helpers


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


def _two_models_bench():
    spec = importlib.util.spec_from_file_location("two_models_bench", BENCH / "two_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_models_keeps_each_server_log_beside_the_json_file(tmp_path, monkeypatch):
    """A server that does not load leaves a line of its error in the record; its log, with the whole cause, is kept
    beside the ``--json`` file (``<stem>-<design>.log``) and named in the record. (The GPU and the servers are stubbed:
    each writes its log and exits.)"""
    import json

    from serve_process import ServerExited

    bench = _two_models_bench()

    class Server:
        def __init__(self, args, env, log_path):
            self.log_path = log_path
            log_path.write_text("Traceback (most recent call last):\n  loading the transformer\nerror: out of memory\n")

        def wait_ready(self, timeout):
            raise ServerExited(1, "error: out of memory")

        def stop(self, timeout=60):
            pass

    monkeypatch.setattr(bench, "ServeProcess", Server)
    monkeypatch.setattr(bench, "visible_gpu_name", lambda: "stub GPU")
    out = tmp_path / "two.jsonl"
    monkeypatch.setattr(sys, "argv", ["two_models.py", "--designs", "separate,shared", "--json", str(out)])
    assert bench.main() == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["design"], r["ready"]) for r in records] == [("separate", False), ("shared", False)]
    for record in records:
        log = tmp_path / f"two-{record['design']}.log"
        assert record["server_log"] == str(log)
        assert "loading the transformer" in log.read_text()


def test_two_models_records_the_gpu_memory_peak_while_the_stream_ran(tmp_path, monkeypatch):
    """What is in use after the stream is no high-water mark: an out-of-memory recovery empties the server's cache,
    and the probe that reads it has a CUDA context of its own. The peak sampled while the stream ran (``GpuMemory``, as
    the other benchmarks read it) is recorded and decides ``fits``; the figure after the stream is kept under its own
    name. (The GPU, the server and the stream are stubbed: 30 GiB at the peak, 10 after.)"""
    import json
    from types import SimpleNamespace

    bench = _two_models_bench()
    sampling: list[bool] = []

    class Memory:
        active = False

        def __init__(self, interval=0.5):
            self.peak_mib = None

        def __enter__(self):
            Memory.active, self.peak_mib = True, 30 * 1024.0
            return self

        def __exit__(self, *exc):
            Memory.active = False

    class Server:
        url = "http://127.0.0.1:9"

        def __init__(self, args, env, log_path):
            pass

        def wait_ready(self, timeout):
            pass

        def stop(self, timeout=60):
            pass

    async def run_stream(url, args, sent_prompts):
        sampling.append(Memory.active)
        sent_prompts.update({"a", "b"})
        return [{"kind": "generation", "status": 200, "seconds": 0.5, "lost": None, "code": None}] * 2, 1.0

    ready = {"models": {"qwen-image": {"workers": [{"pid": 11}]}, "qwen-image-edit": {"workers": [{"pid": 12}]}}}
    monkeypatch.setattr(bench, "ServeProcess", Server)
    monkeypatch.setattr(bench, "GpuMemory", Memory, raising=False)
    monkeypatch.setattr(bench, "run_stream", run_stream)
    monkeypatch.setattr(bench.httpx, "get", lambda url, timeout: SimpleNamespace(json=lambda: ready))
    monkeypatch.setattr(bench, "gpu_use", lambda: [{"device": "cuda:0", "name": "stub", "used_gib": 10.0, "total_gib": 80.0}])
    monkeypatch.setattr(bench, "visible_gpu_name", lambda: "stub GPU")
    out = tmp_path / "two.jsonl"
    argv = ["two_models.py", "--designs", "separate", "--requests", "2", "--card-gib", "20", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert sampling == [True]  # sampled while the stream ran
    assert (record["peak_used_gib"], record["used_after_stream_gib"]) == (30.0, 10.0)
    assert record["fits"] is False and record["fits_from"] == "peak during the stream"


def test_two_models_stopped_by_sigterm_keeps_its_record_stops_its_server_and_runs_no_more_designs(tmp_path, monkeypatch):
    """gpu-check.sh's budget ends the stage with SIGTERM (SIGKILL 15 s later): the design being measured was lost with
    the rest of the output, and a failing load was restarted with backoff. Now its record is written, its server
    given less than those 15 s, the next design not started, and a failed model not restarted."""
    import signal

    bench = _two_models_bench()
    stops: list[float] = []
    envs: list[dict] = []

    class Server:
        url = "http://127.0.0.1:9"

        def __init__(self, args, env, log_path):
            envs.append(env)

        def wait_ready(self, timeout):
            os.kill(os.getpid(), signal.SIGTERM)  # the budget runs out while the server loads
            time.sleep(5)
            raise AssertionError("SIGTERM did not stop the wait")

        def stop(self, timeout=60):
            stops.append(timeout)

    monkeypatch.setattr(bench, "ServeProcess", Server)
    monkeypatch.setattr(bench, "visible_gpu_name", lambda: "stub GPU")
    out = tmp_path / "two.jsonl"
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--designs", "separate,shared", "--requests", "2", "--json", str(out)]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is the caller's again"
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["design"] == "separate" and record["stopped"] and "SIGTERM" in record["error"]
    assert stops == [bench.STOP_SECONDS] and bench.STOP_SECONDS < 15
    assert [env["QIS_WORKER_RESTART_LIMIT"] for env in envs] == ["0"]


#: Stands in for python3 in scripts/gpu-check.sh: the GPU check and the import check pass; vae_fast.py fails midway
#: (its last line of output is progress, its traceback on stderr), text_encoder.py prints its JSON line, or, with
#: SLOW_TEXT_ENCODER set, runs until it is stopped.
_FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -c) echo "stub GPU, torch stub"; [ -z "${NO_CUDA:-}" ] || exit 1 ;;
  -) cat >/dev/null ;;
  bench/vae_fast.py) echo "diffusers decode:    100.0 ms"; echo "RuntimeError: CUDA error" >&2; exit 1 ;;
  bench/text_encoder.py) [ -n "${SLOW_TEXT_ENCODER:-}" ] && exec sleep 60; echo "stock   :    10.0 ms"; echo '{"speedup": 1.5}' ;;
  bench/memory_modes.py) echo "loading"; kill -9 $$ ;;
  -m) echo "$* (${STAGE_SECONDS:-no stage seconds})" >>"$PYTEST_CALLS" ;;
  *) echo "unexpected: $*" >&2; exit 3 ;;
esac
"""


def _gpu_check(tmp_path, *stages: str, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """scripts/gpu-check.sh with python3 stubbed: its run, ``$OUT`` and its ``GPU_RESULTS`` folder."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"
    bin_dir, out, results = tmp_path / "bin", tmp_path / "out", tmp_path / "results"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").write_text(_FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    environment = {**os.environ, "PATH": path, "OUT": str(out), "GPU_RESULTS": str(results), "GPU_BUDGET": "300", **env}
    environment.pop("WHEELS", None)
    done = subprocess.run(["bash", str(script), *stages], capture_output=True, text=True, timeout=120, env=environment)
    return done, out, results


def test_gpu_check_vae_stage_runs_both_benchmarks_and_keeps_only_json_lines(tmp_path):
    """The vae stage's text-encoder benchmark runs even when the VAE one fails (the stage then fails), and a .jsonl
    file gets a benchmark's JSON line only, never the last line of a run that failed. (python3 is a stand-in.) What
    comes back is three files in $OUT, whatever the stages wrote: a machine that returns only some of a run's files
    (8 on this project's lent GPUs) then returns them all."""
    done, out, results = _gpu_check(tmp_path, "vae")
    assert done.returncode == 1, done.stdout + done.stderr
    assert (results / "text_encoder.jsonl").read_text() == '{"speedup": 1.5}\n'
    assert not (results / "vae.jsonl").exists() or (results / "vae.jsonl").read_text() == ""
    assert "stage vae:" in (results / "stages.txt").read_text() and "exit 1" in (results / "stages.txt").read_text()
    log = (results / "vae.log").read_text()
    assert "RuntimeError: CUDA error" in log and "stock   :" in log

    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "results.tgz", "stages.txt"]
    assert (out / "stages.txt").read_text() == (results / "stages.txt").read_text()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == [{"file": "text_encoder.jsonl", "record": {"speedup": 1.5}}]
    with tarfile.open(out / "results.tgz") as packed:
        assert {"./vae.log", "./text_encoder.jsonl", "./stages.txt"} <= set(packed.getnames())
        assert "RuntimeError: CUDA error" in packed.extractfile("./vae.log").read().decode()


def test_gpu_check_stops_a_stage_at_its_own_cap(tmp_path):
    """Each stage runs at most its cap (STAGE_SECONDS_<STAGE>), so that one slow stage leaves the budget's rest to
    the next; a stage stopped so says it, and what it wrote is packed. A cap under the least a stage is started with
    skips it, saying why."""
    done, out, _ = _gpu_check(tmp_path, "vae", STAGE_SECONDS_VAE="1", MIN_STAGE_SECONDS="1", SLOW_TEXT_ENCODER="1")
    stages = (out / "stages.txt").read_text()
    assert done.returncode == 1 and "stage vae: stopped after its 1 s" in stages, done.stdout + done.stderr
    assert "exit 124" in stages and (out / "results.tgz").exists()
    done, out, _ = _gpu_check(tmp_path / "capped", "vae", STAGE_SECONDS_VAE="30")
    assert done.returncode == 0 and "stage vae: skipped, 30 s for it (" in (out / "stages.txt").read_text()
    assert "its cap 30 s; at least 45 s needed)" in (out / "stages.txt").read_text()


def test_gpu_check_tests_stage_runs_the_e2e_tests_first_and_lets_each_pytest_report_its_failures(tmp_path):
    """The tests stage ran the GPU-only unit tests first and the e2e tests (the hub-id edit among them) only after;
    with the stage's cap ending it, pytest was killed before its summary, and -rs had replaced the failures in the
    short summary with the skips. (python3 is a stand-in: it notes how pytest was called.)"""
    calls = tmp_path / "pytest-calls"
    done, out, _ = _gpu_check(tmp_path, "tests", STAGE_SECONDS_TESTS="100", PYTEST_CALLS=str(calls))
    assert done.returncode == 0, done.stdout + done.stderr
    e2e, unit = calls.read_text().splitlines()
    assert e2e.startswith("-m pytest -q -p no:cacheprovider -rfEs tests/e2e/test_hub_models.py") and e2e.endswith("(100)")
    assert "--continue-on-collection-errors -m gpu tests/unit" in unit


def test_gpu_check_tells_a_stage_killed_early_from_one_stopped_and_packs_whatever_ends_the_run(tmp_path):
    """Exit 137 is SIGKILL: at the end of a stage's time (after its grace) it was stopped, earlier something else
    killed it (the kernel, out of memory), which said "stopped" as well. A run that ends before any stage (no CUDA)
    still returns what it found; and the results folder may not be $OUT, into which it is packed."""
    done, out, _ = _gpu_check(tmp_path, "memory")
    stages = (out / "stages.txt").read_text()
    assert done.returncode == 1 and "stage memory: killed (SIGKILL) after " in stages, done.stdout + done.stderr
    assert "stopped" not in stages
    done, out, _ = _gpu_check(tmp_path / "no-cuda", "vae", NO_CUDA="1")
    assert done.returncode == 1 and (out / "stages.txt").read_text() == "stub GPU, torch stub\n"
    inside = tmp_path / "no-cuda" / "out" / "raw"
    done, _, _ = _gpu_check(tmp_path / "inside", "vae", OUT=str(inside.parent), GPU_RESULTS=str(inside))
    assert done.returncode == 2 and "must not be $OUT" in done.stderr


def test_gpu_check_refuses_a_misspelt_stage_before_any_stage_runs(tmp_path):
    """A misspelt stage after others was found only when its turn came, after the GPU time of the ones before it."""
    calls = tmp_path / "pytest-calls"
    done, out, _ = _gpu_check(tmp_path, "tests", "bnech", PYTEST_CALLS=str(calls))
    assert done.returncode == 2 and "unknown stage: bnech" in done.stderr, done.stdout + done.stderr
    assert not calls.exists() and not out.exists()


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGTERM (its SigCgt mask in /proc)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (15 - 1) & 1)


def test_cli_load_bench_stopped_by_sigterm_stops_the_server_it_started(tiny_t2i, tiny_edit):
    """``timeout`` or CI stop a run with SIGTERM, which ended load.py (and overhead.py, ray_overhead.py) without their
    ``finally``: the server they started kept running, holding its port and a core. Now SIGTERM ends them as Ctrl-C
    does (exit 143), their server stopped."""
    import psutil

    bench = subprocess.Popen(
        [sys.executable, str(BENCH / "load.py"), "--soak", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        servers: list = []
        while not servers and bench.poll() is None and time.monotonic() < deadline:
            servers = [p for p in psutil.Process(bench.pid).children() if "serve" in p.cmdline()]
            time.sleep(0.05)
        assert servers, "load.py started no server"
        bench.send_signal(15)
        assert bench.wait(timeout=60) == 143, bench.stderr.read()[-2000:]
        assert not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if bench.poll() is None:
            bench.kill()
        for child in servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@pytest.mark.parametrize("script", ["overhead.py", "ray_overhead.py"])
def test_cli_the_other_benchmarks_that_start_a_server_end_on_sigterm_through_their_cleanup(script):
    command = [sys.executable, str(BENCH / script), "--runs", "1"]
    bench = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while bench.poll() is None and not _catches_sigterm(bench.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        bench.send_signal(15)
        assert bench.wait(timeout=60) == 143, bench.stderr.read()[-2000:]
    finally:
        if bench.poll() is None:
            bench.kill()


def test_load_bench_counts_a_request_once_lost_or_wrong():
    """A plain-text 500 is lost (not the answer's format) and its status is not one a valid request may get: it was
    counted in both, and the run's failures twice."""
    load = _load_bench()
    results = [
        {"kind": "generation", "status": 500, "seconds": 0.1, "lost": "non-JSON response (500, text/plain)"},
        {"kind": "generation", "status": 400, "seconds": 0.1, "lost": None, "code": "invalid_value"},
        {"kind": "invalid", "status": 400, "seconds": 0.1, "lost": None, "code": "invalid_value"},
        {"kind": "generation", "status": None, "seconds": 0.1, "lost": "ReadTimeout: "},
    ]
    report = load.summary(results)
    assert (report["lost"], report["wrong"]) == (2, 1), report


@pytest.mark.parametrize(
    "command,message",
    [
        ("gpu.py --runs 0", "argument --runs: 0 is below 1"),
        ("gpu.py --size abc", "argument --size: 'abc' is not WIDTHxHEIGHT"),
        ("overhead.py --threads 0", "argument --threads: 0 is below 1"),
        ("overhead.py --size 100x100", "width and height must be multiples of 16"),
        ("ray_overhead.py --steps 1", "argument --steps: 1 is below 2"),
        ("text_encoder.py --runs 0", "argument --runs: 0 is below 1"),
        ("vae_fast.py --size 0x0", "width and height must be multiples of 16"),
        ("memory_modes.py x --modes bogus --cards 7", "unknown modes or cards: bogus, 7"),
        ("memory_modes.py x --cards abc", "--cards takes whole numbers of GB"),
        ("load.py --json /nonexistent-folder/report.json", "argument --json: /nonexistent-folder is not a folder"),
        ("load.py --url http://127.0.0.1:9 --pid 999999999", "--pid 999999999: no such process"),
        ("load.py --url 127.0.0.1:8000", "--url must be a URL such as http://127.0.0.1:8000"),  # not "not loopback"
        ("load.py --size abc", "argument --size: 'abc' is not WIDTHxHEIGHT"),  # it ran, and blamed the server
        ("load.py --steps 1", "argument --steps: 1 is below 2"),
        ("overhead.py --size 4096x4096", "width and height must be at most 2048"),  # the server's 400, after its start
        ("ray_overhead.py --steps 1001", "argument --steps: 1001 is above 1000"),
        ("text_encoder.py --device bogus", "argument --device: 'bogus' is not a device: cpu, cuda or cuda:N"),
        ("vae_fast.py --device gpu0", "argument --device: 'gpu0' is not a device"),  # torch's traceback, after its import
        ("memory_modes.py x --json /nonexistent-folder/m.jsonl", "argument --json: /nonexistent-folder is not a folder"),
    ],
)
def test_a_wrong_argument_is_refused_before_anything_starts(command, message):
    """Wrong values gave tracebacks after a model or server had started (or only on the GPU machine: the GPU check
    came first and a run without one ended 0): now argparse's exit 2, naming the flag, on any machine."""
    script, *args = command.split()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]
