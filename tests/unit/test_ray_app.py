"""``qwen-image-server serve --engine ray`` (``ray_app.run``) without starting Ray: what it sets up before
``ray.init``, and how it stops on SIGTERM or Ctrl-C (``ray_app.stop``; the ingress's ``drain`` on a real Ray is in
tests/e2e/test_ray.py)."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from qwen_image_server.config import Settings

VAR = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


@pytest.fixture
def run_without_ray(monkeypatch):
    """``ray_app.run`` with Ray's calls replaced: returns the value of ``VAR`` that ``ray.init`` would have seen."""
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from qwen_image_server import ray_app

    monkeypatch.setenv(VAR, "unset")  # so that the test's end restores whatever the process had
    monkeypatch.delenv(VAR)
    seen: dict = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(value=os.environ.get(VAR), **kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.update(ray_shutdown=True))
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray_app, "build_application", lambda settings, specs, log_level: seen.update(log_level=log_level))
    monkeypatch.setattr(ray_app, "stop", lambda app, grace, delete: seen.update(stopped=(app, grace), deleted=delete))
    handlers: dict = {}  # what run() installs, instead of this process's own handlers
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))

    def run(**settings) -> dict:
        seen.clear()
        ray_app.run(Settings(engine="ray", **settings), [])
        return seen

    run.seen, run.handlers = seen, handlers  # type: ignore[attr-defined]
    return run


def test_a_local_ray_gives_the_serve_proxy_a_minute_to_be_ready(run_without_ray):
    seen = run_without_ray()
    assert seen["address"] is None and seen["value"] == "60"  # Serve's own default, 5 s, is missed on a busy machine
    assert seen["log_level"] == "info"  # serve --log-level reaches the replicas' log lines


def test_the_environment_setting_is_kept(run_without_ray, monkeypatch):
    monkeypatch.setenv(VAR, "7")
    assert run_without_ray()["value"] == "7"


def test_a_cluster_joined_by_address_is_left_as_it_is(run_without_ray):
    seen = run_without_ray(ray_address="auto")
    assert seen["address"] == "auto" and seen["value"] is None


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("address", [None, "auto"])
def test_a_signal_stops_the_app_gracefully_and_a_local_ray_after_it(run_without_ray, monkeypatch, signum, status, address):
    """SIGTERM (a container's stop) as Ctrl-C: the blocking wait ends, the app stops gracefully, a Ray started here
    stops after it (a joined cluster runs on), and the process exits with the embedded server's status."""
    from ray import serve

    def serving(*args, **kwargs):  # Serve's blocking wait, interrupted by the signal
        run_without_ray.handlers[signum](signum, None)

    monkeypatch.setattr(serve, "run", serving)
    run_without_ray.handlers.clear()
    with pytest.raises(SystemExit) as exited:
        run_without_ray(ray_address=address, shutdown_grace_seconds=12)
    assert exited.value.code == status
    assert set(run_without_ray.handlers) == {signal.SIGTERM, signal.SIGINT}
    seen = run_without_ray.seen
    assert seen["stopped"] == ("qwen-image-server", 12)
    assert seen.get("ray_shutdown", False) is (address is None)
    # A Ray started here goes as a whole after the drain: the application deleted first left Serve's proxy
    # answering plain-text 404s for seconds; in a joined cluster it is deleted, the cluster left running.
    assert seen["deleted"] is (address is not None)


def test_a_sigterm_while_a_local_ray_starts_ends_the_start_cleanly(run_without_ray, monkeypatch):
    """``ray.init`` installs a SIGTERM handler that exits at once (status 15), wherever a local Ray's start has got
    to: its processes stayed behind. Ours is kept through it; the signal ends the start once ``ray.init`` returns:
    no port is opened, nothing is served, Ray started here is shut down, and the status is 143."""
    import ray
    from ray import serve
    from ray._private import utils

    calls: list[str] = []

    def init(**kwargs):
        utils.set_sigterm_handler(lambda signum, frame: calls.append("ray's handler"))  # as ray.init does first
        run_without_ray.handlers[signal.SIGTERM](signal.SIGTERM, None)  # the signal, halfway through the start
        calls.append("init returned")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(serve, "start", lambda **kwargs: calls.append("start"))
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: calls.append("run"))
    with pytest.raises(SystemExit) as exited:
        run_without_ray()
    assert exited.value.code == 143
    assert calls == ["init returned"] and "stopped" not in run_without_ray.seen  # nothing to stop: Serve never started
    assert run_without_ray.seen.get("ray_shutdown") is True
    assert utils.set_sigterm_handler.__module__ == "ray._private.utils", "Ray's own function is back"


