"""/metrics in process: the app on a small fake engine, called through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.engine.base import EngineDefaults
from qwen_image_server.jobs import EncodedImage, JobResult, PartialImage, TaskResult
from qwen_image_server.models.profile import LoraSpec, RunProfile
from qwen_image_server.models.spec import ModelSpec

KEY = "sk-metrics-test"
GEN = "/v1/images/generations"
BODY = {"prompt": "a secret prompt", "size": "256x256", "model": "tiny"}


class FakeEngine(EngineDefaults):
    """``EngineClient`` without workers: each job waits 2 s for a worker, runs 1.5 s and encodes 0.25 s."""

    def __init__(self):
        lora = LoraSpec(name="style", path="/nowhere/style.safetensors", model="tiny")
        self.models = [
            ModelSpec("tiny", "/nowhere/tiny", "QwenImagePipeline", "text-to-image", profile=RunProfile(loras=(lora,))),
            ModelSpec("tiny-edit", "/nowhere/edit", "QwenImageEditPipeline", "edit"),
        ]
        self.queued = 0
        self.worker_states = ["idle", "busy"]
        self.restarts = 0

    async def start(self):
        pass

    async def close(self):
        pass

    async def submit(self, model_id, job, on_partial=None):
        started = time.time() + 2.0  # as if the job waited two seconds for a worker
        images = [EncodedImage(s, b"png", 256, 256) for s in job.seeds]
        task = TaskResult(1, images, started, started + 1.5, "w0", 3, {"encode_seconds": 0.25})
        return JobResult.combine([task])

    def ready(self):
        return True

    def status(self):
        memory = {"cuda_allocated_gib": 1.5, "cuda_reserved_gib": 2.0, "cuda_peak_gib": 3.0}
        states = enumerate(self.worker_states)
        workers = [{"name": f"tiny#{i}", "state": state, "device": f"cuda:{i}", "memory": memory} for i, state in states]
        return {
            "tiny": {
                "state": "ready",
                "queued_jobs": self.queued,
                "queue_size": 8,
                "task_timeout": 30.0,
                "worker_restarts": self.restarts,
                "workers": workers,
            },
            "tiny-edit": {"state": "loading", "queued_jobs": 0, "workers": [{"name": "tiny-edit#0", "state": "loading"}]},
        }

    def gpus(self):
        return [{"device": "cuda:0", "total_gib": 80.0, "planned_gib": 40.0, "used_gib": 42.5, "workers": []}]


def _app(tmp_path, engine=None, **settings):
    return create_app(Settings(image_output_dir=tmp_path, **settings), engine or FakeEngine())


def _call(app, *requests, raise_app_exceptions: bool = True):
    """Send ``(method, path, kwargs)`` requests in order; their responses."""

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]

    return asyncio.run(run())


def _value(app, name, **labels):
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def _samples(text: str) -> dict:
    """``{(name, sorted labels): value}`` of a scrape."""
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def _count(app, route, model, status):
    return _value(app, "qis_requests_total", route=route, model=model, status=str(status))


def test_requests_are_counted_by_route_template_model_and_status(tmp_path):
    app = _app(tmp_path)
    ok, bad, unknown, model, other_model, lora, missing = _call(
        app,
        ("POST", GEN, {"json": BODY}),
        ("POST", GEN, {"json": {**BODY, "size": "17x17"}}),
        ("GET", "/no/such/path/a-secret", {}),
        ("GET", "/v1/models/tiny", {}),
        ("POST", GEN, {"json": {**BODY, "model": "a-model-nobody-serves"}}),
        ("POST", GEN, {"json": {**BODY, "model": "style"}}),
        ("POST", GEN, {"json": {"prompt": "a cat", "size": "256x256"}}),
    )
    assert [r.status_code for r in (ok, bad, unknown, model, other_model, lora, missing)] == [200, 400, 404, 200, 400, 200, 200]
    assert _count(app, GEN, "tiny", 200) == 2  # named, and the default model of a request naming none
    assert _count(app, GEN, "tiny", 400) == 1
    assert _count(app, GEN, "style", 200) == 1
    assert _count(app, GEN, "other", 400) == 1
    assert _count(app, "other", "none", 404) == 1
    assert _count(app, "/v1/models/{model_id:path}", "none", 200) == 1
    (wrong_method,) = _call(app, ("GET", GEN, {}))
    assert wrong_method.status_code == 405 and _count(app, GEN, "none", 405) == 1
    # Latency by status too: a wave of fast refusals shows as such, not as faster generations.
    assert _value(app, "qis_request_duration_seconds_count", route=GEN, model="tiny", status="200") == 2
    assert _value(app, "qis_request_duration_seconds_count", route=GEN, model="tiny", status="400") == 1

    text = _call(app, ("GET", "/metrics", {}))[0].text
    for secret in ("a-model-nobody-serves", "a secret prompt", "/no/such/path", "a-secret"):
        assert secret not in text
    assert 'qis_requests_total{model="tiny",route="/v1/images/generations",status="200"} 2.0' in text


def test_jobs_observe_queue_pipeline_and_encode_seconds_and_count_images(tmp_path):
    app = _app(tmp_path)
    (response,) = _call(app, ("POST", GEN, {"json": {**BODY, "n": 3}}))
    assert response.status_code == 200
    assert response.json()["stats"]["encode_seconds"] == pytest.approx(0.25)
    assert _value(app, "qis_images_total", model="tiny") == 3
    assert _value(app, "qis_images_total", model="style") == 0  # present from the start
    assert _value(app, "qis_job_pipeline_seconds_sum", model="tiny") == pytest.approx(1.5)
    assert _value(app, "qis_job_encode_seconds_sum", model="tiny") == pytest.approx(0.25)
    assert 2.0 <= _value(app, "qis_job_queue_seconds_sum", model="tiny") < 2.5
    assert _value(app, "qis_job_queue_seconds_bucket", model="tiny", le="1.0") == 0
    assert _value(app, "qis_job_queue_seconds_bucket", model="tiny", le="5.0") == 1


def test_a_streamed_job_is_observed_too(tmp_path):
    app = _app(tmp_path)
    (response,) = _call(app, ("POST", GEN, {"json": {**BODY, "stream": True}}))
    assert response.status_code == 200 and "image_generation.completed" in response.text
    assert _value(app, "qis_images_total", model="tiny") == 1
    assert _count(app, GEN, "tiny", 200) == 1


def test_a_request_naming_no_model_is_counted_under_its_default_model_whatever_the_outcome(tmp_path):
    """The seeds' clients name no model: their 200s were counted under the model, their 503s (a full queue) and
    400s under ``none``, so a model's error rate left out its refusals."""
    from qwen_image_server.errors import QueueFull

    engine = FakeEngine()
    full = False

    def admit(model_id):
        if full:
            raise QueueFull(retry_after=1)

    engine.admit = admit
    app = _app(tmp_path, engine)
    plain = {"prompt": "a cat", "size": "256x256"}
    (ok, bad) = _call(app, ("POST", GEN, {"json": plain}), ("POST", GEN, {"json": {**plain, "size": "17x17"}}))
    full = True
    (refused,) = _call(app, ("POST", GEN, {"json": plain}))
    assert [r.status_code for r in (ok, bad, refused)] == [200, 400, 503]
    assert [_count(app, GEN, "tiny", status) for status in (200, 400, 503)] == [1, 1, 1]
    assert _count(app, GEN, "none", 503) == 0
    full = False
    # refused by the request schema, before the route ran (n=0): under the model named, else the default
    schema = [{**plain, "n": 0}, {**BODY, "n": 0}, {**plain, "model": "style", "n": 0}]
    assert [r.status_code for r in _call(app, *[("POST", GEN, {"json": body}) for body in schema])] == [400] * 3
    assert (_count(app, GEN, "tiny", 400), _count(app, GEN, "style", 400), _count(app, GEN, "none", 400)) == (3, 1, 0)
    not_json = _call(app, ("POST", GEN, {"content": b"{", "headers": {"Content-Type": "application/json"}}))[0]
    assert not_json.status_code == 400 and _count(app, GEN, "tiny", 400) == 4
    bad_n = _call(app, ("POST", "/v1/images/edits", {"data": {"prompt": "p", "n": "0"}, "files": {"image": ("a.png", b"x")}}))
    assert bad_n[0].status_code == 400 and _count(app, "/v1/images/edits", "tiny-edit", 400) == 1
    edit = _call(app, ("POST", "/v1/images/edits", {"data": {"prompt": "p"}, "files": {"image": ("a.png", b"x")}}))[0]
    assert edit.status_code == 400 and _count(app, "/v1/images/edits", "tiny-edit", 400) == 2  # the edit default


