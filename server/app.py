"""The application factory: routers, error handlers, metrics and the engine's lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response

from alignd import __version__
from alignd.decoding.generation import open_generation
from alignd.models.engine import Engine
from alignd.models.factory import open_engine
from alignd.protocol.native import EngineHealthCard, HealthResponse
from alignd.server.admission import AdmissionController
from alignd.server.auth import require_api_key
from alignd.server.errors import ERROR_RESPONSES, install_error_handlers
from alignd.server.limits import BodySizeLimitMiddleware
from alignd.server.metrics import RequestMetricsMiddleware, ServerMetrics
from alignd.server.native.router import router as native_router
from alignd.server.native.serving import NativeServing
from alignd.server.openai_api.router import router as openai_router
from alignd.server.openai_api.serving import OpenAIServing
from alignd.server.probes.router import router as probes_router
from alignd.server.probes.serving import ProbeServing
from alignd.server.rewards.router import router as rewards_router
from alignd.server.rewards.serving import RewardServing
from alignd.settings import Settings, get_settings


@asynccontextmanager
async def _serving(app: FastAPI, engine: Engine, settings: Settings, metrics: ServerMetrics) -> AsyncIterator[None]:
    """Build the serving objects over an open engine; close what they own on exit."""
    async with open_generation(engine, settings) as generation:
        generation.step_observers.append(metrics.observe_step)
        generation.response_observers.append(metrics.observe_response)
        # One controller for every generate endpoint: the limits are per server, not per API.
        admission = AdmissionController(
            settings, on_reject=lambda family, reason: metrics.admission_rejected.labels(family, reason).inc()
        )
        metrics.bind_admission(admission)
        metrics.bind_engine(engine)
        app.state.engines = generation.engines()
        metrics.bind_engines(app.state.engines)
        app.state.engine = engine
        app.state.admission = admission
        app.state.openai_serving = OpenAIServing(generation, settings, metrics, admission)
        app.state.native_serving = NativeServing(generation, settings, metrics, admission)
        app.state.reward_serving = RewardServing(generation.rewards, settings, metrics)
        app.state.probe_serving = ProbeServing.for_engine(engine, settings, metrics)
        try:
            yield
        finally:
            await app.state.probe_serving.close()


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. With ``engine`` given, the caller owns it (tests, embedding); otherwise the
    app opens the configured engine at start-up and shuts it down on exit."""
    settings = settings or get_settings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            async with _serving(app, engine, settings, metrics):
                yield
            return
        async with open_engine(settings) as opened, _serving(app, opened, settings, metrics):
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
    authenticated = [Depends(require_api_key)]
    app.include_router(openai_router, dependencies=authenticated)
    app.include_router(native_router, dependencies=authenticated)
    app.include_router(rewards_router, dependencies=authenticated)
    app.include_router(probes_router, dependencies=authenticated)

    @app.get("/health", tags=["ops"], response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(request: Request, response: Response) -> HealthResponse:
        """Each engine's state. 200 once the SFT engine is loaded and warmed up (the server accepts
        connections only then): ``ok``, or ``degraded`` while an engine that only some requests need (a
        remote baseline, say) is down; 503 ``unavailable`` when the SFT engine itself is down. A down
        remote is asked again here, so this also sees it come back. Never needs an API key (load
        balancers and container health checks call it)."""
        engines: dict = request.app.state.engines
        states = await asyncio.gather(*(engine.check_health() for engine in engines.values()))
        cards = {
            name: EngineHealthCard(**dataclasses.asdict(state)) for name, state in zip(engines, states, strict=False)
        }
        if cards["sft"].status == "down":
            status, response.status_code = "unavailable", 503
        else:
            status = "ok" if all(card.status == "up" for card in cards.values()) else "degraded"
        return HealthResponse(status=status, model=settings.model_name, engine=settings.engine, engines=cards)

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        dependencies=authenticated if settings.metrics_require_auth else [],
        responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]},
    )
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: alignd_* and the vLLM engine's own vllm:* series."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Outermost first: the metrics see every answer, the size limit runs before any body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
