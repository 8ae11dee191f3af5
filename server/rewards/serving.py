"""Serving logic of the reward endpoints."""

from __future__ import annotations

import asyncio
import builtins
import math

from alignd.errors import InvalidRequestError, RewardFailedError
from alignd.rewards.base import RewardItem
from alignd.rewards.registry import RewardRegistry
from alignd.server.metrics import ServerMetrics
from alignd.server.rewards.protocol import (
    CompareRequest,
    CompareResponse,
    RewardInfo,
    RewardList,
    RewardRequest,
    RewardResponse,
    TokenValue,
    bradley_terry,
)
from alignd.settings import Settings


class RewardServing:
    def __init__(self, registry: RewardRegistry, settings: Settings, metrics: ServerMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics

    def list(self) -> RewardList:
        return RewardList(data=[RewardInfo(**r.describe()) for r in self.registry.all()])

    # builtins.list: in this class body, ``list`` is the method above
    async def _score(self, name: str, items: builtins.list[RewardItem], token_values: bool, truncate: bool):
        reward = self.registry.get(name)
        if token_values and not reward.supports_token_values:
            raise InvalidRequestError(
                f"reward '{name}' ({reward.kind}) has no per-token values; drop token_values or use an implicit reward",
                param="token_values",
            )
        scores = await reward.score(items, token_values=token_values, truncate=truncate)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s.value)]
        if bad:
            raise RewardFailedError(f"reward '{name}' gave a non-finite score for item {bad[0]}", param="items")
        self.metrics.reward_items.labels(name).inc(len(items))
        return scores

    def _check_batch(self, n: int) -> None:
        if n > self.settings.max_reward_batch:
            raise InvalidRequestError(
                f"{n} items is above this server's limit of {self.settings.max_reward_batch} per request; "
                "split the batch",
                param="items",
            )

    async def score(self, request: RewardRequest) -> RewardResponse:
        self._check_batch(len(request.items))
        names = request.reward_names()
        for name in names:
            self.registry.get(name)  # unknown names fail before any work starts
        items = [i.to_item() for i in request.items]
        results = await asyncio.gather(*(self._score(n, items, request.token_values, request.truncate) for n in names))
        if request.reward is None:
            return RewardResponse(
                scores_by_reward={n: [s.value for s in r] for n, r in zip(names, results, strict=False)}
            )
        scores = results[0]
        return RewardResponse(
            reward=request.reward,
            scores=[s.value for s in scores],
            truncated=[s.truncated for s in scores] if request.truncate else None,
            token_values=(
                [[TokenValue(token=t, value=v) for t, v in zip(s.tokens, s.token_values, strict=False)] for s in scores]
                if request.token_values
                else None
            ),
        )

    async def compare(self, request: CompareRequest) -> CompareResponse:
        messages = tuple(m.as_template_message() for m in request.messages) if request.messages else None
        items = [RewardItem(response=r, prompt=request.prompt, messages=messages) for r in request.responses]
        a, b = await self._score(request.reward, items, False, request.truncate)
        return CompareResponse(
            reward=request.reward, scores=[a.value, b.value], preference=bradley_terry(a.value, b.value)
        )
