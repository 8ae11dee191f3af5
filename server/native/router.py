"""Thin route of the native generate endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from alignd.protocol.native import BaselineList
from alignd.server.errors import GENERATION_ERROR_RESPONSES
from alignd.server.native.protocol import GenerateRequest, GenerateResponse
from alignd.server.native.serving import GENERATE_ENDPOINT, NativeServing
from alignd.server.request_scope import RequestContext, request_context, respond

router = APIRouter(tags=["native"], responses=GENERATION_ERROR_RESPONSES)


def get_native_serving(request: Request) -> NativeServing:
    return request.app.state.native_serving


@router.get("/v1/baselines", response_model=BaselineList)
async def list_baselines(serving: NativeServing = Depends(get_native_serving)):
    """The baselines TQ* can transfer from (``decoding.baseline``), with their provenance."""
    return serving.list_baselines()


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(
    body: GenerateRequest,
    request: Request,
    ctx: RequestContext = Depends(request_context),
    serving: NativeServing = Depends(get_native_serving),
):
    work = serving.generate_stream(body, ctx) if body.stream else serving.generate(body, ctx)
    return await respond(request, work, serving.metrics.client_disconnects.labels(GENERATE_ENDPOINT).inc)
