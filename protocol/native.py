"""Responses of the native ``POST /generate`` endpoint (its request model lives with the server)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from alignd.protocol.common import UsageInfo
from alignd.protocol.diagnostics import AlignmentSummary


class TokenLogprobOut(BaseModel):
    token_id: int
    token: str
    logprob: float


class GeneratedTokenOut(TokenLogprobOut):
    top: list[TokenLogprobOut] = []


class GenerateChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[GeneratedTokenOut] | None = None
    alignment: AlignmentSummary | None = Field(None, description="Aligned decoding diagnostics (decoding.diagnostics=true).")


class GenerateResponse(BaseModel):
    id: str
    model: str
    choices: list[GenerateChoice]
    usage: UsageInfo


class GenerateStreamEvent(BaseModel):
    """One server-sent event of a streaming /generate: new text of one choice, or the final usage."""

    id: str
    index: int | None = None
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None
    logprobs: list[GeneratedTokenOut] | None = None
    alignment: AlignmentSummary | None = None
    usage: UsageInfo | None = None
