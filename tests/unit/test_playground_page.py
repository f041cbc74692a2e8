"""The playground's page and assets, served by the app on a fake engine (no browser, no models)."""

from __future__ import annotations

import asyncio
import re
from importlib import resources

import httpx
import pytest

from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.engine.base import EngineDefaults
from qwen_image_server.models.profile import LoraSpec, RunProfile
from qwen_image_server.models.spec import ModelSpec

KEY = "sk-playground-test"
FOLDER = resources.files("qwen_image_server") / "playground"
TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
# The only URL an asset may contain: SVG's XML namespace, which names the format and is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


class FakeEngine(EngineDefaults):
    """Just the models: the playground's routes never run a job."""

    def __init__(self):
        lora = LoraSpec(name="style", path="/nowhere/style.safetensors", model="tiny", preset={"steps": 8})
        self.models = [
            ModelSpec(
                "tiny",
                "/nowhere/tiny",
                "QwenImagePipeline",
                "text-to-image",
                options={"default_size": "256x256", "default_steps": 4},
                profile=RunProfile(loras=(lora,), cache="fbcache:threshold=0.1"),
            ),
            ModelSpec("tiny-edit", "/nowhere/edit", "QwenImageEditPlusPipeline", "edit-plus"),
        ]

    async def start(self):
        pass

    async def close(self):
        pass

    def ready(self):
        return True

    def status(self):
        return {}


def _get(app, *paths, headers=None):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(path, headers=headers or {}) for path in paths]

    return asyncio.run(run())


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(image_output_dir=tmp_path, max_image_side=512, max_steps=60), FakeEngine())


@pytest.fixture
def keyed_app(tmp_path):
    return create_app(Settings(image_output_dir=tmp_path, api_keys=[KEY]), FakeEngine())


def _asset_names() -> list[str]:
    return sorted(entry.name for entry in FOLDER.iterdir() if entry.is_file())


def _referenced(text: str) -> set[str]:
    """Asset names the page and its modules load: src/href in the HTML, ES module imports in the scripts."""
    names = set(re.findall(r'(?:src|href)="playground/([^"]+)"', text))
    return names | set(re.findall(r'from "\./([^"]+)"', text))


def test_the_page_is_served_at_the_root_and_at_playground(app):
    root, playground = _get(app, "/", "/playground")
    for response in (root, playground):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script type="module" src="playground/app.js"></script>' in response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert root.content == playground.content == (FOLDER / "index.html").read_bytes()


def test_every_asset_is_served_with_its_content_type_and_every_reference_resolves(app):
    names = [name for name in _asset_names() if name != "index.html"]
    assert {"app.js", "style.css"} <= set(names)
    responses = _get(app, *(f"/playground/{name}" for name in names))
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == 200, name
        assert response.headers["content-type"].split(";")[0] == TYPES[name.rsplit(".", 1)[1]], name
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (FOLDER / name).read_bytes()
    referenced = set()
    for name in _asset_names():
        referenced |= _referenced((FOLDER / name).read_text())
    assert referenced, "the page loads no assets?"
    assert referenced <= set(names), f"referenced but not shipped: {referenced - set(names)}"


def test_no_asset_loads_anything_from_another_host():
    for name in _asset_names():
        text = (FOLDER / name).read_text().replace(SVG_NAMESPACE, "")
        found = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"')]*", text)
        assert not found, f"{name} references {found}"
        assert "@import" not in text and "@font-face" not in text, name


def test_the_package_ships_the_assets():
    text = (resources.files("qwen_image_server").parent.parent / "pyproject.toml").read_text()
    declared = re.search(r'"qwen_image_server" = \[([^\]]*)\]', text)
    assert declared, "pyproject.toml declares no package data for the playground"
    patterns = re.findall(r'"playground/\*\.(\w+)"', declared.group(1))
    assert {name.rsplit(".", 1)[1] for name in _asset_names()} <= set(patterns)


def test_unknown_paths_stay_404_json(app):
    unknown, asset, index, under = _get(app, "/nope", "/playground/nope.js", "/playground/index.html", "/playground/a/b.js")
    for response in (unknown, asset, index, under):
        assert response.status_code == 404
        assert response.json()["error"]["message"].startswith("Not found")


def test_the_page_opens_without_a_key_and_the_api_still_needs_one(keyed_app):
    names = [f"/playground/{name}" for name in _asset_names() if name != "index.html"]
    responses = _get(keyed_app, "/", "/playground", *names, "/playground/settings", "/v1/models")
    *page, settings, models = responses
    assert [r.status_code for r in page] == [200] * len(page)
    assert settings.status_code == models.status_code == 401
    assert settings.json()["error"]["code"] == "invalid_api_key"
    (with_key,) = _get(keyed_app, "/playground/settings", headers={"Authorization": f"Bearer {KEY}"})
    assert with_key.status_code == 200


def test_settings_give_the_limits_and_each_models_defaults(app):
    (response,) = _get(app, "/playground/settings")
    body = response.json()
    assert body["limits"]["max_side"] == 512
    assert body["limits"]["max_steps"] == 60
    assert body["limits"]["size_multiple"] == 16
    assert body["models"]["tiny"] == {
        "kind": "text-to-image",
        "default_size": "256x256",
        "default_steps": 4,
        "cache": "fbcache:threshold=0.1",
    }
    assert body["models"]["tiny-edit"]["kind"] == "edit-plus"
    assert body["models"]["tiny-edit"]["default_size"] == "512x512"  # the server's 1024x1024, within max_side
    assert body["models"]["style"]["base_model"] == "tiny"
    assert body["models"]["style"]["preset"] == {"steps": 8}
    assert body["cache_policies"][0] == "none" and "fbcache" in body["cache_policies"]
    assert body["prompt_rewrite"] == {"available": False, "default": False}