def test_a_stream_is_counted_as_it_ended_not_as_its_200(tmp_path):
    """A stream's status line (200) goes out before its job ends: one that ended in an ``error`` event (a timeout)
    or whose client went away was counted as a 200, so stream timeouts and disconnects never showed."""
    from conftest import asgi_call
    from qwen_image_server.errors import TaskTimeout

    engine = FakeEngine()

    async def timing_out(model_id, job, on_partial=None):
        await asyncio.sleep(0.05)  # the stream has started
        raise TaskTimeout()

    engine.submit = timing_out
    app = _app(tmp_path, engine)
    (timed_out,) = _call(app, ("POST", GEN, {"json": {**BODY, "stream": True}}))
    assert timed_out.status_code == 200 and "event: error" in timed_out.text and '"code":"timeout"' in timed_out.text
    assert _count(app, GEN, "tiny", 504) == 1 and _count(app, GEN, "tiny", 200) == 0

    async def previewing(model_id, job, on_partial=None):
        on_partial(PartialImage(0, 0, EncodedImage(1, b"png", 64, 64)))
        await asyncio.sleep(3600)  # a long run: its client goes away after the first preview

    engine.submit = previewing
    body = json.dumps({**BODY, "stream": True, "partial_images": 2}).encode()
    events = []

    async def receive():
        if not events:
            events.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        while not any(b"partial_image" in part for part in parts):
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    parts: list[bytes] = []
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    asgi_call(app, "POST", GEN, headers, receive=receive, on_send=lambda message, sent: parts.append(message.get("body", b"")))
    assert any(b"partial_image" in part for part in parts)
    assert _count(app, GEN, "tiny", 499) == 1 and _count(app, GEN, "tiny", 200) == 0


