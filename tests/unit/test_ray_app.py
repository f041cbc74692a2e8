"""``qwen-image-server serve --engine ray`` (``ray_app.run``) without starting Ray: what it sets up before
``ray.init``."""

from __future__ import annotations

import os

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
    seen: dict[str, str | None] = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(value=os.environ.get(VAR), **kwargs))
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray_app, "build_application", lambda settings, specs: None)

    def run(**settings) -> dict:
        seen.clear()
        ray_app.run(Settings(engine="ray", **settings), [])
        return seen

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
