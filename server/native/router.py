"""Thin route of the native generate endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from alignd.server.errors import ERROR_RESPONSES
from alignd.server.native.protocol import GenerateRequest, GenerateResponse
from alignd.server.native.serving import NativeServing

router = APIRouter(tags=["native"], responses=ERROR_RESPONSES)


def get_native_serving(request: Request) -> NativeServing:
    return request.app.state.native_serving


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(body: GenerateRequest, serving: NativeServing = Depends(get_native_serving)):
    if body.stream:
        return StreamingResponse(serving.sse_events(serving.generate_stream(body)), media_type="text/event-stream")
    return await serving.generate(body)