@pytest.mark.parametrize("address", [None, "auto"])
def test_a_second_signal_ends_the_graceful_stop_at_once_and_still_stops_ray(run_without_ray, monkeypatch, address):
    """The second signal cuts the graceful stop short: the app is deleted at once (a local Ray's shutdown takes it),
    Ray started here still shuts down, and the status is the first signal's (it was 130: the second signal's
    KeyboardInterrupt escaped, and a local Ray was left running)."""
    from ray import serve

    from qwen_image_server import ray_app

    deleted: list[str] = []

    def serving(*args, **kwargs):
        run_without_ray.handlers[signal.SIGTERM](signal.SIGTERM, None)

    def stopping(app, grace, delete):
        run_without_ray.handlers[signal.SIGTERM](signal.SIGTERM, None)  # the second one, during the grace
        raise AssertionError("the second signal did not interrupt the graceful stop")

    monkeypatch.setattr(serve, "run", serving)
    monkeypatch.setattr(serve, "delete", deleted.append)
    monkeypatch.setattr(ray_app, "stop", stopping)
    with pytest.raises(SystemExit) as exited:
        run_without_ray(ray_address=address)
    assert exited.value.code == 143
    assert run_without_ray.seen.get("ray_shutdown", False) is (address is None)
    assert deleted == ([] if address is None else ["qwen-image-server"])
    run_without_ray.handlers[signal.SIGTERM](signal.SIGTERM, None)  # a third one, after: nothing to interrupt


class Handle:
    """Serve's app handle as ``stop`` uses it: ``options(method_name="drain").remote(...).result(...)``. ``drain()``
    answers ``running`` in turn (the last one again and again), ``drain(True, True)`` (the cut) ``after_cut``."""

    def __init__(self, running, after_cut=(0,)):
        self.running, self.after_cut, self.calls = list(running), list(after_cut), []

    def options(self, method_name):
        assert method_name == "drain"
        return self

    def remote(self, *args):
        self.calls.append(args)
        return self

    def result(self, timeout_s):
        answers = self.after_cut if self.calls[-1] == (True, True) else self.running
        return answers.pop(0) if len(answers) > 1 else answers[0]


@pytest.fixture
def stopping(monkeypatch):
    """``ray_app.stop`` with Serve's handle and ``delete`` replaced: the events, in order."""
    pytest.importorskip("ray.serve")
    from ray import serve

    events: list = []
    monkeypatch.setattr(serve, "delete", lambda name: events.append(("delete", name)))
    return events


def test_stop_waits_for_the_requests_in_flight_then_deletes_the_app(stopping, monkeypatch):
    from ray import serve

    from qwen_image_server import ray_app

    handle = Handle([2, 1, 0])
    monkeypatch.setattr(serve, "get_app_handle", lambda name: stopping.append(("handle", name)) or handle)
    ray_app.stop("app", grace_seconds=30, poll_seconds=0.01)
    assert handle.calls == [(), (), ()] and stopping == [("handle", "app"), ("delete", "app")]