def test_a_streams_completed_events_carry_the_seconds_it_waited(tmp_path):
    app = _app(tmp_path)
    (response,) = _call(app, ("POST", GEN, {"json": {**BODY, "stream": True}}))
    completed = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert completed[-1]["type"] == "image_generation.completed"
    assert 2.0 <= completed[-1]["stats"]["queue_seconds"] < 2.5  # as the JSON answer's (the fake waits 2 s)


def test_engine_gauges_are_read_at_scrape_time(tmp_path):
    engine = FakeEngine()
    app = _app(tmp_path, engine)
    (first,) = _call(app, ("GET", "/metrics", {}))
    assert first.headers["content-type"].startswith("text/plain")
    samples = _samples(first.text)
    assert samples[("qis_queue_depth", (("model", "tiny"),))] == 0
    assert samples[("qis_queue_size", (("model", "tiny"),))] == 8
    assert samples[("qis_task_timeout_seconds", (("model", "tiny"),))] == 30.0
    assert ("qis_queue_size", (("model", "tiny-edit"),)) not in samples  # a model whose status does not say
    assert samples[("qis_model_state", (("model", "tiny"), ("state", "ready")))] == 1
    assert samples[("qis_model_state", (("model", "tiny"), ("state", "loading")))] == 0
    assert samples[("qis_model_state", (("model", "tiny-edit"), ("state", "loading")))] == 1
    assert samples[("qis_running_tasks", (("model", "tiny"),))] == 1
    assert samples[("qis_workers", (("model", "tiny"), ("state", "idle")))] == 1
    key = ("qis_worker_gpu_memory_bytes", (("device", "cuda:1"), ("kind", "allocated"), ("model", "tiny"), ("worker", "tiny#1")))
    assert samples[key] == 1.5 * 1024**3
    assert samples[("qis_gpu_used_bytes", (("device", "cuda:0"),))] == 42.5 * 1024**3
    assert samples[("qis_gpu_total_bytes", (("device", "cuda:0"),))] == 80 * 1024**3
    assert not any(name == "qis_worker_gpu_memory_bytes" and ("model", "tiny-edit") in labels for name, labels in samples)

    engine.queued, engine.restarts, engine.worker_states = 4, 2, ["busy", "busy"]
    assert _value(app, "qis_queue_depth", model="tiny") == 4
    assert _value(app, "qis_worker_restarts_total", model="tiny") == 2
    assert _value(app, "qis_running_tasks", model="tiny") == 2


