"""Runs a request's decoding method and turns its chunks into engine-style stream deltas.

It owns what the methods share: the SFT and baseline policies, the reward registry, text assembly
(incremental detokenisation, stop strings), ``n`` concurrent choices, and the per-response
diagnostics (steps, target reward, KL from the SFT model, cost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from alignd.decoding.config import DecodingConfig
from alignd.decoding.methods import (
    BestOfNDecoder,
    BlockwiseCDDecoder,
    Decoder,
    SFTDecoder,
    ValueGuidedDecoder,
)
from alignd.decoding.values import PartialRewardValue, Policy, Prompt, RolloutValueEstimator
from alignd.models.engine import Engine, GenerationParams, StreamDelta, TextAssembler
from alignd.rewards.registry import RewardRegistry
from alignd.settings import Settings


class AlignedDecoding:
    def __init__(self, engine: Engine, rewards: RewardRegistry, settings: Settings, baseline_engine: Engine | None = None):
        self.engine = engine
        self.rewards = rewards
        self.settings = settings
        self.sft = Policy(engine, "sft")
        if baseline_engine is not None:
            self.baseline = Policy(baseline_engine, "baseline")
        else:
            # The prompted baseline shares the SFT engine (same weights, prefix cache, batches).
            self.baseline = Policy(engine, "prompted_baseline", system_prompt=settings.baseline_system_prompt)
        self._baseline_engine = baseline_engine
        # Per-step observers (metrics): called with (method, StepRecord, seconds).
        self.step_observers: list = []
        # Per-response observers (metrics): called with (method, target reward or None, KL from SFT)
        # for every finished choice, diagnostics or not.
        self.response_observers: list = []

    async def close(self) -> None:
        if self._baseline_engine is not None:
            await self._baseline_engine.shutdown()

    def resolve(self, config: DecodingConfig) -> DecodingConfig:
        resolved = config.resolved(self.settings)
        if resolved.method != "sft":
            self.rewards.get(resolved.reward)  # unknown names fail before any work
            if resolved.method == "transfer_q" and resolved.transfer == "indirect":
                self.rewards.get(resolved.baseline_reward)
        return resolved

    def build(self, config: DecodingConfig, params: GenerationParams, seed: int | None) -> Decoder:
        """A decoder for one choice. ``config`` must be resolved."""
        common = dict(max_tokens=params.max_tokens, temperature=params.temperature, seed=seed)
        record = config.diagnostics
        if config.method == "sft":
            return SFTDecoder(self.sft, **common)
        reward = self.rewards.get(config.reward)
        if config.method == "best_of_n":
            return BestOfNDecoder(self.sft, reward, num_samples=config.num_samples,
                                  sample_temperature=config.sample_temperature, record_candidates=record, **common)
        if config.method == "cd" and config.cd_mode == "block":
            return BlockwiseCDDecoder(self.sft, reward, num_blocks=config.num_blocks, block_len=config.block_len,
                                      alpha=config.alpha, block_temperature=config.sample_temperature,
                                      record_candidates=record, **common)
        if config.method == "args":
            estimator = PartialRewardValue(reward, self.engine.decode)
        else:
            indirect = config.method == "transfer_q" and config.transfer == "indirect"
            estimator = RolloutValueEstimator(
                self.baseline if config.method == "transfer_q" else self.sft,
                reward,
                num_rollouts=config.num_rollouts,
                rollout_len=config.rollout_len,
                temperature=config.rollout_temperature,
                baseline_reward=self.rewards.get(config.baseline_reward) if indirect else None,
                beta=config.beta,
            )
        return ValueGuidedDecoder(self.sft, estimator, alpha=config.alpha, top_k=config.top_k,
                                  block_size=config.block_size, confidence_threshold=config.confidence_threshold,
                                  prune=bool(config.prune), record_candidates=record, **common)

    async def _one_choice(
        self, index: int, prompt: Prompt, params: GenerationParams, config: DecodingConfig
    ) -> AsyncIterator[StreamDelta]:
        seed = None if params.seed is None else params.seed + index
        decoder = self.build(config, params, seed)
        tokens: list[int] = []
        pending: list[int] = []  # tokens not yet sent (held back by an incomplete character)
        text = TextAssembler(self.engine.decode, params.stop)
        piece = ""
        steps = []
        kl = 0.0
        finish = None
        chunks = decoder.run(prompt)
        try:
            while finish is None:
                started = time.perf_counter()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                if chunk.step is not None:
                    kl += chunk.step.kl
                    steps.append(chunk.step)
                    for observer in self.step_observers:
                        observer(config.method, chunk.step, time.perf_counter() - started)
                tokens += chunk.token_ids
                pending += chunk.token_ids
                new = text.advance(tokens, final=chunk.finish_reason is not None)
                finish = "stop" if text.stopped else chunk.finish_reason
                if new is None:
                    continue  # an incomplete UTF-8 character: wait for the next bytes
                piece += new
                if finish is None:
                    yield StreamDelta(index, pending, piece, None, prompt_token_count=len(prompt.token_ids))
                    pending, piece = [], ""
        finally:
            await chunks.aclose()  # a stop string or a gone client ends the method's engine work now
        reward = None
        if config.diagnostics or (self.response_observers and self.settings.score_responses):
            reward = await self._target_reward(prompt, config, text.text)
        for observer in self.response_observers:
            observer(config.method, reward, kl)
        alignment = self._summary(config, reward, steps, kl) if config.diagnostics else None
        yield StreamDelta(index, pending, piece, finish or "length", prompt_token_count=len(prompt.token_ids),
                          alignment=alignment)

    async def _target_reward(self, prompt: Prompt, config: DecodingConfig, text: str) -> float:
        reward_name = config.reward or self.settings.target_reward
        return (await self.rewards.get(reward_name).score([prompt.reward_item(text)], truncate=True))[0].value

    def _summary(self, config: DecodingConfig, reward: float, steps: list, kl: float) -> dict:
        return {
            "method": config.method,
            "reward_name": config.reward or self.settings.target_reward,
            "reward": reward,
            "kl": kl,
            "cost": {
                "decisions": len(steps),
                "gated": sum(1 for s in steps if s.gated),
                "rollouts": sum(s.cost.rollouts for s in steps),
                "rollout_tokens": sum(s.cost.rollout_tokens for s in steps),
                "reward_calls": sum(s.cost.reward_calls for s in steps),
            },
            "steps": [
                {"position": s.position, "chosen": s.chosen, "chosen_text": self.engine.decode(s.chosen), "kl": s.kl,
                 "gated": s.gated, "candidates": s.candidates, "cost": asdict(s.cost)}
                for s in steps
            ],
        }

    async def stream(
        self, prompt: Prompt, params: GenerationParams, config: DecodingConfig, request_id: str
    ) -> AsyncIterator[StreamDelta]:
        """Deltas of all ``params.n`` choices, decoded concurrently (their engine calls batch together)."""
        if params.n == 1:
            async for delta in self._one_choice(0, prompt, params, config):
                yield delta
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for delta in self._one_choice(i, prompt, params, config):
                    await queue.put(delta)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(params.n)]
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