def test_stop_cuts_off_the_requests_still_running_after_the_grace_then_deletes_the_app(stopping, monkeypatch, caplog):
    """After the grace the ingress stops its jobs and answers them 503 ``shutting_down`` (``drain(True, True)``),
    and the app is deleted once none is left: deleting it with requests in flight gave each of them Serve's
    plain-text 500 "replica died" another grace later (63.6 s with the default 30 s grace)."""
    from ray import serve

    from qwen_image_server import ray_app

    handle = Handle([1], after_cut=[1, 0])
    monkeypatch.setattr(serve, "get_app_handle", lambda name: handle)
    with caplog.at_level(logging.WARNING):
        ray_app.stop("app", grace_seconds=0.2, poll_seconds=0.01)
    waits = handle.calls[:-2]
    assert len(waits) > 1 and set(waits) == {()} and handle.calls[-2:] == [(True, True), (True, True)]
    assert stopping == [("delete", "app")]
    assert "1 request(s) still running after 0.2s: stopped, answered 503" in caplog.text


def test_stop_deletes_the_app_when_cut_off_requests_are_not_answered_in_time(stopping, monkeypatch):
    from ray import serve

    from qwen_image_server import ray_app

    handle = Handle([2], after_cut=[2])
    monkeypatch.setattr(serve, "get_app_handle", lambda name: handle)
    ray_app.stop("app", grace_seconds=0.05, poll_seconds=0.01, answer_seconds=0.1)
    assert handle.calls[-1] == (True, True) and stopping == [("delete", "app")]


def test_stop_leaves_the_app_to_the_ray_shutdown_when_told_to(stopping, monkeypatch):
    from ray import serve

    from qwen_image_server import ray_app

    handle = Handle([1, 0])
    monkeypatch.setattr(serve, "get_app_handle", lambda name: handle)
    ray_app.stop("app", grace_seconds=30, poll_seconds=0.01, delete=False)
    assert handle.calls == [(), ()] and stopping == []


def test_stop_deletes_an_app_whose_ingress_does_not_answer(stopping, monkeypatch, caplog):
    from ray import serve

    from qwen_image_server import ray_app

    def unreachable(name):
        raise RuntimeError("no such application")

    monkeypatch.setattr(serve, "get_app_handle", unreachable)
    with caplog.at_level(logging.WARNING):
        ray_app.stop("app", grace_seconds=30)
    assert stopping == [("delete", "app")] and "could not drain app" in caplog.text


def test_replicas_stopped_by_serve_get_the_shutdown_grace_to_finish():
    """A redeploy, a scale-down or the app's deletion lets a model replica finish its running call for
    ``--shutdown-grace`` seconds (was 5: a 50-step image was cut off), the ingress 5 s more."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_deploy import build_deployments
    from qwen_image_server.models.configured import resolve_configured

    settings = Settings(models=["random:Qwen/Qwen-Image"], engine="ray", ray_gpus_per_replica=0, shutdown_grace_seconds=42)
    ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
    (model,) = ingress.init_args
    assert model._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 42
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 47


def test_ray_s_own_queue_holds_every_piece_the_engine_admits():
    """The engine admits a model's jobs up to replicas + --queue-size (requests, as the README says) and sends each
    job's images as pieces, one call each: Ray's queue of calls (max_queued_requests) held --queue-size pieces, so an
    idle model refused n=10 with --queue-size 8, and every n=2 with --queue-size 1 (its stream: a 200, then a
    queue_full event). It now holds every piece of the jobs the engine admits; the engine's bound is the one."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_deploy import build_deployments
    from qwen_image_server.models.configured import resolve_configured

    settings = Settings(
        models=["a=random:Qwen/Qwen-Image", "b=random:Qwen/Qwen-Image-Edit"], engine="ray", ray_gpus_per_replica=0,
        workers=2, model_workers=["3@b"], queue_size=8, model_queue_size=["1@b"], max_n=10,
    )  # fmt: skip
    ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
    queued = {
        model._bound_deployment.name: model._bound_deployment._deployment_config.max_queued_requests
        for model in ingress.init_args
    }
    assert sorted(queued.values()) == [(3 + 1) * 10, (2 + 8) * 10], queued


def _replicas(settings: Settings) -> list[tuple[float, str]]:
    """``(num_gpus, device)`` of each model deployment the application builder makes."""
    from qwen_image_server.engine.ray_deploy import build_deployments
    from qwen_image_server.models.configured import resolve_configured

    ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
    return [
        (model._bound_deployment.ray_actor_options["num_gpus"], model._bound_deployment.init_args[1])
        for model in ingress.init_args
    ]


