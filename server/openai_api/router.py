"""Thin routes of the OpenAI-compatible API."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from alignd.server.errors import ERROR_RESPONSES, GENERATION_ERROR_RESPONSES
from alignd.server.openai_api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from alignd.server.openai_api.serving import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, OpenAIServing
from alignd.server.request_scope import RequestContext, request_context, respond

router = APIRouter(tags=["openai"], responses=ERROR_RESPONSES)


def get_openai_serving(request: Request) -> OpenAIServing:
    return request.app.state.openai_serving


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: OpenAIServing = Depends(get_openai_serving)):
    return serving.list_models()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**GENERATION_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    ctx: RequestContext = Depends(request_context),
    serving: OpenAIServing = Depends(get_openai_serving),
):
    work = serving.chat_stream(body, ctx) if body.stream else serving.chat(body, ctx)
    return await respond(request, work, serving.metrics.client_disconnects.labels(CHAT_ENDPOINT).inc)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**GENERATION_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    body: CompletionRequest,
    request: Request,
    ctx: RequestContext = Depends(request_context),
    serving: OpenAIServing = Depends(get_openai_serving),
):
    work = serving.complete_stream(body, ctx) if body.stream else serving.complete(body, ctx)
    return await respond(request, work, serving.metrics.client_disconnects.labels(COMPLETIONS_ENDPOINT).inc)
