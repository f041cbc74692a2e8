"""The playground: a page in the browser for generating, editing and varying images with this server.

The page (``qwen_image_server/playground/``: HTML, JS modules and CSS, no build step)
is served at ``/`` and ``/playground`` and loads nothing from any other host. The page
and its assets are open without an API key (``open_paths``): the page asks for the key
and sends it with every API call. ``/playground/settings`` (the limits and per-model
defaults the forms need) is an API call like any other and needs the key.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import NotFound
from ..models.step_cache import POLICIES
from ..serving.service import ImageService
from ..serving.sizes import SIZE_MULTIPLE

router = APIRouter(include_in_schema=False)

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: Everything the page loads comes from this server; images are data: and blob: URLs the page makes itself.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self' blob:; font-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
PAGE_PATHS = ("/", "/playground")
#: The most previews a streamed request may ask for (``partial_images``' limit in the protocol).
MAX_PARTIAL_IMAGES = 3


@cache
def assets() -> dict[str, tuple[bytes, str]]:
    """The page's files by name: their bytes and media type (read once, on first use)."""
    folder = resources.files("qwen_image_server") / "playground"
    found = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in MEDIA_TYPES:
            found[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return found


def open_paths() -> tuple[str, ...]:
    """The paths that load without an API key: the page and its assets (never ``/playground/settings``)."""
    return PAGE_PATHS + tuple(f"/playground/{name}" for name in assets() if name != "index.html")


def _file(name: str) -> Response:
    if name not in assets():
        raise NotFound(f"Not found: /playground/{name}")
    data, media_type = assets()[name]
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}
    return Response(data, media_type=media_type, headers=headers)


@router.get("/")
@router.get("/playground")
async def page() -> Response:
    """The playground page (a browser opening the server's address lands here)."""
    return _file("index.html")


@router.get("/playground/settings")
async def playground_settings(request: Request) -> dict:
    """What the forms need and ``/v1/models`` does not say: the server's limits and each model's defaults."""
    service: ImageService = request.app.state.service
    s = service.settings

    def model(spec) -> dict:
        options = spec.options
        return {
            "kind": spec.kind,
            "default_size": str(options.get("default_size", s.default_size)),
            "default_steps": int(options.get("default_steps", s.default_steps)),
            "cache": spec.profile.cache,
        }

    models = {spec.id: model(spec) for spec in service.models.values()}
    for name, (base, lora) in service.loras.items():
        models[name] = {**model(base), "base_model": base.id, "preset": dict(lora.preset)}
    return {
        "limits": {
            "min_side": s.min_image_side,
            "max_side": s.max_image_side,
            "size_multiple": SIZE_MULTIPLE,
            "max_steps": s.max_steps,
            "max_n": s.max_n,
            "max_input_images": s.max_input_images,
            "max_partial_images": MAX_PARTIAL_IMAGES,
            "max_prompt_chars": s.max_prompt_chars,
            "max_upload_bytes": s.max_upload_bytes,
        },
        "defaults": {"true_cfg_scale": s.default_true_cfg_scale},
        "models": models,
        "cache_policies": ["none", *POLICIES],
        "prompt_rewrite": {"available": service.rewriter is not None, "default": bool(s.enable_prompt_rewrite)},
    }


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    """One of the page's scripts, styles or icons."""
    if name == "index.html":  # the page itself is served at ``/`` and ``/playground`` only
        raise NotFound(f"Not found: /playground/{name}")
    return _file(name)
