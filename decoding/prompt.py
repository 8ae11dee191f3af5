"""What decoding methods decode from: the request's prompt, and the policies that continue it."""

from __future__ import annotations

from dataclasses import dataclass

from alignd.models.chat import with_system_prompt
from alignd.models.engine import Engine
from alignd.rewards.base import RewardItem


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: token ids as the SFT model sees them, plus the chat or text they came from
    (a prompted baseline renders its own version)."""

    token_ids: tuple[int, ...]
    messages: tuple[dict, ...] | None = None
    text: str | None = None

    def reward_item(self, response: str) -> RewardItem:
        if self.messages is not None:
            return RewardItem(response=response, messages=self.messages)
        return RewardItem(response=response, prompt=self.text or "")


class Policy:
    """A model that continues prompts: an engine, and optionally an alignment system prompt that turns
    it into a prompted baseline (sharing the SFT engine's weights and KV cache)."""

    def __init__(self, engine: Engine, name: str, system_prompt: str | None = None) -> None:
        self.engine = engine
        self.name = name
        self.system_prompt = system_prompt

    def prefix(self, prompt: Prompt) -> list[int]:
        if self.system_prompt is None:
            return list(prompt.token_ids)
        if prompt.messages is not None:
            return self.engine.render_chat(with_system_prompt([dict(m) for m in prompt.messages], self.system_prompt))
        return self.engine.encode(f"{self.system_prompt}\n\n{prompt.text or ''}")
