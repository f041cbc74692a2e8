"""In-process API tests: the real app (``create_app``) around a ``FakeEngine``, called through Starlette's TestClient.

No worker process, no model, no port: a request goes through the middlewares, the
routes, the service and the fake engine in milliseconds. What only a real process
shows (workers, pipelines, connections, Ray, S3) is tested in ``tests/e2e``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.models.spec import resolve_configured

T2I, EDIT, PLUS = "qwen-image-tiny", "qwen-image-edit-tiny", "qwen-image-edit-plus-tiny"


@dataclass
class Api:
    """One in-process server: its HTTP client, its fake engine and its settings."""

    client: TestClient
    engine: FakeEngine
    settings: Settings


@pytest.fixture(scope="session")
def tiny_models(tiny_t2i, tiny_edit, tiny_edit_plus) -> dict[str, Path]:
    """The shared server's model names and folders (specs are read from the folders; no weights are loaded)."""
    return {T2I: tiny_t2i, EDIT: tiny_edit, PLUS: tiny_edit_plus}


@pytest.fixture(scope="session")
def make_api(tiny_models, tmp_path_factory):
    """``make_api(models=None, **settings)``: an in-process server; ``models`` maps ids to folders (default: the three tiny ones)."""
    opened: list[TestClient] = []

    def make(models: dict[str, Path] | None = None, headers: dict[str, str] | None = None, **overrides) -> Api:
        entries = [f"{name}={folder}" for name, folder in (models or tiny_models).items()]
        overrides.setdefault("image_output_dir", str(tmp_path_factory.mktemp("images")))
        settings = Settings(models=entries, **overrides)
        engine = FakeEngine(resolve_configured(settings), settings)
        client = TestClient(create_app(settings, engine), headers=headers, raise_server_exceptions=False)
        client.__enter__()  # runs the app's lifespan (starts the engine)
        opened.append(client)
        return Api(client, engine, settings)

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api(make_api) -> Api:
    """The shared in-process server: the three tiny models, two workers each, default limits."""
    return make_api(workers=2, max_steps=1000)


@pytest.fixture
def fresh_api(make_api) -> Api:
    """An in-process server of its own, for a test that changes the engine's state (pauses it, breaks a model)."""
    return make_api(workers=1, queue_size=1, task_timeout=5)
