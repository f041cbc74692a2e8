"""Fuzzing the Images API in process: generated bodies for every endpoint, against the app on a fake engine.

The app is the real one (``create_app``: routes, validation, uploads, error handlers,
middlewares); only the engine is a fake that answers at once with a tiny image (and
refuses some jobs with a full queue), so hundreds of bodies run in seconds through
httpx's ASGI transport. Every response must be a success or an error in OpenAI's
envelope, never a 5xx but a full queue's 503, and the app must still answer after.
"""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from fuzz_bodies import check_response, json_body, multipart_body, request_fields
from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.engine.base import EngineDefaults
from qwen_image_server.errors import QueueFull
from qwen_image_server.jobs import EncodedImage, JobResult, PartialImage, TaskResult
from qwen_image_server.models.spec import ModelSpec
from qwen_image_server.protocol.images import EditRequest, VariationRequest

#: Reproducible (the same bodies on every run) and sized to keep the module well under a minute on two cores.
FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=200, suppress_health_check=list(HealthCheck))


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


class InstantEngine(EngineDefaults):
    """``EngineClient`` without workers: a 16x16 PNG per seed at once; every 11th admission finds the queue full."""

    def __init__(self):
        self.models = [
            ModelSpec("tiny", "/nowhere/tiny", "QwenImagePipeline", "text-to-image"),
            ModelSpec("tiny-edit", "/nowhere/edit", "QwenImageEditPipeline", "edit"),
            ModelSpec("tiny-edit-plus", "/nowhere/edit-plus", "QwenImageEditPlusPipeline", "edit-plus"),
        ]
        self.admissions = 0
        self.jobs = []
        self.image = _png(16, 16)

    async def start(self):
        pass

    async def close(self):
        pass

    def admit(self, model_id):
        self.admissions += 1
        if self.admissions % 11 == 0:
            raise QueueFull(retry_after=2)

    async def submit(self, model_id, job, on_partial=None):
        self.jobs.append(job)
        for index in range(job.n):
            for partial in range(job.partial_images):
                on_partial and on_partial(PartialImage(index, partial, EncodedImage(job.seeds[index], self.image, 16, 16)))
        now = time.time()
        width, height = job.out_width or job.width or 16, job.out_height or job.height or 16
        images = [EncodedImage(seed, self.image, width, height) for seed in job.seeds]
        return JobResult.combine([TaskResult(1, images, now, now, "w0", 3)])

    def ready(self):
        return True

    def status(self):
        return {spec.id: {"state": "ready", "queued_jobs": 0, "workers": []} for spec in self.models}


class App:
    """The app and one client on one event loop, for the whole module."""

    def __init__(self, tmp_path):
        self.engine = InstantEngine()
        settings = Settings(image_output_dir=tmp_path, max_upload_bytes=256 * 1024, max_steps=8)
        self.app = create_app(settings, self.engine)
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, path, **kwargs))

    def post(self, path: str, content: bytes, content_type: str) -> httpx.Response:
        response = self.request("POST", path, content=content, headers={"content-type": content_type})
        check_response(response.status_code, response.headers, response.content)
        return response

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = App(tmp_path_factory.mktemp("fuzz"))
    yield app
    assert app.request("GET", "/health").status_code == 200  # alive after everything
    app.close()


def _schema(app: App, name: str) -> tuple[dict, dict]:
    """A request model's schema as the app publishes it in /openapi.json."""
    document = app.request("GET", "/openapi.json").json()
    defs = document["components"]["schemas"]
    return defs[name], defs


def test_generation_bodies(app):
    schema, defs = _schema(app, "GenerationRequest")
    statuses = []

    @FUZZ
    @given(json_body(request_fields(schema, defs)))
    def run(body):
        statuses.append(app.post("/v1/images/generations", body, "application/json").status_code)

    run()
    assert {200, 400, 503} <= set(statuses)  # the bodies reach every outcome: made, refused, queue full


