"""OpenAI-compatible request and response models (pydantic only; no serving logic).

Requests forbid unknown fields: a misspelt parameter gets a 400 that names it instead of being
silently ignored.
"""

from __future__ import annotations

import time
from typing import Literal, cast

from pydantic import BaseModel, Field, field_validator, model_validator

from alignd.protocol.common import ChatMessage, StrictModel, TextContentPart, UsageInfo  # noqa: F401 - re-exported
from alignd.protocol.diagnostics import AlignmentSummary
from alignd.server.sampling import SamplingFields


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, ge=0, description="Bounded by ALIGND_MAX_TOP_LOGPROBS (checked at run time)."
    )
    user: str | None = None

    @field_validator("messages")
    @classmethod
    def _messages_have_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in messages):
            raise ValueError("every message is empty: give at least one message with text")
        if messages[-1].role == "assistant":
            raise ValueError("the last message is the assistant's: end with a user (or system) message")
        return messages

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree: give only one of them")
            self.max_tokens = self.max_completion_tokens
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, description="Bounded by ALIGND_MAX_TOP_LOGPROBS (checked at run time).")
    echo: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt):
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not items or any(len(p) == 0 for p in items):
            raise ValueError("prompt is empty: give a non-empty string, list of strings, or token ids")
        # The count is bounded by ALIGND_MAX_PROMPTS_PER_REQUEST, checked at run time by the serving
        # class (a schema bound here would freeze the setting's default).
        return prompt

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported: drop one of them")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt normalised to a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [cast("str | list[int]", p)]  # one prompt: a string or its token ids
        return list(cast("list[str] | list[list[int]]", p))


# ---------------------------------------------------------------------------- responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None
    alignment: AlignmentSummary | None = Field(
        None, description="Aligned decoding diagnostics (decoding.diagnostics=true)."
    )


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    alignment: AlignmentSummary | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    alignment: AlignmentSummary | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignd"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