@pytest.fixture
def gpus_here(monkeypatch):
    """Ray not started, and this machine's GPUs as the test sets them (``gpus_here.found``)."""
    pytest.importorskip("ray.serve")
    import ray

    from qwen_image_server.models import machine
    from qwen_image_server.models.machine import Gpu

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    state = {"found": [Gpu("cuda:0", "NVIDIA H100", 80 * 2**30, 80 * 2**30)]}
    monkeypatch.setattr(machine, "discover_gpus", lambda: state["found"])
    return state


def test_serve_run_gives_replicas_a_gpu_of_this_machine_before_ray_starts(gpus_here, caplog):
    """``serve run ...:app_builder`` builds the application before it starts Ray: the cluster's GPUs cannot be asked
    for yet. Every replica ran on the CPU of a GPU machine (num_gpus 0), in float32, without a word."""
    from qwen_image_server.ray_app import app_builder

    models = ["random:Qwen/Qwen-Image", "random:Qwen/Qwen-Image-Edit-2509"]
    assert _replicas(Settings(models=models, engine="ray")) == [(1, "cuda"), (1, "cuda")]
    assert app_builder({"models": models}) is not None
    gpus_here["found"] = []
    with caplog.at_level(logging.WARNING):
        assert _replicas(Settings(models=models[:1], engine="ray")) == [(0, "cpu")]
    assert "no GPU in this machine (Ray is not started yet)" in caplog.text and "ray_gpus_per_replica" in caplog.text


def test_a_joined_cluster_is_asked_for_its_gpus_and_the_settings_choose_before_any_probe(monkeypatch):
    pytest.importorskip("ray.serve")
    import ray

    from qwen_image_server.engine import ray_deploy
    from qwen_image_server.models import machine

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    models = ["random:Qwen/Qwen-Image"]
    assert _replicas(Settings(models=models, engine="ray")) == [(1, "cuda")]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})  # GPU nodes not joined yet
    assert _replicas(Settings(models=models, engine="ray")) == [(0, "cpu")]

    def no_probe():
        raise AssertionError("probed although the settings chose")

    monkeypatch.setattr(ray, "cluster_resources", no_probe)
    # (the warning about replicas the cluster cannot hold reads its resources apart from the GPU choice)
    monkeypatch.setattr(ray_deploy, "_cluster_resources", lambda: None)
    monkeypatch.setattr(machine, "discover_gpus", no_probe)
    assert _replicas(Settings(models=models, engine="ray", ray_gpus_per_replica=1)) == [(1, "cuda")]
    assert _replicas(Settings(models=models, engine="ray", ray_gpus_per_replica=0.5)) == [(0.5, "cuda")]
    assert _replicas(Settings(models=models, engine="ray", device="cuda")) == [(1, "cuda")]
    assert _replicas(Settings(models=models, engine="ray", device="cpu")) == [(0, "cpu")]


def test_settings_of_the_embedded_engine_are_read_for_ray_replicas_and_what_cannot_be_is_refused(gpus_here, caplog):
    """Ray places the replicas: a device list meant for the embedded engine (set in the environment for both) is read
    as cuda or cpu with a warning, not refused; a list mixing both, or more than one GPU per replica, is refused."""
    from qwen_image_server.models.spec import ModelConfigError

    models = ["random:Qwen/Qwen-Image"]
    gpus_here["found"] = []  # no GPU here: only the settings can give one
    with caplog.at_level(logging.WARNING):
        assert _replicas(Settings(models=models, engine="ray", device="cuda:1")) == [(1, "cuda")]
        assert _replicas(Settings(models=models, engine="ray", device="cuda:0,cuda:1")) == [(1, "cuda")]
        assert _replicas(Settings(models=models, engine="ray", device="cpu,cpu")) == [(0, "cpu")]
    assert "--device cuda:1: under --engine ray, Ray places the model replicas; taken as cuda" in caplog.text
    with caplog.at_level(logging.WARNING):  # the Ray setting wins
        assert _replicas(Settings(models=models, engine="ray", device="cpu", ray_gpus_per_replica=1)) == [(1, "cuda")]
    assert "ray_gpus_per_replica 1 and --device cpu disagree: the replicas get 1 GPU" in caplog.text
    with pytest.raises(ModelConfigError, match="all on GPUs or all on CPUs"):
        _replicas(Settings(models=models, engine="ray", device="cpu,cuda:0"))
    with pytest.raises(
        ValueError, match=r"--ray-gpus-per-replica \(QIS_RAY_GPUS_PER_REPLICA\) 2: a replica runs on one GPU"
    ):  # before Ray starts
        Settings(models=models, engine="ray", ray_gpus_per_replica=2)
    assert Settings(ray_gpus_per_replica=2).ray_gpus_per_replica == 2, "the embedded engine does not read it"


