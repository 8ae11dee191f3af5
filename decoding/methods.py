"""The decoding methods, as small classes over the engines' batched primitives.

Each method is an async generator of :class:`DecodeChunk` (tokens appended, with the step's record, a
typed diagnostics step of :mod:`alignd.protocol.diagnostics`); :mod:`alignd.decoding.generation` turns
chunks into text, stop strings and diagnostics.

Every method gets the request's engine parameters (one choice's: ``n`` = 1 and its own seed) and
honours them: ``temperature`` and ``seed`` everywhere; ``top_p`` limits the value-guided candidates
and the sampled blocks and answers; presence and frequency penalties lower the value-guided
candidates' scores (counted over the answer so far) and apply to Best-of-N's whole answers.
``max_tokens`` bounds the answer; stop strings are applied to the assembled text.

    SFTDecoder              plain greedy / sampled decoding from the SFT model (the engine's sampler)
    HeadTransferQDecoder    TQ* with Q from the engine's learned value head, inside vLLM's decode step
    ValueGuidedDecoder      one token per decision from pi_sft * exp(Q / alpha) over the top-k:
                              TQ* (Q from baseline rollouts), CD (Q from SFT rollouts), ARGS (Q = partial reward)
    BlockwiseCDDecoder      K sampled blocks of M tokens from the SFT model, keep the best-valued block
    BestOfNDecoder          N whole answers from the SFT model, keep the best-rewarded one
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import torch

from alignd.decoding.prompt import Policy, Prompt
from alignd.decoding.rule import nucleus, repetition_penalties, reweight
from alignd.decoding.values import ValueEstimator
from alignd.models.engine import FinishReason, GenerationParams, ValueGuidance
from alignd.protocol.diagnostics import (
    BaselineStep,
    BestOfNStep,
    BlockCandidate,
    BlockStep,
    SampleCandidate,
    StepCost,
    TokenCandidate,
    ValueGuidedStep,
)
from alignd.rewards.base import Reward

StepRecord = ValueGuidedStep | BlockStep | BestOfNStep | BaselineStep
# candidates a step's diagnostics list when every token of the vocabulary is one (top_k 0)
RECORDED_WHOLE_VOCABULARY = 20


@dataclass
class DecodeChunk:
    token_ids: list[int]
    step: StepRecord | None = None
    finish_reason: FinishReason | None = None


def kl_bound_best_of_n(n: int) -> float:
    """Selecting the best of n samples moves at most log n - (n-1)/n nats away from the sampler."""
    return math.log(n) - (n - 1) / n


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _sub_seed(seed: int | None, step: int) -> int | None:
    # Distinct, reproducible seeds for the rollouts of each step of a seeded request.
    return None if seed is None else (seed * 1_000_003 + step * 7919) % (2**31)


class Decoder(abc.ABC):
    """A method that decodes one choice. ``params`` are the request's engine parameters for this
    choice (``n`` = 1, the choice's own seed)."""

    def __init__(self, sft: Policy, params: GenerationParams) -> None:
        self.sft = sft
        self.params = params
        self.max_tokens = params.max_tokens
        self.temperature = params.temperature
        self.seed = params.seed
        self.eos = set(sft.engine.info.eos_token_ids)

    @abc.abstractmethod
    def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]: ...


class SFTDecoder(Decoder):
    """Plain decoding from the SFT model (the engine's own sampler) with the request's full sampling
    parameters; chunks as the engine streams them. Stop strings are the caller's (on the text)."""

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        params = self.params if not self.params.stop else dataclasses.replace(self.params, stop=())
        async for delta in self.sft.engine.stream(list(prompt.token_ids), params, f"sft-{id(self)}"):
            yield DecodeChunk(delta.token_ids, finish_reason=delta.finish_reason)


