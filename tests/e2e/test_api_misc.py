"""Readiness as the real workers report it: every model, its workers, their processes and devices."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from conftest import LIMITED

MODELS = {
    "qwen-image-tiny": "text-to-image",
    "qwen-image-edit-tiny": "edit",
    "qwen-image-edit-plus-tiny": "edit-plus",
    LIMITED: "text-to-image",
}
WORKERS = {
    "qwen-image-tiny": 2,
    "qwen-image-edit-tiny": 1,
    "qwen-image-edit-plus-tiny": 2,
    LIMITED: 1,
}  # --workers 2 --workers 1@qwen-image-edit-tiny --workers 1@tiny-limits


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def test_ready_lists_every_model_and_its_workers(http):
    deadline = time.monotonic() + 60  # a worker replaced by another test may still be loading
    while (response := http.get("/ready")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["models"]) == set(MODELS)
    listing = http.get("/v1/models").json()
    cards = {card["id"]: card for card in listing["data"]}
    planned_gpus = {gpu["device"] for gpu in listing["gpus"]}
    if not torch.cuda.is_available():  # CPU workers: the plan checked them against this machine's memory
        host = listing["host"]
        assert host == body["host"] and host["workers"] == [f"{m}#{slot}" for m in MODELS for slot in range(WORKERS[m])]
        assert 0 < host["planned_gib"] < host["available_at_start_gib"] <= host["total_gib"]
        assert host["planned_gib"] == pytest.approx(sum(WORKERS[m] * cards[m]["memory"]["total_gib"] for m in MODELS), abs=0.05)
    for model_id, kind in MODELS.items():
        model = body["models"][model_id]
        assert model["kind"] == kind and model["ready"] is True
        workers = model["workers"]
        assert len(workers) == len({w["pid"] for w in workers}) == WORKERS[model_id]
        assert [w["name"] for w in workers] == [f"{model_id}#{slot}" for slot in range(WORKERS[model_id])]
        # Each worker reports the device it loaded on: the one the memory plan (/v1/models) gave its slot.
        assert sorted(w["device"] for w in workers) == sorted(cards[model_id]["memory"]["devices"])
        for worker in workers:
            assert worker["name"].startswith(model_id + "#")
            assert worker["state"] in ("idle", "busy")
            # --device auto: a planned GPU wherever the server's machine (this one) has any, else the CPU.
            device = worker["device"]
            if torch.cuda.is_available():
                assert device in planned_gpus, (worker, planned_gpus)
            else:
                assert device == "cpu" and not planned_gpus, worker
            assert isinstance(worker["pid"], int)
            assert worker["memory"]["offload"] == "none" and worker["memory"]["weights_dtype"] == "auto"
            assert set(worker["memory"]["placement"]) == {"transformer", "text_encoder", "vae"}
