"""Clear failures of a real server, as a user meets them: url images that cannot be stored (through the openai SDK)
and invalid settings on the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest

pytestmark = pytest.mark.e2e


def test_url_images_that_cannot_be_stored_fail_clearly_and_b64_still_works(start_server, tiny_t2i, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    server = start_server(
        "--model", f"tiny={tiny_t2i}", env={"IMAGE_OUTPUT_DIR": str(blocked / "images"), "QIS_CPU_THREADS": "1"}
    )  # fmt: skip
    assert "url responses will fail: Could not store the image for response_format=url (Not a directory)" in server.logs()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    fast = {"num_inference_steps": 2}
    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(model="tiny", prompt="a lighthouse", response_format="url", extra_body=fast)
    error = failed.value.body
    assert error["code"] == "storage_failed" and str(tmp_path) not in str(failed.value.response.text)
    assert error["message"].startswith("Could not store the image for response_format=url (Not a directory)")
    image = client.images.generate(model="tiny", prompt="a lighthouse", response_format="b64_json", extra_body=fast)
    assert image.data[0].b64_json


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
