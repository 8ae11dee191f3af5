"""The reward interface: score a batch of (prompt or chat, response) pairs, one number each.

Used by the ``/v1/rewards`` endpoints and by decoding methods (Transfer Q* needs a target reward and,
for indirect transfer, a baseline reward).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardItem:
    """One pair to score. ``messages`` is a chat (without the answer); ``prompt`` is shorthand for a
    single user message."""

    response: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None

    def chat(self) -> list[dict]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def prompt_text(self) -> str:
        """The prompt as plain text (for rewards that do not use a chat template)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.messages or ())


@dataclass
class RewardScore:
    value: float
    # Per-token contributions, where the reward is a sum over response tokens (implicit rewards).
    tokens: list[str] | None = None
    token_values: list[float] | None = None
    truncated: bool = False
    extra: dict = field(default_factory=dict)


class Reward(abc.ABC):
    """A named reward. Implementations batch internally; ``score`` never blocks the event loop."""

    name: str
    kind: str
    description: str = ""
    supports_token_values: bool = False
    # Known range of the scores, (low, high), or None when unbounded or unknown. Greedy value-guided
    # decoding uses it to skip candidates that cannot win whatever their value.
    bounds: tuple[float, float] | None = None

    @abc.abstractmethod
    async def score(
        self, items: Sequence[RewardItem], *, token_values: bool = False, truncate: bool = False
    ) -> list[RewardScore]:
        """One score per item, in order. ``truncate``: cut texts beyond the model's context instead
        of rejecting them (the score says ``truncated``)."""

    async def close(self) -> None:
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "token_values": self.supports_token_values,
        }