class BaselineDecoder(Decoder):
    """The baseline's own answer (with its prompt, e.g. a prompted baseline's system prompt), sampled by
    the engine with the request's full sampling parameters: the reference TQ* is compared with. With
    diagnostics, one step whose KL is the answer's log-ratio against the SFT model."""

    def __init__(self, sft: Policy, baseline: Policy, params: GenerationParams, *, record_candidates: bool = False):
        super().__init__(sft, params)
        self.baseline = baseline
        self.record = record_candidates

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        params = self.params if not self.params.stop else dataclasses.replace(self.params, stop=())
        prefix = self.baseline.prefix(prompt)
        tokens: list[int] = []
        async for delta in self.baseline.engine.stream(prefix, params, f"baseline-{id(self)}"):
            tokens += delta.token_ids
            if delta.finish_reason is None or not self.record:
                yield DecodeChunk(delta.token_ids, finish_reason=delta.finish_reason)
                continue
            baseline_lp, sft_lp = await asyncio.gather(
                self.baseline.engine.continuation_logprobs([prefix], [tokens]),
                self.sft.engine.continuation_logprobs([list(prompt.token_ids)], [tokens]),
            )
            step = BaselineStep(
                position=0,
                chosen=tokens,
                chosen_text=self.sft.engine.decode(tokens),
                kl=sum(baseline_lp[0]) - sum(sft_lp[0]),
                baseline=self.baseline.name,
            )
            yield DecodeChunk(delta.token_ids, step, delta.finish_reason)