@pytest.mark.parametrize("path,model", [("/v1/images/edits", EditRequest), ("/v1/images/variations", VariationRequest)])
def test_json_bodies_with_images(app, path, model):
    statuses = []
    jobs = len(app.engine.jobs)

    @settings(FUZZ, max_examples=130)  # each decodes its images
    @given(json_body(request_fields(model.model_json_schema(), images=True)))
    def run(body):
        statuses.append(app.post(path, body, "application/json").status_code)

    run()
    assert {200, 400} <= set(statuses)
    assert len(app.engine.jobs) > jobs  # some fuzzed bodies were valid enough to run


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/images/variations"])
def test_multipart_bodies(app, path):
    statuses = []

    @FUZZ
    @given(multipart_body())
    def run(part):
        content_type, body = part
        statuses.append(app.post(path, body, content_type).status_code)

    run()
    assert {200, 400} <= set(statuses)
    assert app.request("GET", "/health").status_code == 200


def test_the_checks_catch_a_bare_500():
    """The response checks fail on what the fuzzing looks for (so a passing run means something)."""
    with pytest.raises(AssertionError):
        error = b'{"message": "x", "type": "server_error", "param": null, "code": "internal_error"}'
        check_response(500, {"content-type": "application/json"}, b'{"error": %s, "detail": "x"}' % error)
    with pytest.raises(AssertionError):
        check_response(400, {"content-type": "application/json"}, b'{"detail": "bad"}')
    with pytest.raises(AssertionError):
        check_response(400, {"content-type": "text/plain"}, b"Bad Request")
    error = b'{"message": "Task queue is full", "type": "server_error", "param": null, "code": "queue_full"}'
    ok = b'{"error": %s, "detail": "Task queue is full", "request_id": "r1"}' % error
    check_response(503, {"content-type": "application/json", "x-request-id": "r1"}, ok)


def test_quality_steps_stay_within_max_steps(app):
    """``quality`` maps to up to 100 steps; a server with a lower ``max_steps`` runs at most that many."""
    for quality, steps in [("max", 8), ("low", 8), ("auto", 8)]:  # auto: the default steps, 50, within the limit too
        body = b'{"prompt": "a cat", "quality": "%s", "model": "tiny"}' % quality.encode()
        # Twice: one of them may find the (fake) queue full.
        responses = [app.post("/v1/images/generations", body, "application/json") for _ in range(2)]
        assert 200 in [r.status_code for r in responses]
        assert app.engine.jobs[-1].num_inference_steps == steps


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits", "/v1/images/variations"])
def test_deeply_nested_json_is_a_400(app, path):
    """JSON nested deeper than the parser goes (a RecursionError, not a ValueError) was a 500 on edits and variations."""
    for body in [b"[" * 100_000, b'{"prompt": "a cat", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"]:
        response = app.post(path, body, "application/json")
        assert response.status_code == 400


class BrokenEngine(InstantEngine):
    """Fails every job with an error no handler knows."""

    async def submit(self, model_id, job, on_partial=None):
        raise RuntimeError("a bug")


@pytest.mark.parametrize("sent_id", [None, "client-id-42"])
def test_an_unexpected_500_carries_the_request_id(tmp_path, sent_id):
    """Starlette answers unexpected errors outside the middlewares; the 500 still has the request id, in body and header."""
    app = create_app(Settings(image_output_dir=tmp_path), BrokenEngine())

    async def call():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"X-Request-ID": sent_id} if sent_id else {}
            return await client.post("/v1/images/generations", json={"prompt": "a cat", "model": "tiny"}, headers=headers)

    response = asyncio.run(call())
    body = response.json()
    assert response.status_code == 500 and body["error"]["code"] == "internal_error"
    assert body["request_id"] and body["request_id"] == response.headers["x-request-id"]
    if sent_id:
        assert body["request_id"] == sent_id


def test_aspect_ratios_stay_within_the_side_limits(tmp_path):
    """``aspect_ratio`` presets (up to 1664 wide) were rendered even on a server whose max_image_side is lower."""
    engine = InstantEngine()
    engine.admit = lambda model_id: None  # no full queue here
    app = create_app(Settings(image_output_dir=tmp_path, max_image_side=1472), engine)

    async def call(ratio):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/images/generations", json={"prompt": "a cat", "model": "tiny", "aspect_ratio": ratio})

    wide, square = asyncio.run(call("16:9")), asyncio.run(call("1:1"))
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "aspect_ratio"
    assert "1664x928" in wide.json()["error"]["message"]
    assert square.status_code == 200 and (engine.jobs[-1].width, engine.jobs[-1].height) == (1328, 1328)