def test_an_engine_that_cannot_answer_does_not_break_the_scrape(tmp_path):
    engine = FakeEngine()
    engine.status = lambda: 1 / 0
    app = _app(tmp_path, engine)
    (response,) = _call(app, ("POST", GEN, {"json": BODY}), ("GET", "/metrics", {}))[1:]
    assert response.status_code == 200 and "qis_requests_total" in response.text and "qis_queue_depth" not in response.text


def test_middleware_refusals_and_errors_are_counted(tmp_path):
    app = _app(tmp_path, api_keys=[KEY], max_upload_bytes=1024)
    auth = {"Authorization": f"Bearer {KEY}"}
    no_key, origin, too_large, metrics_no_key, metrics_key = _call(
        app,
        ("POST", GEN, {"json": BODY}),
        ("POST", GEN, {"json": BODY, "headers": {**auth, "Origin": "https://elsewhere.example"}}),
        ("POST", GEN, {"content": b"x" * 2048, "headers": {**auth, "Content-Type": "application/json"}}),
        ("GET", "/metrics", {}),
        ("GET", "/metrics", {"headers": auth}),
    )
    assert [r.status_code for r in (no_key, origin, too_large, metrics_no_key, metrics_key)] == [401, 403, 413, 401, 200]
    assert _count(app, GEN, "none", 401) == 1
    assert _count(app, GEN, "none", 403) == 1
    assert _count(app, GEN, "none", 413) == 1
    assert _count(app, "/metrics", "none", 401) == 1
    assert 'status="413"' in metrics_key.text

    engine = FakeEngine()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    engine.submit = broken
    failing = _app(tmp_path, engine)
    (response,) = _call(failing, ("POST", GEN, {"json": BODY}), raise_app_exceptions=False)  # Starlette re-raises after its 500
    assert response.status_code == 500
    assert _count(failing, GEN, "tiny", 500) == 1


def test_public_metrics_opens_only_metrics(tmp_path):
    app = _app(tmp_path, api_keys=[KEY], public_metrics=True)
    metrics, models = _call(app, ("GET", "/metrics", {}), ("GET", "/v1/models", {}))
    assert metrics.status_code == 200 and models.status_code == 401


def test_each_app_has_its_own_registry(tmp_path):
    one, two = _app(tmp_path), _app(tmp_path)
    _call(one, ("POST", GEN, {"json": BODY}))
    assert _count(one, GEN, "tiny", 200) == 1
    assert _count(two, GEN, "tiny", 200) == 0
    assert one.state.metrics.registry is not two.state.metrics.registry
    assert REGISTRY.get_sample_value("qis_requests_total", {"route": GEN, "model": "tiny", "status": "200"}) is None


def test_the_ray_engine_reports_model_states_and_jobs_in_flight(tmp_path):
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_serve import RayEngine, deployment_name

    models = FakeEngine().models
    engine = RayEngine(models, Settings(image_output_dir=tmp_path, model_queue_size=["2@tiny"], task_timeout=90), "app")
    deployments = {
        deployment_name(0, models[0]): {"status": "HEALTHY", "replicas": {}},
        deployment_name(1, models[1]): {"status": "DEPLOY_FAILED"},
    }
    engine._serve_status = lambda: (False, deployments)
    engine._in_flight["tiny"] = 3
    names = [deployment_name(i, m) for i, m in enumerate(models)]
    expected = {
        "tiny": {
            "kind": models[0].kind, "ready": True, "state": "ready", "jobs_in_flight": 3, "queue_size": 2,
            "task_timeout": 90.0, "deployment": names[0], "deployment_status": "HEALTHY", "replicas": {},
        },
        "tiny-edit": {
            "kind": models[1].kind, "ready": False, "state": "failed", "jobs_in_flight": 0, "queue_size": 32,
            "task_timeout": 90.0, "deployment": names[1], "deployment_status": "DEPLOY_FAILED", "replicas": {},
        },
    }  # fmt: skip
    assert engine.status() == expected  # /ready's models, keyed as the embedded engine's
    app = _app(tmp_path, engine)
    assert _value(app, "qis_jobs_in_flight", model="tiny") == 3
    assert _value(app, "qis_queue_size", model="tiny") == 2 and _value(app, "qis_queue_size", model="tiny-edit") == 32
    assert _value(app, "qis_task_timeout_seconds", model="tiny-edit") == 90.0
    assert _value(app, "qis_model_state", model="tiny-edit", state="failed") == 1
    # /ready says what its models say: a model whose deployment failed is "failed", not "loading"
    (ready,) = _call(app, ("GET", "/ready", {}))
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    engine._serve_status = lambda: (False, {"error": "RayError: no controller at /tmp/ray/session_1/sockets/raylet"})
    assert _value(app, "qis_model_state", model="tiny", state="loading") == 1
    (ready,) = _call(app, ("GET", "/ready", {}))
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    tiny = engine.status()["tiny"]
    assert tiny["state"] == "loading" and tiny["deployment_status"] is None
    assert tiny["error"] == "RayError: no controller at <path>"  # no paths for clients