class ValueGuidedDecoder(Decoder):
    """Token-wise value-guided decoding: TQ*, CD (token-wise) and ARGS differ only in the estimator.

    Options that trade quality for speed:
      ``block_size`` B: decide one token by value, then let the SFT model write the next B - 1 tokens;
      ``confidence_threshold`` c: when the SFT model's top-1 probability is at least c, skip the value
      estimate for that step (the rule with constant Q keeps the SFT choice).

    And one that changes nothing in the answer: ``prune`` (greedy only, rewards with known bounds
    [lo, hi]): a candidate whose penalised SFT log-probability is more than (hi - lo) / alpha below the
    best one cannot win whatever the values, so it gets no rollouts; with one candidate left the step
    needs no value at all. Pruned candidates enter the step's distribution (and its KL) with Q = lo.

    The request's sampling fields: ``top_p`` keeps the smallest prefix of the top-k candidates whose
    SFT probability reaches it; presence and frequency penalties (counted over the answer so far) are
    subtracted from the candidates' SFT log-probabilities before the rule, as vLLM subtracts them from
    logits; the candidate set is still the SFT model's own top-k. The rollouts of the value estimate
    are not penalised: they estimate the value of the rollout policy as it is.
    """

    def __init__(
        self,
        sft: Policy,
        estimator: ValueEstimator,
        params: GenerationParams,
        *,
        alpha: float = 1.0,
        top_k: int = 10,
        block_size: int = 1,
        confidence_threshold: float | None = None,
        prune: bool = False,
        record_candidates: bool = False,
    ) -> None:
        super().__init__(sft, params)
        temperature = params.temperature
        self.estimator = estimator
        bounds = estimator.value_bounds()
        # Only exact in greedy mode: sampling gives every candidate a chance.
        self.prune_bounds = bounds if (prune and temperature == 0.0 and bounds is not None) else None
        self.alpha = alpha
        self.top_k = top_k
        self.block_size = block_size
        self.confidence_threshold = confidence_threshold
        self.record_candidates = record_candidates

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        sft_prefix = list(prompt.token_ids)
        policy = self.estimator.policy_for_prefix()
        policy_prefix = policy.prefix(prompt) if policy is not None else sft_prefix
        rng = _generator(self.seed)
        decode = self.sft.engine.decode
        generated: list[int] = []
        step = 0
        # top_k 0: every token of the vocabulary is a candidate (the implicit source's exact rule)
        top_k = self.top_k or self.sft.engine.info.vocab_size
        while len(generated) < self.max_tokens:
            top = (await self.sft.engine.top_k_next([sft_prefix + generated], top_k))[0]
            top = top[: nucleus([t.logprob for t in top], self.params.top_p)]
            ids = [t.token_id for t in top]
            sft_lp = [t.logprob for t in top]
            penalties = repetition_penalties(
                ids, generated, self.params.presence_penalty, self.params.frequency_penalty
            )
            scores = sft_lp if penalties is None else [s - p for s, p in zip(sft_lp, penalties, strict=False)]
            gated = self.confidence_threshold is not None and math.exp(sft_lp[0]) >= self.confidence_threshold
            live = list(range(len(ids)))
            if self.prune_bounds is not None:
                lo, hi = self.prune_bounds
                live = [i for i in live if scores[i] >= max(scores) - (hi - lo) / self.alpha]
            if gated:
                values, cost = [0.0] * len(ids), StepCost()
            elif len(live) == 1 and self.prune_bounds is not None:
                values, cost = [self.prune_bounds[0]] * len(ids), StepCost(pruned=len(ids) - 1)
            else:
                live_values, cost = await self.estimator.estimate(
                    prompt,
                    policy_prefix,
                    generated,
                    [ids[i] for i in live],
                    _sub_seed(self.seed, step),
                    sft_logprobs=[sft_lp[i] for i in live],
                )
                values = [self.prune_bounds[0]] * len(ids) if self.prune_bounds is not None else [0.0] * len(ids)
                for i, v in zip(live, live_values, strict=False):
                    values[i] = v
                if len(live) < len(ids):
                    cost.pruned = len(ids) - len(live)
            rule = reweight(ids, sft_lp, values, self.alpha, penalties)
            index = rule.greedy_index() if self.temperature == 0.0 else rule.sample_index(rng, self.temperature)
            chosen = [ids[index]]
            if chosen[0] not in self.eos and self.block_size > 1 and len(generated) + 1 < self.max_tokens:
                # The SFT model writes the rest of the block (greedy or sampled like the request).
                room = min(self.block_size - 1, self.max_tokens - len(generated) - 1)
                tail = await self.sft.engine.rollouts(
                    [sft_prefix + generated + chosen],
                    n=1,
                    max_tokens=room,
                    temperature=self.temperature,
                    seed=_sub_seed(self.seed, step + 1_000_000),
                    top_p=self.params.top_p,
                )
                chosen += tail[0][0].token_ids
            record = ValueGuidedStep(
                position=len(generated),
                chosen=chosen,
                chosen_text=decode(chosen),
                kl=0.0 if gated else rule.kl_from_sft,
                gated=gated,
                cost=cost,
            )
            if self.record_candidates:
                record.candidates = self._recorded(ids, sft_lp, values, penalties, rule.logprobs)
            generated += chosen
            step += 1
            finish: FinishReason | None = None
            if chosen[-1] in self.eos:
                finish = "stop"
            elif len(generated) >= self.max_tokens:
                finish = "length"
            yield DecodeChunk(chosen, record, finish)
            if finish:
                return

    def _recorded(
        self,
        ids: list[int],
        sft_lp: list[float],
        values: list[float],
        penalties: list[float] | None,
        logprobs: list[float],
    ) -> list[TokenCandidate]:
        """The step's candidates for the diagnostics: all of them, or over the whole vocabulary (top_k 0) the
        most probable ones of the re-weighted distribution."""
        baseline_lp: Sequence[float | None] = self.estimator.baseline_logprobs(sft_lp, values) or [None] * len(ids)
        penalties = penalties or [0.0] * len(ids)
        order: Sequence[int] = range(len(ids))
        if self.top_k == 0:
            order = sorted(order, key=lambda i: -logprobs[i])[:RECORDED_WHOLE_VOCABULARY]
        decode = self.sft.engine.decode
        return [
            TokenCandidate(
                token_id=ids[i],
                token=decode([ids[i]]),
                sft_logprob=sft_lp[i],
                value=values[i],
                penalty=penalties[i],
                logprob=logprobs[i],
                baseline_logprob=baseline_lp[i],
            )
            for i in order
        ]


