"""Clear failures of the real command line, as a user meets them: invalid settings name the flag and the variables.
(Url images that cannot be stored are in test_keyed_server.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_cli_invalid_settings_name_the_flag_and_the_variables():
    env = {**os.environ, "TASK_QUEUE_SIZE": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "qwen_image_server.cli", "serve", "--demo", "--workers", "x@nope", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "error: invalid settings:",
        "  --workers: expected N@MODEL with N from 1 to 64, got 'x@nope'",
        "  TASK_QUEUE_SIZE or QIS_QUEUE_SIZE: Input should be greater than or equal to 1 (got '0')",
    ]