def test_memory_modes_are_checked_on_the_replicas_device_not_the_machine_that_starts_them(gpus_here):
    """``--engine ray --ray-address auto --offload sequential`` from a CPU-only head node: the replicas run on the
    cluster's GPUs, where sequential offload works; the start checks refused it for this machine's CPU."""
    from qwen_image_server.cli_run import checked_specs
    from qwen_image_server.models.profile import ProfileError

    settings = Settings(models=["random:Qwen/Qwen-Image"], engine="ray", ray_address="auto", offload=["sequential"])
    gpus_here["found"] = []  # this machine has no GPU
    specs = checked_specs(settings)
    assert _replicas(settings.model_copy(update={"ray_gpus_per_replica": 1})) == [(1, "cuda")]
    with pytest.raises(ProfileError, match="offload=sequential needs a CUDA device"):
        _replicas(settings)  # no GPU anywhere: the replicas would run on the CPU
    assert specs[0].profile.offload == "sequential"


def test_the_application_is_built_before_the_port_opens_and_a_refusal_stops_a_local_ray(run_without_ray, monkeypatch):
    from ray import serve

    from qwen_image_server import ray_app
    from qwen_image_server.models.profile import ProfileError

    def refused(settings, specs, log_level):
        raise ProfileError("model m: offload=sequential needs a CUDA device (the model runs on cpu)")

    monkeypatch.setattr(ray_app, "build_application", refused)
    monkeypatch.setattr(serve, "start", lambda **kwargs: pytest.fail("the port opened before the application was built"))
    with pytest.raises(ProfileError):
        run_without_ray()
    assert run_without_ray.seen.get("ray_shutdown") is True
    with pytest.raises(ProfileError):
        run_without_ray(ray_address="auto")
    assert "ray_shutdown" not in run_without_ray.seen, "a joined cluster runs on"


