"""``--compile``: a server warms its compiled model before ``/ready`` turns 200, then serves without compiling."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.e2e
def test_ready_only_after_the_warm_up_and_requests_then_do_not_compile(start_server, tiny_t2i):
    server = start_server(
        "--model", f"compiled-tiny={tiny_t2i}", "--compile", "--compile-sizes", "256x256",
        env={"QIS_CPU_THREADS": "1"},
    )  # fmt: skip
    logs = server.logs(tail=None)
    warmed = logs.find("compiled compiled-tiny and warmed sizes 256x256")
    ready = re.search(r"worker \S+ ready", logs)
    assert warmed >= 0 and ready and warmed < ready.start(), logs[-3000:]  # the worker reported ready after warming
    card = httpx.get(f"{server.base_url}/v1/models/compiled-tiny", timeout=10).json()
    assert (card["profile"]["compile"], card["profile"]["compile_sizes"]) == (True, ["256x256"])
    prompt = "a lighthouse on a cliff at dusk, " * 6
    body = {"model": "compiled-tiny", "prompt": prompt, "size": "256x256", "num_inference_steps": 2}
    response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1
    after_ready = server.logs(tail=None)[ready.end() :]
    assert "new graph" not in after_ready  # neither the prompt's length nor the negative prompt's compiled anything