def test_the_ray_engine_reads_serve_s_status_in_a_thread_and_answers_from_the_last_reading(tmp_path, monkeypatch):
    """A slow controller holds no request: ``ready()`` answers at once from the last reading (not ready before the
    first) while one thread reads; it reads again every ``STATUS_SECONDS`` whether or not anyone asks (a reading
    started by a probe answered the next probe with what was true at this one: 20 s old after 20 s without one)."""
    pytest.importorskip("ray.serve")
    import threading
    import time
    from types import SimpleNamespace

    from qwen_image_server.engine import ray_serve
    from qwen_image_server.engine.ray_serve import RayEngine

    answer, calls = threading.Event(), []

    def status():  # Serve's controller, answering when told to
        calls.append(threading.current_thread().name)
        assert answer.wait(10)
        app = SimpleNamespace(
            status="RUNNING", deployments={"d": SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 1})}
        )
        return SimpleNamespace(applications={"app": app})

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition()

    monkeypatch.setattr(ray_serve.serve, "status", status)
    monkeypatch.setattr(RayEngine, "STATUS_SECONDS", 0.05)
    engine = RayEngine(FakeEngine().models, Settings(image_output_dir=tmp_path), "app")
    assert engine.ready() is False  # answered at once: the reading has not been answered
    wait_for(lambda: calls)
    assert engine.ready() is False and engine.ready() is False and not answer.is_set()  # still waiting: no wait here
    assert calls == ["serve status"]  # one reading at a time, in its own thread
    answer.set()
    wait_for(engine.ready)
    assert engine._serve_status()[1] == {"d": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}}
    readings = len(calls)
    wait_for(lambda: len(calls) >= readings + 3)  # read again and again, with no one asking
    asyncio.run(engine.close())
    time.sleep(0.2)
    stopped = len(calls)
    time.sleep(0.2)
    assert len(calls) == stopped, "closed: no more readings"


