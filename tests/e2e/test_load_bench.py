"""bench/load.py with tiny numbers: it starts its server, bursts and soaks, loses nothing and stops by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CACHE

pytestmark = pytest.mark.e2e


def test_load_bench_runs_and_loses_nothing(tmp_path, tiny_t2i, tiny_edit):
    out = tmp_path / "load.json"
    env = {**os.environ, "QIS_TEST_MODEL_DIR": str(TINY_CACHE.parent), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--soak", "10", "--burst-factor", "2", "--concurrency", "4"]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["capacity"] == 5  # 1 worker + a queue of 4
    assert report["burst"]["requests"] == 10 and report["burst"]["lost"] == 0
    assert set(report["burst"]["statuses"]) <= {"200", "503"} and report["burst"]["statuses"].get("200", 0) >= 1
    assert report["soak"]["requests"] == 10 and report["soak"]["lost"] == 0 and report["soak_not_sent"] == 0
    assert set(report["soak_by_kind"].get("invalid", {})) <= {"400"}  # refused as invalid, never a 5xx
    assert report["health_after"] == 200
    assert report["rss_mib_start"] > 0 and report["rss_mib_end"] > 0


def test_load_bench_refuses_a_non_loopback_url():
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), "--url", "http://10.1.2.3:8000", "--soak", "1"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
