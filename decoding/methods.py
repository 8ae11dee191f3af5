"""The decoding methods, as small classes over the engines' batched primitives.

Each method is an async generator of :class:`DecodeChunk` (tokens appended, with the step's record);
:mod:`alignd.decoding.service` turns chunks into text, stop strings and diagnostics.

    SFTDecoder              plain greedy / sampled decoding from the SFT model
    ValueGuidedDecoder      one token per decision from pi_sft * exp(Q / alpha) over the top-k:
                              TQ* (Q from baseline rollouts), CD (Q from SFT rollouts), ARGS (Q = partial reward)
    BlockwiseCDDecoder      K sampled blocks of M tokens from the SFT model, keep the best-valued block
    BestOfNDecoder          N whole answers from the SFT model, keep the best-rewarded one
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from alignd.decoding.rule import reweight
from alignd.decoding.values import Policy, Prompt, StepCost, ValueEstimator
from alignd.models.engine import GenerationParams
from alignd.rewards.base import Reward


@dataclass
class StepRecord:
    """One decision: the candidates the rule weighed and what it chose."""

    position: int
    chosen: list[int]
    kl: float = 0.0
    gated: bool = False
    candidates: list[dict] | None = None
    cost: StepCost = field(default_factory=StepCost)


@dataclass
class DecodeChunk:
    token_ids: list[int]
    step: StepRecord | None = None
    finish_reason: str | None = None


def kl_bound_best_of_n(n: int) -> float:
    """Selecting the best of n samples moves at most log n - (n-1)/n nats away from the sampler."""
    return math.log(n) - (n - 1) / n


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _sub_seed(seed: int | None, step: int) -> int | None:
    # Distinct, reproducible seeds for the rollouts of each step of a seeded request.
    return None if seed is None else (seed * 1_000_003 + step * 7919) % (2**31)


class Decoder(abc.ABC):
    def __init__(self, sft: Policy, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> None:
        self.sft = sft
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.eos = set(sft.engine.info.eos_token_ids)

    @abc.abstractmethod
    def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]: ...


class SFTDecoder(Decoder):
    """Plain decoding from the SFT model (the engine's own sampler), as one chunk per call."""

    async def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]:
        params = GenerationParams(max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
        async for delta in self.sft.engine.stream(list(prompt.token_ids), params, f"sft-{id(self)}"):
            yield DecodeChunk(delta.token_ids, finish_reason=delta.finish_reason)


class ValueGuidedDecoder(Decoder):
    """Token-wise value-guided decoding: TQ*, CD (token-wise) and ARGS differ only in the estimator.

    Options that trade quality for speed:
      ``block_size`` B: decide one token by value, then let the SFT model write the next B - 1 tokens;
      ``confidence_threshold`` c: when the SFT model's top-1 probability is at least c, skip the value
      estimate for that step (the rule with constant Q keeps the SFT choice).

    And one that changes nothing in the answer: ``prune`` (greedy only, rewards with known bounds
    [lo, hi]): a candidate whose SFT log-probability is more than (hi - lo) / alpha below the best one
    cannot win whatever the values, so it gets no rollouts; with one candidate left the step needs no
    value at all. Pruned candidates enter the step's distribution (and its KL) with Q = lo.
    """

    def __init__(
        self,
        sft: Policy,
        estimator: ValueEstimator,
        *,
        alpha: float = 1.0,
        top_k: int = 10,
        block_size: int = 1,
        confidence_threshold: float | None = None,
        prune: bool = False,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        record_candidates: bool = False,
    ) -> None:
        super().__init__(sft, max_tokens=max_tokens, temperature=temperature, seed=seed)
        self.estimator = estimator
        bounds = estimator.value_bounds()
        # Only exact in greedy mode: sampling gives every candidate a chance.
        self.prune_bounds = bounds if (prune and temperature == 0.0 and bounds is not None) else None
        self.alpha = alpha
        self.top_k = top_k
        self.block_size = block_size
        self.confidence_threshold = confidence_threshold
        self.record_candidates = record_candidates

    async def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]:
        sft_prefix = list(prompt.token_ids)
        policy = self.estimator.policy_for_prefix()
        policy_prefix = policy.prefix(prompt) if policy is not None else sft_prefix
        rng = _generator(self.seed)
        decode = self.sft.engine.decode
        generated: list[int] = []
        step = 0
        while len(generated) < self.max_tokens:
            top = (await self.sft.engine.top_k_next([sft_prefix + generated], self.top_k))[0]
            ids = [t.token_id for t in top]
            sft_lp = [t.logprob for t in top]
            gated = self.confidence_threshold is not None and math.exp(sft_lp[0]) >= self.confidence_threshold
            live = list(range(len(ids)))
            if self.prune_bounds is not None:
                lo, hi = self.prune_bounds
                live = [i for i in live if sft_lp[i] >= sft_lp[0] - (hi - lo) / self.alpha]
            if gated:
                values, cost = [0.0] * len(ids), StepCost()
            elif len(live) == 1 and self.prune_bounds is not None:
                values, cost = [self.prune_bounds[0]] * len(ids), StepCost(extra={"pruned": len(ids) - 1})
            else:
                live_values, cost = await self.estimator.estimate(
                    prompt, policy_prefix, generated, [ids[i] for i in live], _sub_seed(self.seed, step)
                )
                values = [self.prune_bounds[0]] * len(ids) if self.prune_bounds is not None else [0.0] * len(ids)
                for i, v in zip(live, live_values):
                    values[i] = v
                if len(live) < len(ids):
                    cost.extra["pruned"] = len(ids) - len(live)
            rule = reweight(ids, sft_lp, values, self.alpha)
            index = rule.greedy_index() if self.temperature == 0.0 else rule.sample_index(rng, self.temperature)
            chosen = [ids[index]]
            if chosen[0] not in self.eos and self.block_size > 1 and len(generated) + 1 < self.max_tokens:
                # The SFT model writes the rest of the block (greedy or sampled like the request).
                room = min(self.block_size - 1, self.max_tokens - len(generated) - 1)
                tail = await self.sft.engine.rollouts(
                    [sft_prefix + generated + chosen], n=1, max_tokens=room, temperature=self.temperature,
                    seed=_sub_seed(self.seed, step + 1_000_000),
                )
                chosen += tail[0][0].token_ids
            record = StepRecord(position=len(generated), chosen=chosen, kl=0.0 if gated else rule.kl_from_sft,
                                gated=gated, cost=cost)
            if self.record_candidates:
                record.candidates = [
                    {"token_id": z, "token": decode([z]), "sft_logprob": s, "value": v, "logprob": lp}
                    for z, s, v, lp in zip(ids, sft_lp, values, rule.logprobs)
                ]
            generated += chosen
            step += 1
            finish = None
            if chosen[-1] in self.eos:
                finish = "stop"
            elif len(generated) >= self.max_tokens:
                finish = "length"
            yield DecodeChunk(chosen, record, finish)
            if finish:
                return


