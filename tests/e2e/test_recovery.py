"""A model whose workers cannot load: backoff, a "failed" state with a reason that leaks no paths, and recovery."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from model_files import unloadable


@pytest.fixture
def broken_model(tiny_t2i, tmp_path):
    folder = tmp_path / "models" / "broken-model"
    shutil.copytree(tiny_t2i, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    return folder, weights, unloadable(weights)


def _wait_for(condition, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except httpx.TransportError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_failed_model_is_reported_then_retried_until_it_loads(broken_model, tiny_t2i, tmp_path):
    from conftest import Server

    folder, weights, whole = broken_model
    server = Server(
        ["--model", f"good={tiny_t2i}", "--model", f"broken={folder}"],
        env={
            "QIS_CPU_THREADS": "1",
            "QIS_WORKER_RESTART_LIMIT": "1",
            "QIS_WORKER_RETRY_SECONDS": "2",
            "IMAGE_OUTPUT_DIR": str(tmp_path / "img"),
        },
        log_path=tmp_path / "server.log",
    )
    try:
        failed = _wait_for(lambda: (r := server.http.get("/ready")).json().get("status") == "failed" and r)
        assert failed.status_code == 503
        model = failed.json()["models"]["broken"]
        assert model["state"] == "failed"
        assert str(tmp_path) not in failed.text, "the model's absolute path is not shown to clients"
        assert "<path>" in model["error"] or model["error"]
        response = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a cat", "model": "broken"}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_unavailable"
        assert str(tmp_path) not in response.text
        ok = httpx.post(
            f"{server.base_url}/v1/images/generations",
            json={"prompt": "a cat", "model": "good", "num_inference_steps": 2},
            timeout=120,
        )
        assert ok.status_code == 200, "the other model keeps serving"
        logs = server.logs(tail=None)
        assert "restarting in 1s" in logs, "the second load waits (backoff)"
        # Mend the folder: the periodic retry loads it and it serves.
        weights.write_bytes(whole)
        _wait_for(lambda: server.http.get("/ready").status_code == 200)
        again = httpx.post(
            f"{server.base_url}/v1/images/generations",
            json={"prompt": "a cat", "model": "broken", "num_inference_steps": 2},
            timeout=120,
        )
        assert again.status_code == 200, again.text[:300]
        assert "model broken loaded again" in server.logs(tail=None)
    finally:
        server.stop()
