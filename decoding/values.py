"""Value estimators: Q(s, z) for the candidate tokens z of one decoding step.

Every estimator hands the whole step to the engine at once: all candidates' rollouts in one batched
``rollouts`` call, all rewards in one batched ``score`` call.
"""

from __future__ import annotations

import abc
import asyncio
import math
from collections.abc import Callable, Sequence

from alignd.decoding.prompt import Policy, Prompt
from alignd.protocol.diagnostics import StepCost
from alignd.rewards.base import Reward


class ValueEstimator(abc.ABC):
    @abc.abstractmethod
    async def estimate(
        self,
        prompt: Prompt,
        policy_prefix: list[int],
        generated: list[int],
        candidates: Sequence[int],
        seed: int | None,
        *,
        sft_logprobs: Sequence[float] | None = None,
    ) -> tuple[list[float], StepCost]:
        """Q for each candidate token appended to ``generated``. ``sft_logprobs``: the SFT model's own
        log-probabilities of the candidates, where the caller has them (estimators that need them)."""

    def policy_for_prefix(self) -> Policy | None:
        return None

    def baseline_logprobs(self, sft_logprobs: Sequence[float], values: Sequence[float]) -> list[float] | None:
        """The baseline's log-probabilities of the candidates, where the values come from them (diagnostics)."""
        return None

    def value_bounds(self) -> tuple[float, float] | None:
        """Range every estimate lies in (None if unknown)."""
        return None


class RolloutValueEstimator(ValueEstimator):
    """Q(s, z) from rollouts of a policy, scored by the target reward.

    Direct transfer (policy aligned to the target reward):   Q = mean_i r_i.
    Indirect transfer (policy aligned to another reward r_BL, with KL coefficient beta):
        Q = sum_i w_i r_i / sum_i w_i,  w_i = exp((r_i - r_BL_i) / beta)   (self-normalised).
    With the SFT model as the policy this is CD's Q^{pi_sft}.
    """

    def __init__(
        self,
        policy: Policy,
        reward: Reward,
        *,
        num_rollouts: int = 1,
        rollout_len: int = 20,
        temperature: float = 0.0,
        baseline_reward: Reward | None = None,
        beta: float = 1.0,
    ) -> None:
        if num_rollouts < 1 or rollout_len < 0:
            raise ValueError("num_rollouts must be >= 1 and rollout_len >= 0")
        if baseline_reward is not None and beta <= 0:
            raise ValueError(f"beta must be > 0 for indirect transfer, got {beta}")
        self.policy = policy
        self.reward = reward
        self.num_rollouts = num_rollouts
        self.rollout_len = rollout_len
        self.temperature = temperature
        self.baseline_reward = baseline_reward
        self.beta = beta

    def policy_for_prefix(self) -> Policy:
        return self.policy

    def value_bounds(self) -> tuple[float, float] | None:
        # a plain or importance-weighted average of rewards stays within the reward's range
        return self.reward.bounds

    async def estimate(
        self,
        prompt: Prompt,
        policy_prefix: list[int],
        generated: list[int],
        candidates: Sequence[int],
        seed: int | None,
        *,
        sft_logprobs: Sequence[float] | None = None,
    ) -> tuple[list[float], StepCost]:
        eos = set(self.policy.engine.info.eos_token_ids)
        # A candidate that ends the answer has nothing to roll out: its value is the finished answer's reward.
        open_idx = [i for i, z in enumerate(candidates) if z not in eos and self.rollout_len > 0]
        rollouts = await self.policy.engine.rollouts(
            [policy_prefix + generated + [candidates[i]] for i in open_idx],
            n=self.num_rollouts,
            max_tokens=self.rollout_len,
            temperature=self.temperature,
            seed=seed,
        )
        by_candidate: dict[int, list[list[int]]] = {
            i: [r.token_ids for r in group] for i, group in zip(open_idx, rollouts, strict=False)
        }
        texts: list[str] = []
        owners: list[int] = []
        decode = self.policy.engine.decode
        for i, z in enumerate(candidates):
            for tail in by_candidate.get(i, [[]]):
                texts.append(decode(generated + [z] + tail))
                owners.append(i)
        items = [prompt.reward_item(t) for t in texts]
        rewards = [s.value for s in await self.reward.score(items, truncate=True)]
        cost = StepCost(
            rollouts=sum(len(g) for g in rollouts),
            rollout_tokens=sum(len(r.token_ids) for g in rollouts for r in g),
            reward_calls=len(items),
        )
        if self.baseline_reward is not None:
            base = [s.value for s in await self.baseline_reward.score(items, truncate=True)]
            cost.reward_calls += len(items)
        values = []
        for i in range(len(candidates)):
            idx = [j for j, o in enumerate(owners) if o == i]
            r = [rewards[j] for j in idx]
            if self.baseline_reward is None:
                values.append(sum(r) / len(r))
            else:
                logw = [(rewards[j] - base[j]) / self.beta for j in idx]
                top = max(logw)
                w = [math.exp(x - top) for x in logw]  # shifted for stability; the ratio is unchanged
                values.append(sum(wi * ri for wi, ri in zip(w, r, strict=False)) / sum(w))
        return values, cost