def test_the_ray_engine_serves_while_a_replica_is_replaced_and_not_while_it_shuts_down(tmp_path, monkeypatch):
    """Once the app has run, a crashed replica's deployment is UNHEALTHY (and the app with it) while Serve replaces
    it: ``/ready`` stays 200 and the model ``ready`` while another replica of it runs (it was 503 and ``failed``,
    taking the whole server out of rotation), as an embedded worker's restart does; with none running, the model is
    down. Before the app first runs, running replicas are not enough. A draining ingress is not ready."""
    pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from qwen_image_server.engine import ray_serve
    from qwen_image_server.engine.ray_serve import RayEngine, deployment_name

    models = FakeEngine().models
    names = [deployment_name(i, m) for i, m in enumerate(models)] + ["ingress"]
    now: dict = {}

    def status():
        deployments = {
            n: SimpleNamespace(status=now["status"].get(n, "HEALTHY"), replica_states=now["replicas"].get(n, {"RUNNING": 1}))
            for n in names
        }
        return SimpleNamespace(applications={"app": SimpleNamespace(status=now["app"], deployments=deployments)})

    monkeypatch.setattr(ray_serve.serve, "status", status)
    engine = RayEngine(models, Settings(image_output_dir=tmp_path), "app")
    app = _app(tmp_path, engine)

    def read(app_status: str, status: dict | None = None, replicas: dict | None = None) -> tuple[int, str]:
        now.update(app=app_status, status=status or {}, replicas=replicas or {})
        engine._ready_cache = engine._serve_status_now()
        (ready,) = _call(app, ("GET", "/ready", {}))
        return ready.status_code, ready.json()["status"]

    replacing = {names[1]: "UNHEALTHY"}
    assert read("DEPLOYING", {names[1]: "UPDATING"}, {names[1]: {"STARTING": 1}}) == (503, "loading")
    assert read("DEPLOYING", replacing, {names[1]: {"RUNNING": 1, "STARTING": 1}}) == (503, "loading")  # not run yet
    assert read("RUNNING") == (200, "ready")
    assert read("UNHEALTHY", replacing, {names[1]: {"RUNNING": 1, "STARTING": 1}}) == (200, "ready")
    assert engine.status()[models[1].id]["state"] == "ready"
    assert _value(app, "qis_model_state", model=models[1].id, state="ready") == 1
    # Nothing serves it while Serve starts another: loading, as an embedded model whose worker restarts (it said
    # failed, which is for a model that cannot load)
    assert read("UNHEALTHY", replacing, {names[1]: {"STARTING": 1}}) == (503, "loading")
    assert engine.status()[models[1].id]["state"] == "loading"
    assert read("DEPLOY_FAILED", {names[1]: "DEPLOY_FAILED"}, {names[1]: {}}) == (503, "failed")
    assert read("RUNNING") == (200, "ready")
    engine.drain()
    assert read("RUNNING") == (503, "shutting_down")


def test_an_upload_refused_while_its_body_is_read_and_an_alias_count_under_their_model(tmp_path):
    """Edits and variations refused while their body was read (not JSON, no form, an image that is not base64) were
    counted under ``none``, whatever model they named; a request to an alias (``--model-alias``) under the alias,
    beside the model's own series, with image counters of its own that stayed at 0."""
    from dataclasses import replace

    engine = FakeEngine()
    engine.models[0] = replace(engine.models[0], aliases=(("dall-e-3", "tiny"), ("house-style", "style")))
    app = _app(tmp_path, engine)
    edits, variations = "/v1/images/edits", "/v1/images/variations"
    as_json = {"headers": {"Content-Type": "application/json"}}
    refused = _call(
        app,
        ("POST", edits, {"content": b"nope", **as_json}),  # not JSON: the default edit model
        ("POST", edits, {"content": b"nope", "headers": {"Content-Type": "text/plain"}}),  # neither form nor JSON
        ("POST", edits, {"json": {"prompt": "x", "image": "x", "model": "zz-2"}}),  # an image that is no image, a name
        ("POST", variations, {"json": {"image": "x", "model": "tiny"}}),
        ("POST", variations, {"content": b"[1]", **as_json}),
    )
    assert [r.status_code for r in refused] == [400] * 5
    assert (_count(app, edits, "tiny-edit", 400), _count(app, edits, "other", 400), _count(app, edits, "none", 400)) == (2, 1, 0)
    assert (_count(app, variations, "tiny", 400), _count(app, variations, "none", 400)) == (2, 0)
    made = _call(
        app, ("POST", GEN, {"json": {**BODY, "model": "dall-e-3"}}), ("POST", GEN, {"json": {**BODY, "model": "house-style"}})
    )
    assert [r.status_code for r in made] == [200, 200]
    assert (_count(app, GEN, "tiny", 200), _count(app, GEN, "style", 200), _count(app, GEN, "dall-e-3", 200)) == (1, 1, 0)
    scrape = _call(app, ("GET", "/metrics", {}))[0].text
    assert "dall-e-3" not in scrape and "house-style" not in scrape


def test_a_scrape_holds_no_created_series(tmp_path):
    """prometheus_client adds a ``*_created`` timestamp beside every counter and histogram label set: a third of a
    scrape's lines, in none of the documented metrics."""
    app = _app(tmp_path)
    scrape = _call(app, ("POST", GEN, {"json": BODY}), ("GET", "/metrics", {}))[1].text
    assert "qis_requests_total{" in scrape and "_created" not in scrape
