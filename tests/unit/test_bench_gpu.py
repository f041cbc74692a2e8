"""bench/gpu.py's own logic, on CPU: no GPU, unsupported settings, targets and the table."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import imported_modules

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu", None)


def _run(*args: str, timeout: float = 180, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    command = [sys.executable, *python_flags, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    result = _run("--out", str(tmp_path / "results.jsonl"), python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    assert "no GPU visible" in result.stdout
    assert not (tmp_path / "results.jsonl").exists()
    imported = imported_modules(result.stderr)
    assert "qwen_image_server.models.machine" in imported and "torch" not in imported  # where no driver is, seconds saved


def test_a_setting_the_server_refuses_is_recorded_as_unsupported(tmp_path):
    out = tmp_path / "results.jsonl"
    result = _run("--smoke", "--settings", "smoke-unsupported", "--out", str(out))
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["setting"], record["status"], record["exit_code"]) == ("smoke-unsupported", "unsupported", 2)
    assert "'int3' is not one of none, fp8" in record["error"]
    assert record["torch"] and record["date"] and "--quantize" in record["server_args"]
    assert "| smoke-unsupported | unsupported: error: --quantize for model qwen-image" in result.stdout


def test_every_timed_request_sends_a_prompt_of_its_own_of_one_length(gpu_bench, tmp_path):
    """The server keeps the embeddings of prompts it has seen: were the warm requests to repeat the first one's prompt,
    they would skip the text encoder that the first request ran, and first/warm would measure that cache."""
    args = argparse.Namespace(smoke=True, size="256x256", runs=3)
    bench = gpu_bench.Bench(args, tmp_path)
    sent: list[tuple[str, str]] = []

    def request(server, setting, size, prompt, seed):
        sent.append((size, prompt))
        return 0.5, {"stats": {"pipeline_seconds": 0.4, "prompt_encodings": 1, "prompt_cache_hits": 1}}

    bench.request = request
    setting = gpu_bench.Setting("two-sizes", sizes=("256x256", "512x512"))
    record: dict = {}
    bench.measure(None, setting, record)
    timed = [prompt for _, prompt in sent]
    assert [size for size, _ in sent] == ["256x256"] * 4 + ["512x512"] * 4  # first + 3 warm, per size
    assert len(set(timed)) == len(timed) == 8 and len({len(p.encode()) for p in timed}) == 1
    assert all(p.startswith(gpu_bench.PROMPT) for p in timed)
    assert (record["prompt_encodings"], record["prompt_cache_hits"]) == (1, 1)


def test_unknown_settings_are_refused():
    result = _run("--settings", "eager,warp-speed")
    assert result.returncode == 2 and "unknown settings warp-speed" in result.stderr


def test_targets_met_and_missed_by_how_much(gpu_bench):
    record = {
        "setting": "compile-fp8-cfgbatch", "status": "ok", "error": None, "e2e_seconds_median": 10.0, "first_request_seconds": 10.5,
        "first_over_warm": 1.05, "pipeline_seconds_median": 9.5, "e2e_over_pipeline": 1.0526, "transformer_calls": 50,
        "peak_gpu_memory_gib": 58.04, "encode_seconds_median": 0.2,
    }  # fmt: skip
    checks = gpu_bench.target_checks(record)
    assert checks == [
        "≤ 8 s MISSED by 2.00 s (+25%)", "first ≤ 1.1x warm ok",
        "e2e/pipeline ≤ 1.02 MISSED: 1.053x (+0.033) (encoding the image: 0.200 s of it)",
    ]  # fmt: skip
    fast = {
        **record,
        "setting": "lightning-compile",
        "e2e_seconds_median": 0.7,
        "e2e_over_pipeline": 1.01,
        "first_over_warm": 1.3,
    }
    fast["sizes"] = {"1328x1328": {"first_over_warm": 1.05}}
    assert gpu_bench.target_checks(fast) == [
        "≤ 0.8 s ok", "first ≤ 1.1x warm MISSED: 1.300x (+0.200)", "first at 1328x1328 ≤ 1.1x warm ok", "e2e/pipeline ≤ 1.02 ok"
    ]  # fmt: skip
    stopped = {"setting": "eager", "status": "stopped", "error": "stopped by SIGTERM", "first_request_seconds": 21.5,
               "e2e_seconds": [19.0, 20.0], "peak_gpu_memory_gib": 57.96}  # fmt: skip
    failed = {"setting": "int4", "status": "failed", "error": "Traceback\n  line | two", "peak_gpu_memory_gib": None}
    unsupported = {"setting": "fp8", "status": "unsupported", "error": "error: no fp8"}
    lines = gpu_bench.markdown_table([record, unsupported, stopped, failed]).splitlines()
    assert len(lines) == 6 and {line.count("|") for line in lines} == {12}  # one row each, none broken by its error
    assert (
        "| compile-fp8-cfgbatch | ok | 10.000 | 10.500 | 1.05x | 9.500 | 0.200 | 1.053x | 50 | 58.0 | ≤ 8 s MISSED by 2.00 s"
        in lines[2]
    )
    assert lines[3].startswith("| fp8 | unsupported: error: no fp8 |")
    # a stopped setting keeps the figures it measured: the warm median, the first request, the peak
    assert lines[4].startswith("| eager | stopped: stopped by SIGTERM | 19.500 | 21.500 |") and "| 58.0 |" in lines[4]
    assert lines[5].startswith("| int4 | failed: Traceback line / two | – | – |")


def test_every_setting_runs_at_the_real_sizes_with_known_flags(gpu_bench):
    names = [s.name for s in gpu_bench.SETTINGS]
    assert len(names) == len(set(names))
    for setting in gpu_bench.SETTINGS:
        assert setting.fields["num_inference_steps"] in (8, 50)
    from typer.main import get_command

    from qwen_image_server.cli import app

    serve = get_command(app).commands["serve"]
    flags = {opt for param in serve.params for opt in param.opts}
    assert {arg for s in gpu_bench.SETTINGS for arg in s.args if arg.startswith("--")} <= flags


def test_a_streamed_answer_gives_its_stats_and_the_previews_counted(gpu_bench):
    partial = 'data: {"type": "image_generation.partial_image", "partial_image_index": 0}'
    completed = 'data: {"type": "image_generation.completed", "stats": {"pipeline_seconds": 0.5, "transformer_calls": 8}}'
    lines = ["event: image_generation.partial_image", partial, "", partial, "", "event: image_generation.completed", completed]
    assert gpu_bench.read_stream(lines) == {"stats": {"pipeline_seconds": 0.5, "transformer_calls": 8}, "partial_images": 2}
    with pytest.raises(RuntimeError, match="ended with an error"):
        gpu_bench.read_stream([partial, 'data: {"type": "error", "error": {"message": "Task timeout"}}'])
    with pytest.raises(RuntimeError, match="without a completed event"):
        gpu_bench.read_stream([partial])


def test_a_setting_whose_model_fails_to_load_is_recorded_at_once(gpu_bench, tmp_path, monkeypatch):
    """A worker that cannot load (out of memory, an attention backend this machine lacks) leaves the server up with
    ``/ready`` at 503 "failed": the bench recorded it only after waiting --start-timeout (30 minutes by default)."""
    import httpx
    from serve_process import ModelsFailed, ready_state

    failed = {"status": "failed", "models": {"qwen-image": {"state": "failed", "error": "AttentionBackendError: no flash"}}}
    with pytest.raises(ModelsFailed, match="qwen-image: AttentionBackendError: no flash") as caught:
        ready_state(httpx.Response(503, json=failed))
    assert ready_state(httpx.Response(503, json={"status": "loading"})) is False
    assert ready_state(httpx.Response(200, json={"status": "ready"})) is True

    started: list[dict] = []

    class Server:  # bench/gpu.py's server, up with its model failed
        def __init__(self, args, env, log_path):
            started.append(env)

        def wait_ready(self, timeout):
            raise caught.value

        def stop(self, timeout=60):
            pass

    monkeypatch.setattr(gpu_bench, "Server", Server)
    args = argparse.Namespace(smoke=True, size="256x256", runs=1, start_timeout=1800, gpu_name="none")
    bench = gpu_bench.Bench(args, tmp_path)
    record = bench.run(gpu_bench.Setting("flash", ("--attention-backend", "flash")))
    assert (record["status"], record["error"]) == (
        "unsupported",
        "models failed to load: qwen-image: AttentionBackendError: no flash",
    )
    assert started[0]["QIS_WORKER_RESTART_LIMIT"] == "0"  # the first failure is final: no restarts to wait through


class _Answering:
    """bench/gpu.py's server, ready at once, whose /v1/models answers one model with a compiled profile."""

    def __init__(self, args, env, log_path):
        self.client = self

    def wait_ready(self, timeout):
        pass

    def get(self, path):
        return self

    def json(self):
        return {"data": [{"profile": {"compile": True}}]}

    def stop(self, timeout=60):
        pass


