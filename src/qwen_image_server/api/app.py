"""The FastAPI application factory: no work at import time, one app per call."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from ..config import Settings
from ..engine.base import EngineClient
from ..serving.rewrite import PromptRewriter
from ..serving.service import ImageService
from ..storage import make_store
from .errors import install_error_handlers
from .routes import router
from .uploads import BodySizeLimit

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: EngineClient) -> FastAPI:
    """An app serving ``engine``'s models; the engine is started and closed with the app."""

    rewriter = None
    if settings.enable_prompt_rewrite or settings.openai_api_key is not None or "openai_base_url" in settings.model_fields_set:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        rewriter = PromptRewriter(
            settings.openai_base_url,
            key,
            settings.openai_model,
            timeout=settings.rewrite_timeout,
            retries=settings.rewrite_retries,
            max_chars=settings.max_prompt_chars,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.close()
            if rewriter is not None:
                await rewriter.close()

    from .. import __version__

    app = FastAPI(title="qwen-image-server", version=__version__, lifespan=lifespan)
    store = make_store(settings)
    app.state.service = ImageService(settings, engine, store, rewriter)
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    return app
