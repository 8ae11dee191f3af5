"""Models of the native ``POST /generate`` endpoint (pydantic only).

The typed client in ``alignd.clients`` uses these same models, so server and client cannot drift.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from alignd.server.openai_api.protocol import ChatMessage, UsageInfo
from alignd.server.sampling import SamplingFields


class GenerateRequest(SamplingFields):
    prompt: str | None = Field(None, description="Raw prompt text (no chat template).")
    messages: list[ChatMessage] | None = Field(None, description="A chat, rendered with the model's template.")
    model: str | None = Field(None, description="Optional; must name the served model if given.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Report log-probabilities with this many alternatives.")
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt is empty: give some text")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages is empty: give at least one message")
            if not any(m.text().strip() for m in self.messages):
                raise ValueError("every message is empty: give at least one message with text")
        return self


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
    alignment: dict | None = None


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
    alignment: dict | None = None
    usage: UsageInfo | None = None
