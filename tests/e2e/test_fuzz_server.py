"""A short fuzz run against a real server on the tiny models: what only real pipelines and workers show.

The same generated bodies as the in-process fuzzing (tests/fuzz_bodies.py), fewer
of them, against ``options_server``: it serves the bodies' model names (``tiny``,
``tiny-edit``, ``tiny-edit-plus``) beside its other models, one worker each, with
its limits set low (4 steps, 2 images, sides up to 512) so that no fuzzed request
runs long. Every response must pass the same checks, no worker may have died on any
input, and the server must still be ready after.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_bodies import check_response, json_body, multipart_body, request_fields
from model_files import OPTIONS_SERVER_IDS
from qwen_image_server.protocol.images import EditRequest, GenerationRequest, VariationRequest

pytestmark = pytest.mark.e2e


def _json(path: str, model) -> st.SearchStrategy:
    images = path != "/v1/images/generations"
    return json_body(request_fields(model.model_json_schema(), images=images)).map(lambda body: (path, "application/json", body))


def _multipart(path: str) -> st.SearchStrategy:
    return multipart_body().map(lambda part: (path, *part))


requests = st.one_of(
    _json("/v1/images/generations", GenerationRequest),
    _json("/v1/images/edits", EditRequest),
    _json("/v1/images/variations", VariationRequest),
    _multipart("/v1/images/edits"),
    _multipart("/v1/images/variations"),
)


def test_fuzzed_requests_against_a_real_server(options_server):
    assert {"tiny", "tiny-edit", "tiny-edit-plus"} <= OPTIONS_SERVER_IDS  # the fuzzed bodies' model names
    statuses = []
    with httpx.Client(base_url=options_server.base_url, timeout=120) as client:

        @settings(derandomize=True, deadline=None, database=None, max_examples=50, suppress_health_check=list(HealthCheck))
        @given(requests)
        def run(request):
            path, content_type, body = request
            response = client.post(path, content=body, headers={"content-type": content_type})
            check_response(response.status_code, response.headers, response.content)
            statuses.append(response.status_code)

        run()
        assert client.get("/health").status_code == 200
    assert 200 in statuses and 400 in statuses
    status = options_server.status()
    assert status["status"] == "ready", status
    for model, state in status["models"].items():
        assert state.get("worker_restarts", 0) == 0, (model, state)  # no input killed a worker
