"""Models of the reward endpoints (pydantic only)."""

from __future__ import annotations

import math
from typing import cast

from pydantic import BaseModel, Field, model_validator

from alignd.rewards.base import RewardItem
from alignd.server.openai_api.protocol import ChatMessage, StrictModel


class RewardItemIn(StrictModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    response: str

    @model_validator(mode="after")
    def _one_prompt(self) -> RewardItemIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("each item needs exactly one of 'prompt' or 'messages', and a 'response'")
        return self

    def to_item(self) -> RewardItem:
        messages = tuple(m.as_template_message() for m in self.messages) if self.messages else None
        return RewardItem(response=self.response, prompt=self.prompt, messages=messages)


class RewardRequest(StrictModel):
    reward: str | None = Field(None, description="The reward's name (GET /v1/rewards lists them).")
    rewards: list[str] | None = Field(None, min_length=1, description="Several rewards at once, instead of 'reward'.")
    items: list[RewardItemIn] = Field(min_length=1)
    token_values: bool = Field(False, description="Per-token contributions (implicit rewards).")
    truncate: bool = Field(False, description="Cut texts beyond the model's context instead of rejecting them.")

    @model_validator(mode="after")
    def _one_reward_field(self) -> RewardRequest:
        if (self.reward is None) == (self.rewards is None):
            raise ValueError("give exactly one of 'reward' (a name) or 'rewards' (a list of names)")
        return self

    def reward_names(self) -> list[str]:
        # _one_reward_field: 'rewards' is given when 'reward' is not
        return [self.reward] if self.reward is not None else list(dict.fromkeys(cast("list[str]", self.rewards)))


class TokenValue(BaseModel):
    token: str
    value: float


class RewardResponse(BaseModel):
    reward: str | None = None
    scores: list[float] | None = None
    truncated: list[bool] | None = None
    token_values: list[list[TokenValue]] | None = None
    scores_by_reward: dict[str, list[float]] | None = None


class CompareRequest(StrictModel):
    reward: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    responses: list[str] = Field(min_length=2, max_length=2, description="[a, b]")
    truncate: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> CompareRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class CompareResponse(BaseModel):
    reward: str
    scores: list[float]
    preference: float = Field(description="Bradley-Terry probability that a is preferred: sigmoid(r_a - r_b).")


class RewardInfo(BaseModel):
    name: str
    kind: str
    description: str
    token_values: bool


class RewardList(BaseModel):
    object: str = "list"
    data: list[RewardInfo]


def bradley_terry(r_a: float, r_b: float) -> float:
    """sigmoid(r_a - r_b), computed without overflow for large gaps."""
    d = r_a - r_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)