class HeadTransferQDecoder(Decoder):
    """TQ* with Q from the engine's learned value head (``decoding.value='head'``): one engine request
    for the whole answer; inside vLLM's decode step, alignd's logits processor adds Q(s, z) / alpha to
    the SFT model's top-k logits (the rule of :func:`alignd.decoding.rule.transfer_q_logits`) and vLLM's
    sampler applies the request's penalties, temperature, top_p and seed after it.

    With diagnostics each token is a step whose candidates are the SFT model's top-k with their own
    log-probabilities (vLLM returns the logits as the model computed them, before any processor); the
    head's values and the re-weighted distribution stay inside the engine, so ``value``, ``logprob`` and
    ``kl`` are null."""

    def __init__(
        self,
        sft: Policy,
        params: GenerationParams,
        *,
        alpha: float,
        top_k: int,
        record_candidates: bool = False,
        value: str = "head",
    ) -> None:
        """``value``: "head", or "implicit" (Q from the engine's baseline stack, alignd.models.baseline_stack)."""
        super().__init__(sft, params)
        self.record_candidates = record_candidates
        self.engine_params = dataclasses.replace(
            params,
            stop=(),
            value_guidance=ValueGuidance(alpha=alpha, top_k=top_k, value=value),
            logprobs=top_k if record_candidates else None,
        )

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        decode = self.sft.engine.decode
        position = 0
        async for delta in self.sft.engine.stream(list(prompt.token_ids), self.engine_params, f"tq-head-{id(self)}"):
            if not self.record_candidates:
                yield DecodeChunk(delta.token_ids, finish_reason=delta.finish_reason)
                continue
            tokens = list(delta.token_ids)
            for i, (token, logprobs) in enumerate(zip(tokens, delta.logprobs or [], strict=False)):
                record = ValueGuidedStep(position=position, chosen=[token], chosen_text=decode([token]), kl=None)
                record.candidates = [
                    TokenCandidate(
                        token_id=t.token_id, token=decode([t.token_id]), sft_logprob=t.logprob, value=None, logprob=None
                    )
                    for t in logprobs.top
                ]
                position += 1
                last = i == len(tokens) - 1
                yield DecodeChunk([token], record, delta.finish_reason if last else None)


class _RewardSelectionDecoder(Decoder):
    """Base of the methods that sample several continuations from the SFT model and select by reward."""

    def __init__(
        self, sft: Policy, reward: Reward, params: GenerationParams, *, record_candidates: bool = False
    ) -> None:
        super().__init__(sft, params)
        self.reward = reward
        self.record_candidates = record_candidates

    async def _rewards(self, prompt: Prompt, generated: list[int], samples: Sequence[list[int]]) -> list[float]:
        decode = self.sft.engine.decode
        items = [prompt.reward_item(decode(generated + s)) for s in samples]
        return [s.value for s in await self.reward.score(items, truncate=True)]


