"""``--compile``: a server warms its compiled model before ``/ready`` turns 200, then serves without compiling."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import run_cli


@pytest.mark.e2e
def test_ready_only_after_the_warm_up_and_requests_then_do_not_compile(options_server):
    """``options_server``'s ``compiled`` model (``--compile on@compiled --compile-sizes 256x256@compiled``, with
    batched CFG and a step cache: their hooks and the split attention run around and in the compiled blocks); the
    server's other models are not compiled."""
    server = options_server
    logs = server.logs(tail=None)
    warmed = logs.find("compiled compiled and warmed sizes 256x256")
    ready = re.search(r"worker compiled#\d+ ready", logs)
    assert warmed >= 0 and ready and warmed < ready.start(), logs[-3000:]  # the worker reported ready after warming
    assert logs.count(" and warmed sizes ") == 1, "only the model named by --compile on@compiled compiles"
    assert httpx.get(f"{server.base_url}/v1/models/tiny", timeout=10).json()["profile"]["compile"] is False
    card = httpx.get(f"{server.base_url}/v1/models/compiled", timeout=10).json()
    assert (card["profile"]["compile"], card["profile"]["compile_sizes"]) == (True, ["256x256"])
    assert card["profile"]["cfg_batch"] == "on" and card["profile"]["cache"].startswith("fbcache:")
    url = f"{server.base_url}/v1/images/generations"
    prompt = "a lighthouse on a cliff at dusk, " * 6
    body = {"model": "compiled", "prompt": prompt, "size": "256x256", "num_inference_steps": 2}
    for fields in ({}, {"negative_prompt": "blurry, dark, low quality, " * 4}, {"true_cfg_scale": 1.0}):
        response = httpx.post(url, json={**body, **fields}, timeout=300)
        assert response.status_code == 200, response.text
        data, stats = response.json()["data"], response.json()["stats"]
        assert len(data) == 1
        assert stats["transformer_calls"] == (2 if fields.get("true_cfg_scale") == 1.0 else 4)
        assert 0 <= stats["cached_calls"] < stats["transformer_calls"]  # fbcache always computes the first step
    after_ready = server.logs(tail=None)[ready.end() :]
    assert "new graph" not in after_ready  # no prompt or negative prompt length, with or without CFG, compiled anything

    # a policy that would hook inside the compiled blocks is a 400, the server goes on serving
    refused = httpx.post(url, json={**body, "cache": "taylorseer"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache"
    assert "model compiled is compiled" in refused.json()["error"]["message"]
    assert httpx.post(url, json={**body, "cache": "taylorseer:lite=true"}, timeout=300).status_code == 200


@pytest.mark.e2e
def test_settings_that_cannot_run_in_compiled_blocks_stop_the_server_before_it_serves(tiny_t2i):
    result = run_cli("serve", "--model", str(tiny_t2i), "--port", "0", "--compile", "--weights-dtype", "fp8")
    assert result.returncode == 2
    assert "compile does not combine with weights_dtype=fp8" in result.stderr and "use quantize=fp8" in result.stderr