def test_gpu_replicas_carry_what_their_model_needs_and_cpu_ones_nothing():
    """Ray places replicas by GPU count, not memory: each GPU replica gets the memory plan's estimate of its model
    to check against its GPU before loading (``test_ray_engine.py``)."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine.ray_deploy import build_deployments
    from qwen_image_server.engine.ray_replica import MemoryNeed
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.plan_footprints import footprints_for
    from qwen_image_server.models.weights_files import read_tensors

    def needs(**settings) -> list:
        settings = Settings(models=["random:Qwen/Qwen-Image"], engine="ray", **settings)
        ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
        return [model._bound_deployment.init_args[5] for model in ingress.init_args]

    # at 1024x1024 the bf16 transformer before its FP8 conversion is the most it holds: the need counts the load
    (need,) = needs(ray_gpus_per_replica=1, weights_dtype=["fp8"], max_image_side=1024)
    settings = Settings(models=["random:Qwen/Qwen-Image"], weights_dtype=["fp8"], max_image_side=1024)
    (spec,) = resolve_configured(settings)
    fp = footprints_for([spec], {spec.id: read_tensors(spec)}, settings, on_gpu=True)[spec.id]
    assert isinstance(need, MemoryNeed) and need.need == fp.total + fp.load_extra and fp.load_extra > 0
    assert need.check == "on" and "of weights (" in need.detail and "more while it loads" in need.detail
    assert needs(ray_gpus_per_replica=1, memory_check="warn")[0].check == "warn"
    assert needs(ray_gpus_per_replica=1, memory_check="off") == [None]
    assert needs(ray_gpus_per_replica=0) == [None]
    assert needs(ray_gpus_per_replica=0.5)[0].share == 0.5 and need.share == 1


def test_a_model_may_have_a_gpu_share_of_its_own(gpus_here, tmp_path):
    """``--ray-gpus-per-replica S@MODEL`` (``QIS_MODEL_RAY_GPUS_PER_REPLICA``): replicas of small models share a GPU
    while the large one's take a GPU each; 0 puts a model's replicas on the CPU. Each GPU replica checks its own
    share of its GPU; the CPU's checks its model's memory modes for the CPU. Values above 1 and unserved models are
    refused before anything starts."""
    from qwen_image_server.cli import settings_from_options
    from qwen_image_server.engine.ray_deploy import build_deployments
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.profile import ProfileError
    from qwen_image_server.models.spec import ModelConfigError

    gpus_here["found"] = []
    big, small = "random:Qwen/Qwen-Image", "random:Qwen/Qwen-Image?layers=2&text_layers=1"
    models = [f"big={big}", f"small={small}", f"cpu={small.replace('layers=2', 'layers=3')}"]
    settings = Settings(models=models, engine="ray", ray_gpus_per_replica=1, model_ray_gpus_per_replica=["0.25@small", "0@cpu"])
    assert _replicas(settings) == [(1, "cuda"), (0.25, "cuda"), (0, "cpu")]
    ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
    shares = [model._bound_deployment.init_args[5] for model in ingress.init_args]
    assert shares[0].share == 1 and shares[1].share == 0.25 and shares[2] is None
    # without a value for every model, the others' share comes from the device as before
    assert _replicas(Settings(models=models[:2], engine="ray", device="cuda", model_ray_gpus_per_replica=["0.5@small"])) == [
        (1, "cuda"),
        (0.5, "cuda"),
    ]
    # each model's memory modes are checked on its own replicas' device
    sequential = Settings(models=models[:2], engine="ray", ray_gpus_per_replica=1, offload=["sequential@big"])
    assert _replicas(sequential.model_copy(update={"model_ray_gpus_per_replica": ["0@small"]})) == [(1, "cuda"), (0, "cpu")]
    with pytest.raises(ProfileError, match="model big: offload=sequential needs a CUDA device"):
        _replicas(sequential.model_copy(update={"model_ray_gpus_per_replica": ["0@big"]}))
    # the flag, as serve and plan take it; refusals name it
    flagged = settings_from_options({"model": models[:2], "engine": "ray", "ray_gpus_per_replica": ["1", "0.5@small"]})
    assert (flagged.ray_gpus_per_replica, flagged.model_ray_gpus_per_replica) == (1, ["0.5@small"])
    with pytest.raises(ValueError, match=r"--ray-gpus-per-replica: .*expected S@MODEL with S from 0 to 1, got '2@small'"):
        settings_from_options({"model": models[:2], "engine": "ray", "ray_gpus_per_replica": ["2@small"]})
    with pytest.raises(
        ModelConfigError,
        match=r"--ray-gpus-per-replica \(or QIS_MODEL_RAY_GPUS_PER_REPLICA\) names models that are not served: tiny",
    ):
        resolve_configured(Settings(models=models[:2], engine="ray", model_ray_gpus_per_replica=["0.5@tiny"]))


def test_invalid_settings_of_serve_run_are_named_without_showing_any_key(monkeypatch):
    """``serve run``/``serve deploy`` build Settings from the config's ``args`` and the environment: pydantic's own
    report repeated the whole input there, API keys included, into Ray's logs."""
    pytest.importorskip("ray.serve")
    from qwen_image_server import ray_app

    monkeypatch.setenv("QIS_API_KEYS", "topsecret-key")
    monkeypatch.setenv("QIS_MIN_IMAGE_SIDE", "2048")
    monkeypatch.setenv("QIS_MAX_IMAGE_SIDE", "512")
    with pytest.raises(ValueError) as refused:
        ray_app.app_builder({})
    assert str(refused.value) == "invalid settings:\n  QIS_MIN_IMAGE_SIDE=2048 must not exceed QIS_MAX_IMAGE_SIDE=512"
    with pytest.raises(ValueError) as refused:
        ray_app.app_builder({"queue_size": 0, "api_keys": ["", "topsecret-key"]})
    assert str(refused.value) == (
        "invalid settings:\n  args.queue_size: Input should be greater than or equal to 1 (got 0)\n"
        "  args.api_keys: an API key is empty (give every key, or none to serve without keys)"
    )
    monkeypatch.delenv("QIS_MIN_IMAGE_SIDE")
    monkeypatch.setenv("QWEN_IMAGE_API_KEYS", "other-key")  # two variables, different keys: refused there too
    with pytest.raises(ValueError, match="QWEN_IMAGE_API_KEYS and QIS_API_KEYS are both set, to different keys") as both:
        ray_app.app_builder({})
    assert "topsecret-key" not in str(both.value) and "other-key" not in str(both.value)


