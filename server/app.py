"""The application factory: routers, error handlers, metrics and the engine's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from alignd import __version__
from alignd.models.engine import Engine
from alignd.models.factory import open_engine
from alignd.server.errors import install_error_handlers
from alignd.server.metrics import RequestMetricsMiddleware, ServerMetrics
from alignd.server.native.router import router as native_router
from alignd.server.native.serving import NativeServing
from alignd.server.openai_api.router import router as openai_router
from alignd.server.openai_api.serving import OpenAIServing
from alignd.settings import Settings, get_settings


def _attach(app: FastAPI, engine: Engine, settings: Settings, metrics: ServerMetrics) -> None:
    app.state.engine = engine
    app.state.openai_serving = OpenAIServing(engine, settings, metrics)
    app.state.native_serving = NativeServing(engine, settings, metrics)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. With ``engine`` given, the caller owns it (tests, embedding); otherwise the
    app opens the configured engine at start-up and shuts it down on exit."""
    settings = settings or get_settings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            _attach(app, engine, settings, metrics)
            yield
            return
        async with open_engine(settings) as opened:
            _attach(app, opened, settings, metrics)
            yield

    app = FastAPI(
        title="alignd",
        version=__version__,
        description="Inference server for aligned decoding (Transfer Q*) over vLLM.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(native_router)

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> dict:
        """200 once the engine is loaded and warmed up (the server accepts connections only then)."""
        return {"status": "ok", "model": settings.model_name, "engine": settings.engine}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
