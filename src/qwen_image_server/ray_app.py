"""The Ray Serve application: the API (``api.app.create_app``) on the Ray engine (``engine/ray_serve.py``).

Like ``cli.py``, this module sits above every layer and wires them together. Its
``app_builder`` is the ``import_path`` of ``serve run`` and ``serve deploy``.
Importing it needs ``ray[serve]`` (``pip install 'qwen-image-server[ray]'``).
"""

from __future__ import annotations

import os

from ray import serve

from .api.app import create_app
from .config import Settings
from .engine.ray_serve import build_deployments
from .models.spec import ModelSpec, resolve_configured


def build_application(settings: Settings, specs: list[ModelSpec]):
    """The Serve application: one deployment per model plus the FastAPI ingress."""
    return build_deployments(settings, specs, create_app)


def app_builder(args: dict):
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: qwen_image_server.ray_app:app_builder``.

    ``args`` are Settings fields (``models``, ``workers``, ``task_timeout``...); the
    environment variables work as for ``qwen-image-server serve``.
    """
    settings = Settings(**{**dict(args or {}), "engine": "ray"})
    return build_application(settings, resolve_configured(settings))


#: Seconds Serve's controller gives a new HTTP proxy to be ready before it kills and restarts it (Serve's own default
#: is 5): set for a Ray this command starts, whose processes inherit it, unless the environment sets it. On a 2-core
#: machine made busy on purpose, the test suite saw the proxy killed that way and ``serve.start`` fail.
PROXY_READY_CHECK_SECONDS = "60"


def run(settings: Settings, specs: list[ModelSpec]) -> None:
    """``qwen-image-server serve --engine ray``: join or start a cluster, deploy, serve until interrupted."""
    import ray

    if settings.ray_address is None:  # a local Ray may start here (a running cluster keeps its own setting)
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_CHECK_SECONDS)
    try:
        ray.init(address=settings.ray_address, ignore_reinit_error=True)
    except ConnectionError as exc:  # e.g. "ray client connection timeout" (a ray:// address, after about 30 s)
        raise ValueError(f"the Ray cluster at {settings.ray_address or 'a new local Ray'} could not be reached: {exc}") from None
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, specs), name=settings.ray_app_name, route_prefix="/", blocking=True)
