"""The memory plan in the server: the engine's workers get the plan's devices, the API shows the GPUs,
and serve refuses a plan that does not fit before its port opens."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from qwen_image_server import cli
from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.engine import local, model_pool
from qwen_image_server.engine.base import EngineDefaults
from qwen_image_server.engine.worker import device_memory
from qwen_image_server.models import planner
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.footprint import GIB
from qwen_image_server.models.machine import Gpu, discover_gpus, no_gpu_driver
from qwen_image_server.models.plan_result import Plan, PlanError
from qwen_image_server.models.planner import make_plan


def _gpus(*sizes_gib: float):
    return lambda: [Gpu(f"cuda:{i}", "test GPU", int(s * GIB), int(s * GIB)) for i, s in enumerate(sizes_gib)]


class _FakeWorker:
    """Stands in for a worker process: records its device and the models it serves."""

    def __init__(self, pools, slot, device, threads):
        self.pools, self.slot, self.device, self.state = pools, slot, device, "idle"
        self.info = {"memory": {"device_free_gib": 0.5, "allocated_gib": 0.1}}

    def describe(self, pool=None) -> dict:
        pool = pool or self.pools[0]
        return {"name": f"{pool.spec.id}#{self.slot}", "state": self.state, "device": self.device, **self.info}

    def stop(self) -> None:
        pass


def test_the_engine_starts_each_worker_on_its_planned_device(tiny_t2i, tiny_edit, monkeypatch):
    monkeypatch.setattr(model_pool, "WorkerProcess", _FakeWorker)
    settings = Settings(models=[f"a={tiny_t2i}", f"b={tiny_edit}"], workers=2)
    specs = resolve_configured(settings)
    plan = make_plan(specs, settings, discover=_gpus(0.8, 0.8, 0.8, 0.8))  # one 777 MiB worker per GPU at most
    engine = local.LocalEngine(specs, settings, plan)

    async def start():
        await engine.start()

    asyncio.run(start())
    devices = {model: [w.device for w in pool.workers] for model, pool in engine.pools.items()}
    assert devices == {"a": plan.devices("a"), "b": plan.devices("b")}
    assert sorted(d for per_model in devices.values() for d in per_model) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    report = engine.gpus()
    placed = sorted(w["name"] for gpu in report for w in gpu["workers"])
    assert placed == ["a#0", "a#1", "b#0", "b#1"]
    assert engine.memory("a")["devices"] == plan.devices("a")


def test_without_a_plan_the_engine_plans_itself_on_cpu(tiny_t2i, monkeypatch):
    monkeypatch.setattr(model_pool, "WorkerProcess", _FakeWorker)
    settings = Settings(models=[str(tiny_t2i)], device="cpu", workers=2)
    engine = local.LocalEngine(resolve_configured(settings), settings)
    asyncio.run(engine.start())
    assert [w.device for w in engine.pools[engine.models[0].id].workers] == ["cpu", "cpu"]
    assert engine.gpus() == []


def test_shared_components_start_one_process_per_slot_for_every_model(tiny_t2i, tiny_edit, monkeypatch):
    monkeypatch.setattr(local, "WorkerProcess", _FakeWorker)
    settings = Settings(models=[f"a={tiny_t2i}", f"b={tiny_edit}"], device="cpu", workers=2, share_components=True)
    engine = local.LocalEngine(resolve_configured(settings), settings)
    asyncio.run(engine.start())
    a, b = engine.pools["a"].workers, engine.pools["b"].workers
    assert len(a) == 2 and [w is v for w, v in zip(a, b, strict=True)] == [True, True]
    assert [w.slot for w in a] == [0, 1] and all(w.pools == [engine.pools["a"], engine.pools["b"]] for w in a)
    assert [w["name"] for w in engine.status()["b"]["workers"]] == ["b#0", "b#1"]


class _Engine(EngineDefaults):
    """An engine with a plan, for the routes."""

    def __init__(self, specs, plan: Plan):
        self.models, self.plan = specs, plan

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def ready(self) -> bool:
        return True

    def status(self) -> dict:
        return {}

    def gpus(self) -> list[dict]:
        return self.plan.gpu_report([{"name": "a#0", "memory": {"device_free_gib": 1.5}}])

    def memory(self, model_id: str) -> dict:
        return self.plan.model_summary(model_id)


def test_ready_and_models_show_the_gpus_and_the_estimates(tiny_t2i, tmp_path):
    settings = Settings(models=[f"a={tiny_t2i}"], image_output_dir=tmp_path)
    specs = resolve_configured(settings)
    plan = make_plan(specs, settings, discover=_gpus(2, 2))
    with TestClient(create_app(settings, _Engine(specs, plan))) as client:
        ready = client.get("/ready").json()
        models = client.get("/v1/models").json()
        card = client.get("/v1/models/a").json()
    (gpu,) = [g for g in ready["gpus"] if g["workers"]]
    assert gpu["total_gib"] == 2.0 and gpu["used_gib"] == 0.5 and gpu["workers"][0]["name"] == "a#0"
    assert gpu["planned_gib"] == pytest.approx(plan.footprints["a"].total / GIB, abs=0.01)
    assert models["gpus"] == ready["gpus"]
    assert card["memory"]["total_gib"] == pytest.approx(plan.footprints["a"].total / GIB, abs=0.01)
    assert set(card["memory"]["weights_gib"]) == {"transformer", "text_encoder", "vae"}
    assert card == models["data"][0]


def test_serve_refuses_a_plan_that_does_not_fit_before_the_port_opens(tiny_t2i, monkeypatch):
    monkeypatch.setattr(planner, "discover_gpus", _gpus(0.5))

    def no_server(*args, **kwargs):
        raise AssertionError("the server was started")

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", no_server)
    with pytest.raises(PlanError, match="not enough GPU memory for model a "):
        cli.run_server(Settings(models=[f"a={tiny_t2i}"], port=0))
    result = CliRunner().invoke(cli.app, ["serve", "-m", f"a={tiny_t2i}", "--port", "0"])
    assert result.exit_code == 2 and "error: not enough GPU memory for model a (worker 1 of 1)" in result.output


def test_a_plan_refused_on_the_cpu_starts_no_process(tiny_t2i, monkeypatch, caplog):
    """The plan comes before the forkserver, whose imports (torch, diffusers) cost seconds of CPU: a refused plan
    starts nothing, and a plan that fits starts it before the app. Only a model the plan took is logged as served."""
    from qwen_image_server.engine import worker_process
    from qwen_image_server.models.machine import HostMemory

    started: list[tuple] = []
    monkeypatch.setattr(worker_process, "start_forkserver_early", lambda *args: started.append(args))
    monkeypatch.setattr(planner, "discover_host_memory", lambda: HostMemory(GIB // 1024, GIB // 1024, "a test"))
    caplog.set_level("INFO", logger="qwen_image_server.cli_run")
    with pytest.raises(PlanError, match="not enough memory on this machine for model a "):
        cli.run_server(Settings(models=[f"a={tiny_t2i}"], device="cpu", port=0))
    assert started == []
    assert "serving a " not in caplog.text

    import uvicorn

    monkeypatch.setattr(planner, "discover_host_memory", lambda: HostMemory(64 * GIB, 64 * GIB, "a test"))
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(("uvicorn",)))
    cli.run_server(Settings(models=[f"a={tiny_t2i}"], device="cpu", port=0))
    assert started == [("auto", "cpu"), ("uvicorn",)]
    assert f"serving a (text-to-image) from {tiny_t2i}" in caplog.text


def test_worker_memory_report_is_empty_off_gpu():
    assert device_memory("cpu") == {}


@pytest.mark.gpu
def test_gpu_probe_and_worker_report_on_a_real_gpu():
    if no_gpu_driver():  # asked without importing torch (seconds in a test process that may need none)
        pytest.skip("needs a CUDA GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpus = discover_gpus()
    assert gpus and gpus[0].device == "cuda:0" and 0 < gpus[0].free <= gpus[0].total
    report = device_memory("cuda:0")["memory"]
    assert report["device_total_gib"] == pytest.approx(gpus[0].total / GIB, abs=0.01)
    assert 0 <= report["allocated_gib"] <= report["reserved_gib"] + 0.01
