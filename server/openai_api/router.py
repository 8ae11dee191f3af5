"""Thin routes of the OpenAI-compatible API."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from alignd.server.errors import ERROR_RESPONSES
from alignd.server.openai_api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from alignd.server.openai_api.serving import OpenAIServing

router = APIRouter(tags=["openai"], responses=ERROR_RESPONSES)


def get_openai_serving(request: Request) -> OpenAIServing:
    return request.app.state.openai_serving


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: OpenAIServing = Depends(get_openai_serving)):
    return serving.list_models()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(body: ChatCompletionRequest, serving: OpenAIServing = Depends(get_openai_serving)):
    if body.stream:
        return StreamingResponse(serving.sse_events(serving.chat_stream(body)), media_type="text/event-stream")
    return await serving.chat(body)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def completions(body: CompletionRequest, serving: OpenAIServing = Depends(get_openai_serving)):
    if body.stream:
        return StreamingResponse(serving.sse_events(serving.complete_stream(body)), media_type="text/event-stream")
    return await serving.complete(body)