class _RewardSelectionDecoder(Decoder):
    """Base of the methods that sample several continuations from the SFT model and select by reward."""

    def __init__(
        self, sft: Policy, reward: Reward, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
        record_candidates: bool = False,
    ) -> None:
        super().__init__(sft, max_tokens=max_tokens, temperature=temperature, seed=seed)
        self.reward = reward
        self.record_candidates = record_candidates

    async def _rewards(self, prompt: Prompt, generated: list[int], samples: Sequence[list[int]]) -> list[float]:
        decode = self.sft.engine.decode
        items = [prompt.reward_item(decode(generated + s)) for s in samples]
        return [s.value for s in await self.reward.score(items, truncate=True)]


class BlockwiseCDDecoder(_RewardSelectionDecoder):
    """CD block-wise: sample K blocks of M tokens from the SFT model, keep the block whose partial answer
    has the highest reward (greedy) or sample one with probability ∝ exp(r / alpha); repeat."""

    def __init__(
        self,
        sft: Policy,
        reward: Reward,
        *,
        num_blocks: int = 4,
        block_len: int = 8,
        alpha: float = 1.0,
        block_temperature: float = 1.0,
        **common,
    ) -> None:
        super().__init__(sft, reward, **common)
        self.num_blocks = num_blocks
        self.block_len = block_len
        self.alpha = alpha
        self.block_temperature = block_temperature

    async def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]:
        prefix = list(prompt.token_ids)
        rng = _generator(self.seed)
        decode = self.sft.engine.decode
        generated: list[int] = []
        step = 0
        while len(generated) < self.max_tokens:
            room = min(self.block_len, self.max_tokens - len(generated))
            blocks = (await self.sft.engine.rollouts(
                [prefix + generated], n=self.num_blocks, max_tokens=room, temperature=self.block_temperature,
                seed=_sub_seed(self.seed, step),
            ))[0]
            values = await self._rewards(prompt, generated, [b.token_ids for b in blocks])
            # Blocks are drawn from the SFT model, so each has (about) equal prior weight 1/K.
            rule = reweight(list(range(len(blocks))), [-math.log(len(blocks))] * len(blocks), values, self.alpha)
            index = int(max(range(len(values)), key=lambda i: values[i])) if self.temperature == 0.0 else rule.sample_index(rng)
            chosen = blocks[index].token_ids
            cost = StepCost(rollouts=len(blocks), rollout_tokens=sum(len(b.token_ids) for b in blocks),
                            reward_calls=len(blocks))
            record = StepRecord(position=len(generated), chosen=chosen, kl=kl_bound_best_of_n(len(blocks)), cost=cost)
            if self.record_candidates:
                record.candidates = [{"text": decode(b.token_ids), "token_ids": b.token_ids, "value": v}
                                     for b, v in zip(blocks, values)]
            generated += chosen
            step += 1
            finish = "stop" if chosen and chosen[-1] in self.eos else ("length" if len(generated) >= self.max_tokens else None)
            if not chosen:
                finish = "stop"
            yield DecodeChunk(chosen, record, finish)
            if finish:
                return


