"""Thin route of the native generate endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from alignd.protocol.native import BaselineList, MethodList, ValueHeadCard
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


@router.get("/v1/methods", response_model=MethodList)
async def list_methods(serving: NativeServing = Depends(get_native_serving)):
    """The decoding methods (``decoding.method``) and TQ*'s value sources (``decoding.value``) this server
    offers, with the parameters each reads, this server's defaults and limits, and which are available."""
    return serving.list_methods()


@router.get("/v1/value_head", response_model=ValueHeadCard)
async def value_head(serving: NativeServing = Depends(get_native_serving)):
    """The learned value head of ``decoding.value='head'``: the reward and baseline it was trained for, and
    how it was made."""
    return serving.value_head()


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(
    body: GenerateRequest,
    request: Request,
    ctx: RequestContext = Depends(request_context),
    serving: NativeServing = Depends(get_native_serving),
):
    work = serving.generate_stream(body, ctx) if body.stream else serving.generate(body, ctx)
    return await respond(request, work, serving.metrics.client_disconnects.labels(GENERATE_ENDPOINT).inc)
