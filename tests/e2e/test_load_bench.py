"""bench/load.py with tiny numbers: it bursts and soaks a running server, loses nothing and stops by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.e2e


def test_load_bench_runs_and_loses_nothing(tmp_path, server):
    """Against the shared server (2 workers per model, a queue of 32): a burst of its capacity, then a short soak."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", server.base_url, "--pid", str(server.process.pid)]
    cmd += ["--workers", "2", "--queue-size", "32", "--burst-factor", "1", "--soak", "12", "--concurrency", "4"]
    cmd += ["--size", "256x256", "--steps", "2", "--json", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["capacity"] == 34
    assert report["burst"]["requests"] == 34 and report["burst"]["lost"] == report["burst"]["wrong"] == 0, report
    assert report["burst"]["statuses"].get("200", 0) >= 1, report
    assert report["soak"]["requests"] == 12 and report["soak"]["lost"] == report["soak"]["wrong"] == 0, report
    assert report["soak_not_sent"] == 0, report
    for phase in ("burst", "soak"):  # refusals are 503s (queue full) with the envelope, never another 5xx
        assert all(status in ("None", "503") or int(status) < 500 for status in report[phase]["statuses"]), report
    assert set(report["soak_by_kind"].get("invalid", {})) <= {"400"}, report  # refused as invalid
    assert report["health_after"] == 200
    assert report["rss_mib_start"] > 0 and report["rss_mib_end"] > 0


def test_load_bench_fails_when_valid_requests_are_refused(tmp_path, server):
    """Generations below the server's smallest side (256) are all refused as invalid: nothing is lost, but every
    answer is wrong for a valid request, and load.py says so and fails."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", server.base_url, "--workers", "2", "--queue-size", "32"]
    cmd += ["--burst-factor", "1", "--soak", "0", "--size", "128x128", "--json", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    burst = json.loads(out.read_text())["burst"]
    assert (burst["statuses"], burst["lost"], burst["wrong"]) == ({"400": 34}, 0, 34), burst
    assert burst["wrong_examples"] == ["generation: 400 invalid_value"]


def test_load_bench_says_when_no_server_answers():
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", f"http://127.0.0.1:{free_port()}", "--soak", "1"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "load.py: no server answers at http://127.0.0.1:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_load_bench_refuses_a_non_loopback_url():
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", "http://10.1.2.3:8000", "--soak", "1"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