class BestOfNDecoder(_RewardSelectionDecoder):
    """N whole answers sampled from the SFT model; the one with the highest reward is returned."""

    def __init__(self, sft: Policy, reward: Reward, *, num_samples: int = 4, sample_temperature: float = 1.0, **common):
        super().__init__(sft, reward, **common)
        self.num_samples = num_samples
        self.sample_temperature = sample_temperature

    async def run(self, prompt: Prompt) -> AsyncIterator[DecodeChunk]:
        samples = (await self.sft.engine.rollouts(
            [list(prompt.token_ids)], n=self.num_samples, max_tokens=self.max_tokens,
            temperature=self.sample_temperature, seed=self.seed,
        ))[0]
        decode = self.sft.engine.decode
        values = await self._rewards(prompt, [], [s.token_ids for s in samples])
        best = max(range(len(values)), key=lambda i: values[i])
        n = len(samples)
        record = StepRecord(
            position=0, chosen=samples[best].token_ids, kl=kl_bound_best_of_n(n),
            cost=StepCost(rollouts=n, rollout_tokens=sum(len(s.token_ids) for s in samples), reward_calls=n),
        )
        if self.record_candidates:
            record.candidates = [{"text": decode(s.token_ids), "value": v} for s, v in zip(samples, values)]
        yield DecodeChunk(samples[best].token_ids, record, samples[best].finish_reason or "length")


__all__: Sequence[str] = [
    "BestOfNDecoder", "BlockwiseCDDecoder", "DecodeChunk", "Decoder", "SFTDecoder", "StepRecord", "ValueGuidedDecoder",
]
