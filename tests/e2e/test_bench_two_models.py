"""bench/two_models.py on the tiny models (``--tiny``, CPU): both designs serve the whole mixed stream, and the
shared design serves both models from one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench" / "two_models.py"


def test_both_designs_serve_the_mixed_stream(tmp_path, tiny_t2i, tiny_edit):
    out = tmp_path / "two.jsonl"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--requests", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = {r["design"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"separate", "shared"}
    for record in records.values():
        assert record["ready"] and record["statuses"] == {"200": 4} and record["lost"] == 0, record
        assert record["prompts"] == 4  # each request its own prompt: none skips the text encoder
    assert records["separate"]["worker_processes"] == 2 and records["shared"]["worker_processes"] == 1
    assert records["shared"]["quantize"] == {"qwen-image": "none", "qwen-image-edit": "none"}  # as /ready says
    assert "| shared | 1 |" in done.stdout and "(80) |" in done.stdout  # the table, each design against its card