def test_a_setting_stopped_by_sigterm_keeps_what_it_measured(gpu_bench, tmp_path, monkeypatch):
    """scripts/gpu-check.sh stops a stage whose time ran out with SIGTERM (and kills it 15 s later): the running
    setting's record was lost with everything it had measured (its start-up, its first request)."""
    stops: list[float] = []

    class Server(_Answering):
        def stop(self, timeout=60):
            stops.append(timeout)

    sent: list[str] = []

    def request(server, setting, size, prompt, seed):
        sent.append(prompt)
        if len(sent) == 3:  # SIGTERM during the second warm request
            bench.stop(15, None)
        return 1.5 if len(sent) == 1 else 1.0, {"stats": {"pipeline_seconds": 0.9}}

    monkeypatch.setattr(gpu_bench, "Server", Server)
    args = argparse.Namespace(smoke=True, size="256x256", runs=3, start_timeout=1800, gpu_name="none")
    bench = gpu_bench.Bench(args, tmp_path)
    monkeypatch.setattr(bench, "request", request)
    record = bench.run(gpu_bench.Setting("compile", ("--compile",)))
    assert record["status"] == "stopped" and "SIGTERM" in record["error"]
    assert record["startup_seconds"] >= 0 and record["profile"] == {"compile": True}
    assert (record["first_request_seconds"], record["e2e_seconds"]) == (1.5, [1.0])
    assert stops == [gpu_bench.STOP_SECONDS] and gpu_bench.STOP_SECONDS < 15


