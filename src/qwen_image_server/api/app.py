"""The FastAPI application factory: no work at import time, one app per call."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from ..config import Settings
from ..engine.base import EngineClient
from ..serving.rewrite import make_rewriter
from ..serving.service import ImageService
from ..storage import in_store_thread, make_store
from .errors import install_error_handlers
from .head import HeadRequests
from .metrics import Metrics, RequestMetrics, install_metrics
from .playground import open_paths as playground_paths
from .playground import router as playground_router
from .routes import router
from .security import ApiKeys, CorsHeaders, OriginPolicy, RequestIds, install_request_id_logging
from .uploads import BodySizeLimit

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: EngineClient) -> FastAPI:
    """An app serving ``engine``'s models; the engine is started and closed with the app."""

    rewriter = make_rewriter(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        problem = await in_store_thread(store.check, write=True)
        if problem:  # b64_json responses do not need the store: serve, but say it at once
            log.warning("url responses will fail: %s", problem)
        await engine.start()
        try:
            yield
        finally:
            await engine.close()
            if rewriter is not None:
                await rewriter.close()

    from .. import __version__

    app = FastAPI(title="qwen-image-server", version=__version__, lifespan=lifespan)
    metrics = Metrics(engine)
    store = make_store(settings)
    app.state.service = ImageService(
        settings, engine, store, rewriter, observers=(metrics.observe_job,), fetches=metrics.observe_fetch
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(playground_router)
    install_metrics(app, metrics)
    # Starlette runs the last added outermost: HEAD, metrics, request ids, origin policy, CORS, API keys, body limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    keys = settings.all_api_keys()
    if keys:
        app.add_middleware(ApiKeys, keys=keys, open_paths=playground_paths() + (("/metrics",) if settings.public_metrics else ()))
    if settings.cors_origins:
        app.add_middleware(CorsHeaders, origins=settings.cors_origins)
    # Outside CORS: an origin it does not allow gets the 403 envelope, its preflights too.
    app.add_middleware(OriginPolicy, allowed=settings.cors_origins)
    # (Ray Serve's proxy names each request in X-Request-ID and echoes it itself: RayEngine.proxy_echoes_request_ids)
    app.add_middleware(RequestIds, echoed=lambda: engine.proxy_echoes_request_ids)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=app.router.routes)  # counts the middlewares' refusals too
    app.add_middleware(HeadRequests, routes=app.router.routes)  # HEAD as GET, without a body: outside all the others
    install_request_id_logging()
    return app
