"""The request model of the native ``POST /generate`` endpoint (pydantic only).

Its responses are wire models of :mod:`alignd.protocol.native`, which the typed client in
``alignd.clients`` uses too, so server and client cannot drift.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from alignd.protocol.common import ChatMessage
from alignd.protocol.native import (  # noqa: F401 - the endpoint's responses, re-exported
    GenerateChoice,
    GeneratedTokenOut,
    GenerateResponse,
    GenerateStreamEvent,
    TokenLogprobOut,
)
from alignd.server.sampling import SamplingFields


class GenerateRequest(SamplingFields):
    prompt: str | None = Field(None, description="Raw prompt text (no chat template).")
    messages: list[ChatMessage] | None = Field(None, description="A chat, rendered with the model's template.")
    model: str | None = Field(None, description="Optional; must name the served model if given.")
    logprobs: int | None = Field(
        None,
        ge=0,
        description="Report log-probabilities with this many alternatives (at most ALIGND_MAX_TOP_LOGPROBS).",
    )
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