class BlockwiseCDDecoder(_RewardSelectionDecoder):
    """CD block-wise: sample K blocks of M tokens from the SFT model, keep the block whose partial answer
    has the highest reward (greedy) or sample one with probability ∝ exp(r / alpha); repeat.

    Blocks are sampled with the request's ``top_p``. Presence and frequency penalties are refused
    before decoding starts (:meth:`alignd.decoding.generation.Generation.plan`): a block is a fresh
    engine request, whose penalties would count the block's own tokens only, not the answer's."""

    def __init__(
        self,
        sft: Policy,
        reward: Reward,
        params: GenerationParams,
        *,
        num_blocks: int = 4,
        block_len: int = 8,
        alpha: float = 1.0,
        block_temperature: float = 1.0,
        record_candidates: bool = False,
    ) -> None:
        super().__init__(sft, reward, params, record_candidates=record_candidates)
        self.num_blocks = num_blocks
        self.block_len = block_len
        self.alpha = alpha
        self.block_temperature = block_temperature

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        prefix = list(prompt.token_ids)
        rng = _generator(self.seed)
        decode = self.sft.engine.decode
        generated: list[int] = []
        step = 0
        while len(generated) < self.max_tokens:
            room = min(self.block_len, self.max_tokens - len(generated))
            blocks = (
                await self.sft.engine.rollouts(
                    [prefix + generated],
                    n=self.num_blocks,
                    max_tokens=room,
                    temperature=self.block_temperature,
                    seed=_sub_seed(self.seed, step),
                    top_p=self.params.top_p,
                )
            )[0]
            values = await self._rewards(prompt, generated, [b.token_ids for b in blocks])
            # Blocks are drawn from the SFT model, so each has (about) equal prior weight 1/K.
            rule = reweight(list(range(len(blocks))), [-math.log(len(blocks))] * len(blocks), values, self.alpha)
            index = (
                int(max(range(len(values)), key=lambda i: values[i]))
                if self.temperature == 0.0
                else rule.sample_index(rng)
            )
            chosen = blocks[index].token_ids
            cost = StepCost(
                rollouts=len(blocks), rollout_tokens=sum(len(b.token_ids) for b in blocks), reward_calls=len(blocks)
            )
            record = BlockStep(
                position=len(generated),
                chosen=chosen,
                chosen_text=decode(chosen),
                kl=kl_bound_best_of_n(len(blocks)),
                cost=cost,
            )
            if self.record_candidates:
                record.candidates = [
                    BlockCandidate(text=decode(b.token_ids), token_ids=b.token_ids, value=v)
                    for b, v in zip(blocks, values, strict=False)
                ]
            generated += chosen
            step += 1
            finish: FinishReason | None = (
                "stop"
                if chosen and chosen[-1] in self.eos
                else ("length" if len(generated) >= self.max_tokens else None)
            )
            if not chosen:
                finish = "stop"
            yield DecodeChunk(chosen, record, finish)
            if finish:
                return


class BestOfNDecoder(_RewardSelectionDecoder):
    """N whole answers sampled from the SFT model; the one with the highest reward is returned. The
    answers follow the request's ``top_p`` and penalties (each answer is one engine request, so vLLM
    counts the penalties over the whole answer, exactly)."""

    def __init__(
        self,
        sft: Policy,
        reward: Reward,
        params: GenerationParams,
        *,
        num_samples: int = 4,
        sample_temperature: float = 1.0,
        record_candidates: bool = False,
    ):
        super().__init__(sft, reward, params, record_candidates=record_candidates)
        self.num_samples = num_samples
        self.sample_temperature = sample_temperature

    async def run(self, prompt: Prompt) -> AsyncGenerator[DecodeChunk, None]:
        samples = (
            await self.sft.engine.rollouts(
                [list(prompt.token_ids)],
                n=self.num_samples,
                max_tokens=self.max_tokens,
                temperature=self.sample_temperature,
                seed=self.seed,
                top_p=self.params.top_p,
                presence_penalty=self.params.presence_penalty,
                frequency_penalty=self.params.frequency_penalty,
            )
        )[0]
        decode = self.sft.engine.decode
        values = await self._rewards(prompt, [], [s.token_ids for s in samples])
        best = max(range(len(values)), key=lambda i: values[i])
        n = len(samples)
        record = BestOfNStep(
            position=0,
            chosen=samples[best].token_ids,
            chosen_text=decode(samples[best].token_ids),
            kl=kl_bound_best_of_n(n),
            cost=StepCost(rollouts=n, rollout_tokens=sum(len(s.token_ids) for s in samples), reward_calls=n),
        )
        if self.record_candidates:
            record.candidates = [
                SampleCandidate(text=decode(s.token_ids), value=v) for s, v in zip(samples, values, strict=False)
            ]
        yield DecodeChunk(samples[best].token_ids, record, samples[best].finish_reason or "length")


__all__: Sequence[str] = [
    "BaselineDecoder",
    "BestOfNDecoder",
    "BlockwiseCDDecoder",
    "DecodeChunk",
    "Decoder",
    "HeadTransferQDecoder",
    "SFTDecoder",
    "StepRecord",
    "ValueGuidedDecoder",
    "kl_bound_best_of_n",
]
