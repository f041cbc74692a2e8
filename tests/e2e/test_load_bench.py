"""bench/load.py with tiny numbers: it bursts and soaks a running server, loses nothing and stops by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

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
    assert report["burst"]["requests"] == 34 and report["burst"]["lost"] == 0, report
    assert report["burst"]["statuses"].get("200", 0) >= 1, report
    assert report["soak"]["requests"] == 12 and report["soak"]["lost"] == 0 and report["soak_not_sent"] == 0, report
    for phase in ("burst", "soak"):  # refusals are 503s (queue full) with the envelope, never another 5xx
        assert all(status in ("None", "503") or int(status) < 500 for status in report[phase]["statuses"]), report
    assert set(report["soak_by_kind"].get("invalid", {})) <= {"400"}, report  # refused as invalid
    assert report["health_after"] == 200
    assert report["rss_mib_start"] > 0 and report["rss_mib_end"] > 0


def test_load_bench_refuses_a_non_loopback_url():
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", "http://10.1.2.3:8000", "--soak", "1"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
