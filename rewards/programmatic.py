"""Rewards computed by plain Python: positivity (VADER), a length penalty, a deployment's callable."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Sequence

from alignd.errors import ConfigurationError, RewardFailedError
from alignd.rewards.base import Reward, RewardItem, RewardScore


class PositivityReward(Reward):
    """VADER's compound sentiment of the response, in [-1, 1]; works offline (a lexicon)."""

    kind = "positivity"
    description = "VADER compound sentiment of the response, -1 (hostile) to +1 (warm)"
    bounds = (-1.0, 1.0)

    def __init__(self, name: str = "positivity") -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name = name
        self._analyzer = SentimentIntensityAnalyzer()

    async def score(self, items, *, token_values=False, truncate=False):
        return [RewardScore(float(self._analyzer.polarity_scores(item.response)["compound"])) for item in items]


class LengthPenaltyReward(Reward):
    """``-per_word * max(0, words - free_words)``: zero up to a budget, then linear in the excess."""

    kind = "length_penalty"

    def __init__(self, name: str = "length_penalty", per_word: float = 0.01, free_words: int = 0) -> None:
        if per_word < 0 or free_words < 0:
            raise ConfigurationError(
                f"length penalty needs per_word >= 0 and free_words >= 0, got {per_word}, {free_words}"
            )
        self.name = name
        self.per_word = per_word
        self.free_words = free_words
        self.description = f"-{per_word} per word beyond {free_words} words"

    async def score(self, items, *, token_values=False, truncate=False):
        return [RewardScore(-self.per_word * max(0, len(item.response.split()) - self.free_words)) for item in items]


def import_callable(path: str) -> Callable:
    """``package.module:function`` -> the function."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"custom reward callable '{path}' must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot import custom reward callable '{path}': {exc}") from exc
    if not callable(obj):
        raise ConfigurationError(f"custom reward '{path}' is not callable")
    return obj


class CallableReward(Reward):
    """A deployment's own reward: ``fn(prompt: str, response: str) -> float`` (sync or async), or with
    ``batched=True``, ``fn(prompts: list[str], responses: list[str]) -> list[float]``."""

    kind = "callable"

    def __init__(self, name: str, path: str, batched: bool = False) -> None:
        self.name = name
        self.path = path
        self.batched = batched
        self._fn = import_callable(path)
        self.description = f"custom callable {path}"

    async def _call(self, *args):
        if inspect.iscoroutinefunction(self._fn):
            return await self._fn(*args)
        return await asyncio.to_thread(self._fn, *args)

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        try:
            if self.batched:
                values = list(await self._call([i.prompt_text() for i in items], [i.response for i in items]))
                if len(values) != len(items):
                    raise ValueError(f"returned {len(values)} scores for {len(items)} items")
            else:
                values = [await self._call(i.prompt_text(), i.response) for i in items]
            return [RewardScore(float(v)) for v in values]
        except Exception as exc:  # noqa: BLE001 - a user's callable may raise anything
            raise RewardFailedError(
                f"reward '{self.name}' ({self.path}) failed: {type(exc).__name__}: {exc}", param="reward"
            ) from exc


class WeightedSumReward(Reward):
    """``sum_i w_i * r_i`` over other configured rewards."""

    kind = "weighted_sum"

    def __init__(self, name: str, terms: Sequence[tuple[float, Reward]]) -> None:
        if not terms:
            raise ConfigurationError(f"weighted reward '{name}' has no terms")
        self.name = name
        self.terms = list(terms)
        self.description = " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)
        if all(r.bounds is not None for _, r in self.terms):
            ends = [sorted((w * r.bounds[0], w * r.bounds[1])) for w, r in self.terms]
            self.bounds = (sum(e[0] for e in ends), sum(e[1] for e in ends))

    async def score(self, items, *, token_values=False, truncate=False):
        parts = await asyncio.gather(*(r.score(items, truncate=truncate) for _, r in self.terms))
        out = []
        for i in range(len(items)):
            value = sum(w * part[i].value for (w, _), part in zip(self.terms, parts, strict=False))
            out.append(RewardScore(value, truncated=any(part[i].truncated for part in parts)))
        return out
