"""Run-profile settings over HTTP: step caching (``--cache``, the request's ``cache`` field, the ``stats`` object) and
``--vae-tiling``, on one server with a model for each."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

STEPS = 4
BODY = {"model": "cached", "prompt": "a lighthouse at dusk", "size": "64x64", "num_inference_steps": STEPS, "seed": 11}


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


@pytest.fixture(scope="module")
def server(options_server):
    """The shared server of model options (tests/model_files.py): ``cached`` with ``--cache fbcache:threshold=1@cached``
    and ``tiled`` with ``--vae-tiling on@tiled``, the same tiny weights; images from 64x64."""
    return options_server


@pytest.mark.e2e
def test_cache_flag_request_field_and_stats(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        card = http.get("/v1/models/cached").json()
        assert card["profile"]["cache"] == "fbcache:threshold=1"

        cached = http.post("/v1/images/generations", json=BODY)
        assert cached.status_code == 200, cached.text[:300]
        stats = cached.json()["stats"]
        assert stats["transformer_calls"] == 2 * STEPS, "true CFG: a cond and an uncond call per step"
        assert 0 < stats["cached_calls"] < 2 * STEPS

        plain = http.post("/v1/images/generations", json={**BODY, "cache": "none"})
        assert plain.status_code == 200, plain.text[:300]
        plain_stats = plain.json()["stats"]
        assert (plain_stats["transformer_calls"], plain_stats["cached_calls"]) == (2 * STEPS, 0)
        assert set(plain_stats) == {"transformer_calls", "cached_calls", "prompt_encodings", "prompt_cache_hits",
                                    "pipeline_seconds", "queue_seconds", "encode_seconds"}  # fmt: skip
        assert (plain_stats["prompt_encodings"], plain_stats["prompt_cache_hits"]) == (0, 2), "the same prompts again"
        assert not np.array_equal(_pixels(cached.json()), _pixels(plain.json()))

        never = http.post("/v1/images/generations", json={**BODY, "cache": "fbcache:threshold=0"})
        assert never.json()["stats"]["cached_calls"] == 0
        assert np.array_equal(_pixels(never.json()), _pixels(plain.json()))

        streamed = http.post("/v1/images/generations", json={**BODY, "stream": True})
        completed = [
            json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:") and "completed" in line
        ]
        calls = lambda st: (st["transformer_calls"], st["cached_calls"])  # noqa: E731 (timings differ per run)
        assert len(completed) == 1 and calls(completed[0]["stats"]) == calls(stats)

        bad = http.post("/v1/images/generations", json={**BODY, "cache": "fbcache:threshold=5"})
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["param"] == "cache" and "policy fbcache: knob threshold: '5' is not in [0, 1]" in error["message"]


@pytest.mark.e2e
def test_vae_tiling_flag_reaches_its_model_only(server, tiny_t2i):
    """``--vae-tiling on@tiled``: the profile says so for that model only, and a 512x512 image (larger than a tile)
    decoded in tiles differs from the whole-image decode of the same weights and seed, at the same size."""
    body = {**BODY, "size": "512x512", "num_inference_steps": 2, "cache": "none"}
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        assert http.get("/v1/models/tiled").json()["profile"]["vae_tiling"] == "on"
        assert http.get("/v1/models/cached").json()["profile"]["vae_tiling"] == "off"
        tiled, whole = (http.post("/v1/images/generations", json={**body, "model": m}) for m in ("tiled", "cached"))
        assert tiled.status_code == whole.status_code == 200, tiled.text[:300] + whole.text[:300]
    tiled_pixels, whole_pixels = _pixels(tiled.json()), _pixels(whole.json())
    assert tiled_pixels.shape == whole_pixels.shape == (512, 512, 3)
    assert not np.array_equal(tiled_pixels, whole_pixels)
    refused = run_cli("plan", "--model", f"m={tiny_t2i}", "--vae-tiling", "tiles@m")
    assert refused.returncode == 2
    assert "--vae-tiling for model m: 'tiles' is not one of off, on" in refused.stderr