class PartialRewardValue(ValueEstimator):
    """ARGS: the reward of the partial answer with the candidate appended; no rollout."""

    def __init__(self, reward: Reward, decode: Callable[[list[int]], str]) -> None:
        self.reward = reward
        self.decode = decode

    def value_bounds(self) -> tuple[float, float] | None:
        return self.reward.bounds

    async def estimate(
        self,
        prompt: Prompt,
        policy_prefix: list[int],
        generated: list[int],
        candidates: Sequence[int],
        seed: int | None,
        *,
        sft_logprobs: Sequence[float] | None = None,
    ) -> tuple[list[float], StepCost]:
        items = [prompt.reward_item(self.decode(generated + [z])) for z in candidates]
        scores = await self.reward.score(items, truncate=True)
        return [s.value for s in scores], StepCost(reward_calls=len(items))


class FunctionValue(ValueEstimator):
    """Q given by a function of (generated tokens, candidate): exact values in tests, or a learned
    value model plugged in by a deployment."""

    def __init__(self, fn: Callable[[list[int], int], float]) -> None:
        self.fn = fn

    async def estimate(
        self,
        prompt: Prompt,
        policy_prefix: list[int],
        generated: list[int],
        candidates: Sequence[int],
        seed: int | None,
        *,
        sft_logprobs: Sequence[float] | None = None,
    ) -> tuple[list[float], StepCost]:
        return [float(self.fn(list(generated), z)) for z in candidates], StepCost()


class ImplicitValue(ValueEstimator):
    """The exact token-level Q of a policy trained by DPO (or IRFT) from the SFT model with coefficient beta:
    ``Q(s, z) - V(s) = beta * (log pi_BL(z|s) - log pi_SFT(z|s))`` (Rafailov et al. 2024, "From r to Q*");
    V(s) is the same for every candidate, so it cancels in the TQ* rule, which becomes
    ``pi_SFT^(1 - beta/alpha) pi_BL^(beta/alpha)`` over the candidates (alpha = beta: the baseline itself).
    One scoring request to each model a step (none to the SFT model where the caller has its log-probabilities);
    no rollout, no reward call."""

    def __init__(self, baseline: Policy, sft: Policy, beta: float) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.baseline = baseline
        self.sft = sft
        self.beta = beta

    def policy_for_prefix(self) -> Policy:
        return self.baseline

    async def estimate(
        self,
        prompt: Prompt,
        policy_prefix: list[int],
        generated: list[int],
        candidates: Sequence[int],
        seed: int | None,
        *,
        sft_logprobs: Sequence[float] | None = None,
    ) -> tuple[list[float], StepCost]:
        wanted = [list(candidates)]
        baseline = self.baseline.engine.next_token_logprobs([policy_prefix + generated], wanted)
        if sft_logprobs is None:
            sft_rows = await asyncio.gather(
                baseline, self.sft.engine.next_token_logprobs([list(prompt.token_ids) + generated], wanted)
            )
            (baseline_lp,), (sft_lp,) = sft_rows
        else:
            (baseline_lp,), sft_lp = await baseline, list(sft_logprobs)
        return [self.beta * (b - s) for b, s in zip(baseline_lp, sft_lp, strict=False)], StepCost()

    def baseline_logprobs(self, sft_logprobs: Sequence[float], values: Sequence[float]) -> list[float]:
        return [s + v / self.beta for s, v in zip(sft_logprobs, values, strict=False)]