def test_sigterm_outside_a_wait_is_noted_and_never_costs_a_record_or_a_server(gpu_bench, tmp_path, monkeypatch):
    """SIGTERM raised at once wherever it came: one that came while a finished setting's server stopped lost that
    setting's record and left the server running; one during a server's start-up, before it could be stopped, the
    same. Outside a wait it is noted, and checked after."""
    stops: list[float] = []

    class Server:
        def __init__(self, args, env, log_path):
            bench.stop(15, None)  # while the server process starts: not a wait
            self.client = self

        def wait_ready(self, timeout):
            raise AssertionError("a server whose start was stopped is not waited for")

        def stop(self, timeout=60):
            stops.append(timeout)

    monkeypatch.setattr(gpu_bench, "Server", Server)
    args = argparse.Namespace(smoke=True, size="256x256", runs=1, start_timeout=1800, gpu_name="none")
    bench = gpu_bench.Bench(args, tmp_path)
    record = bench.run(gpu_bench.Setting("eager"))
    assert record["status"] == "stopped" and stops == [gpu_bench.STOP_SECONDS]

    class Finished(_Answering):
        def stop(self, timeout=60):
            bench.stop(15, None)  # while a finished setting's server stops
            stops.append(timeout)

    monkeypatch.setattr(gpu_bench, "Server", Finished)
    bench = gpu_bench.Bench(args, tmp_path)
    monkeypatch.setattr(bench, "request", lambda *a, **k: (1.0, {"stats": {}}))
    record = bench.run(gpu_bench.Setting("eager"))
    assert record["status"] == "ok" and record["e2e_seconds"] == [1.0] and bench.stop.asked