def test_replicas_asking_for_more_than_the_cluster_holds_are_named_in_a_warning(monkeypatch, caplog):
    """``--workers 2@qwen-image-tiny --demo`` on a 2-core machine: three replicas of one CPU each, one of which Ray
    could never place, and ``/ready`` said "loading" with nothing in the log to say why."""
    pytest.importorskip("ray.serve")
    from qwen_image_server.engine import ray_deploy
    from qwen_image_server.models.configured import resolve_configured

    settings = Settings(
        models=["a=random:Qwen/Qwen-Image", "b=random:Qwen/Qwen-Image-Edit"], engine="ray", ray_gpus_per_replica=0,
        model_workers=["2@a"],
    )  # fmt: skip
    specs = resolve_configured(settings)
    monkeypatch.setattr(ray_deploy, "_cluster_resources", lambda: {"CPU": 2.0, "memory": 1e10})
    with caplog.at_level(logging.WARNING):
        ray_deploy.build_deployments(settings, specs, lambda s, engine: None)
    assert (
        "the 3 model replicas to start ask for more than the cluster holds (3 CPUs, the Ray cluster has 2): those "
        "that do not fit wait for a node to join" in caplog.text
    )
    short = ray_deploy.placement_shortfall
    on_cpus, on_gpu = {"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0}
    assert short(settings, on_cpus, {"CPU": 3.0}) is None  # they fit
    assert short(settings, on_cpus, None) is None  # Ray not started: nothing known
    assert short(settings.model_copy(update={"ray_cpus_per_replica": 0.5}), on_cpus, {"CPU": 2.0}) is None
    on_gpus = short(settings, on_gpu, {"CPU": 8.0, "GPU": 2.0})
    assert on_gpus is not None and "(3 GPUs, the Ray cluster has 2)" in on_gpus
    one = short(settings, {"a": 0.0, "b": 1.0}, {"CPU": 8.0})
    assert one is not None and "(1 GPU, the Ray cluster has 0)" in one
    monkeypatch.setattr(ray_deploy, "_cluster_resources", lambda: None)  # a cluster that does not say: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ray_deploy.build_deployments(settings, specs, lambda s, engine: None)
    assert "ask for more than the cluster holds" not in caplog.text


def test_a_misspelled_setting_in_serve_run_args_is_refused():
    """Settings ignore names they do not know: ``wrokers: 4`` in a Serve config built an application of one worker."""
    pytest.importorskip("ray.serve")
    from qwen_image_server import ray_app

    with pytest.raises(ValueError) as refused:
        ray_app.app_builder({"wrokers": 4, "workers": 2, "queue_sise": 1})
    because = (
        "not a setting (args are the Settings fields, such as s3_bucket for QIS_S3_BUCKET, or the other variable "
        "names README lists, such as MODEL_PATH: README, Configuration)"
    )
    assert str(refused.value) == f"invalid settings:\n  args.queue_sise: {because}\n  args.wrokers: {because}"
    # a QIS_ variable's name is told its setting's (the message said a variable's name would do)
    with pytest.raises(ValueError) as refused:
        ray_app.app_builder({"QIS_S3_BUCKET": "images"})
    assert (
        str(refused.value)
        == "invalid settings:\n  args.QIS_S3_BUCKET: not a setting: args name QIS_ variables as their settings, s3_bucket"
    )
    # a variable's name is a setting's other name, as Settings takes it (NUM_GPUS_TO_USE=4 is workers=4)
    with pytest.raises(ValueError, match="model folder not found"):  # past the names, to the model itself
        ray_app.app_builder({"NUM_GPUS_TO_USE": 2, "MODEL_PATH": "/nowhere/qwen-image"})


def test_serve_runs_log_level_is_checked_and_given_to_the_replicas(monkeypatch, tiny_t2i):
    """``serve run``'s ``args.log_level`` (``serve --log-level``) reaches the application; a bad one is refused as
    a bad setting, not taken as a Settings field."""
    pytest.importorskip("ray.serve")
    from qwen_image_server import ray_app

    built: list = []
    monkeypatch.setattr(ray_app, "build_application", lambda settings, specs, log_level: built.append(log_level))
    ray_app.app_builder({"models": [f"tiny={tiny_t2i}"], "log_level": "debug"})
    ray_app.app_builder({"models": [f"tiny={tiny_t2i}"]})
    assert built == ["debug", "info"]
    with pytest.raises(ValueError, match=r"args.log_level: one of debug, info, warning, error, got 'loud'"):
        ray_app.app_builder({"models": [f"tiny={tiny_t2i}"], "log_level": "loud"})


def test_a_replicas_lines_have_the_servers_format_whatever_the_process_logging_is(capsys):
    """In a Ray Serve replica the package's loggers had no handler: Python printed their warnings bare (no time, level
    or request id) and dropped their info lines. ``log_to_stderr`` gives them the server's format at its level, once
    however often it is called."""
    from qwen_image_server.logs import log_to_stderr, worker_format

    logger = logging.getLogger("qwen_image_server")
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        log_to_stderr("info", worker_format("m@12"))
        log_to_stderr("info", worker_format("m@12"))
        logging.getLogger("qwen_image_server.engine.ray_replica").info("loaded")
        logging.getLogger("qwen_image_server.engine.ray_replica").debug("not shown at info")
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].endswith(" INFO [m@12] qwen_image_server.engine.ray_replica: loaded"), lines
    finally:
        logger.handlers[:], (logger.level, logger.propagate) = before[0], before[1:]


