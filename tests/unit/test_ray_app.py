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
    monkeypatch.setattr(ray_app, "build_application", lambda settings, specs: None)
    monkeypatch.setattr(ray_app, "stop", lambda app, grace: seen.update(stopped=(app, grace)))
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


class Handle:
    """Serve's app handle as ``stop`` uses it: ``options(method_name="drain").remote(...).result(...)``."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def options(self, method_name):
        assert method_name == "drain"
        return self

    def remote(self):
        self.calls += 1
        return self

    def result(self, timeout_s):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


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
    assert handle.calls == 3 and stopping == [("handle", "app"), ("delete", "app")]


def test_stop_gives_up_on_running_requests_after_the_grace(stopping, monkeypatch, caplog):
    from ray import serve

    from qwen_image_server import ray_app

    handle = Handle([1])
    monkeypatch.setattr(serve, "get_app_handle", lambda name: handle)
    with caplog.at_level(logging.WARNING):
        ray_app.stop("app", grace_seconds=0.2, poll_seconds=0.01)
    assert handle.calls > 1 and stopping == [("delete", "app")]
    assert "1 request(s) still running after 0.2s" in caplog.text


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
    from qwen_image_server.engine.ray_serve import build_deployments
    from qwen_image_server.models.spec import resolve_configured

    settings = Settings(models=["random:Qwen/Qwen-Image"], engine="ray", ray_gpus_per_replica=0, shutdown_grace_seconds=42)
    ingress = build_deployments(settings, resolve_configured(settings), lambda s, engine: None)._bound_deployment
    (model,) = ingress.init_args
    assert model._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 42
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 47