def test_sigterm_ends_the_run_with_the_running_settings_record_and_its_server_stopped(tmp_path):
    out = tmp_path / "results.jsonl"
    command = [sys.executable, str(SCRIPT), "--smoke", "--settings", "smoke,smoke-edit", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server_log = tmp_path / "logs" / "smoke.log"
    family: list[psutil.Process] = []  # the server and its workers, killed at the end whatever the outcome
    try:
        try:
            assert bench.stdout.readline().startswith("smoke: serve")
            deadline = time.monotonic() + 60
            while not (server := psutil.Process(bench.pid).children()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # its server is starting
            family = psutil.Process(bench.pid).children(recursive=True)
            bench.send_signal(signal.SIGTERM)
            output, _ = bench.communicate(timeout=15)
        finally:
            bench.kill()
        assert bench.returncode == 143, output
        (record,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert (record["setting"], record["status"]) == ("smoke", "stopped") and record["torch"]
        assert "smoke-edit" not in output.split("results appended")[0], "nothing more runs"
        assert server_log.exists() and server, "its server had started"
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server), "and is gone"
    finally:
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_gpu_memory_keeps_the_peak_of_each_phase(monkeypatch):
    """Loading a model (FP8 conversion, compiling) can use more of the GPU than serving it: the record had one peak
    over the server's whole life, so a serving figure could not be read from it."""
    from serve_process import GpuMemory

    readings = iter([31_000.0])
    monkeypatch.setattr(GpuMemory, "used_mib", staticmethod(lambda: next(readings)))
    memory = GpuMemory()
    memory._record(50_000.0)  # the bf16 weights before their FP8 conversion
    memory.phase("serving")  # one reading at the switch, counted to the phase that ends
    memory._record(40_000.0)
    memory._record(None)  # nvidia-smi did not answer
    assert memory.peaks == {"loading": 50_000.0, "serving": 40_000.0} and memory.peak_mib == 50_000.0


def test_a_failed_setting_ends_the_run_with_exit_1(gpu_bench, tmp_path, monkeypatch):
    """A setting that failed (its server broke, a request failed) was recorded and the run still ended 0, which the
    GPU check's stage took as a success."""

    class Broken:
        def __init__(self, args, env, log_path):
            pass

        def wait_ready(self, timeout):
            raise RuntimeError("the server exited")

        def stop(self, timeout=60):
            pass

    monkeypatch.setattr(gpu_bench, "Server", Broken)
    out = tmp_path / "results.jsonl"
    assert gpu_bench.main(["--smoke", "--settings", "smoke", "--out", str(out)]) == 1
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["status"] == "failed" and "the server exited" in record["error"]


@pytest.mark.e2e
def test_ray_overhead_stops_its_embedded_server_when_ray_cannot_start(tmp_path, tiny_t2i):
    """Ray's start came before the ``try`` whose ``finally`` stops the embedded server: a Ray that could not start
    (here: an address nothing listens on) left that server running, reparented to init."""
    pytest.importorskip("ray")
    import shutil

    from serve_process import free_port

    from qwen_image_server.models.tiny import TINY_MODEL_VERSION

    # the script's model folder in its temporary folder (TMPDIR, here), so that it is not built again
    shutil.copytree(tiny_t2i, tmp_path / "qwen-image-server-bench" / f"tiny-text-to-image-v{TINY_MODEL_VERSION}")

    script = SCRIPT.with_name("ray_overhead.py")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(script), "--runs", "1", "--warmup", "0", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode != 0
    deadline = time.monotonic() + 30
    while (left := _servers_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]


def _servers_under(folder: Path) -> list[psutil.Process]:
    """The processes whose IMAGE_OUTPUT_DIR is under ``folder``."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("IMAGE_OUTPUT_DIR", "").startswith(str(folder)):
                found.append(process)
    return found