@pytest.mark.parametrize(("address", "signals"), [(None, 2), ("auto", 1)])
def test_a_start_that_hangs_still_ends_on_a_signal(run_without_ray, monkeypatch, address, signals):
    """A signal while a local Ray starts waits for ``ray.init`` to return; one that hangs (an address it keeps
    retrying) ignored SIGTERM for good. A second signal ends it at once, and joining a cluster (nothing starts here)
    ends at the first; the status is the first signal's."""
    import ray

    def hanging_init(**kwargs):
        for _ in range(signals):
            run_without_ray.handlers[signal.SIGTERM](signal.SIGTERM, None)
        raise AssertionError("ray.init was not interrupted")

    monkeypatch.setattr(ray, "init", hanging_init)
    with pytest.raises(SystemExit) as exited:
        run_without_ray(ray_address=address)
    assert exited.value.code == 143
    assert run_without_ray.seen.get("ray_shutdown", False) is (address is None)


def test_a_cluster_address_that_does_not_answer_is_refused_at_once(run_without_ray):
    """``--ray-address HOST:PORT`` of no cluster: ``ray.init`` retried it for minutes; refused before it, exit 2."""
    from conftest import free_port

    with pytest.raises(ValueError, match=r"the Ray cluster at 127.0.0.1:\d+ could not be reached: .*refused"):
        run_without_ray(ray_address=f"127.0.0.1:{free_port()}")
    assert "address" not in run_without_ray.seen, "ray.init was not called"
