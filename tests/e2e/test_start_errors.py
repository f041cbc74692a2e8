"""Clear failures of the real command line, as a user meets them: invalid settings name the flag and the variables.
(Url images that cannot be stored are in test_keyed_server.py.)"""

from __future__ import annotations

import subprocess

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_cli_invalid_settings_name_the_flag_and_the_variables():
    done = run_cli("serve", "--demo", "--workers", "x@nope", "--port", "0", env={"TASK_QUEUE_SIZE": "0"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "error: invalid settings:",
        "  --workers: expected N@MODEL with N from 1 to 64, got 'x@nope'",
        "  TASK_QUEUE_SIZE or QIS_QUEUE_SIZE: Input should be greater than or equal to 1 (got '0')",
    ]


def test_cli_per_model_limits_name_a_served_model_and_a_valid_value():
    def serve(*flags: str) -> subprocess.CompletedProcess:
        return run_cli("serve", "--demo", "--port", "0", *flags)

    unknown = serve("--queue-size", "1@nope", "--task-timeout", "5@qwen-image-tiny")
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    assert unknown.stderr.splitlines()[-1] == (
        "error: --queue-size (or QIS_MODEL_QUEUE_SIZE) names models that are not served: nope (served: qwen-image-tiny, qwen-image-edit-tiny)"
    )
    malformed = serve("--task-timeout", "0@qwen-image-tiny")
    assert malformed.returncode == 2, malformed.stderr[-2000:]
    assert malformed.stderr.splitlines() == [
        "error: invalid settings:",
        "  --task-timeout: expected S@MODEL with S above 0, got '0@qwen-image-tiny'",
    ]
