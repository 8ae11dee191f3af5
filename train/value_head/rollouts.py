"""Rollout targets: states cut from the SFT model's sampled answers, and ``Q^BL(s, z)`` of its top-k
candidates from the rollout estimator transfer_q decoding builds; the one module of alignd.train that uses
the decoding package (pyproject.toml's layering contract allows it).

**Why these targets.** TQ* decodes over the SFT model's top-k, so the head must rank those candidates at
the states decoding visits. The states come from the SFT model's own samples (the states rollout-free
decoding starts from and stays near at large alpha), the candidates are its top-k, and the values come
from the baseline's rollouts scored by the target reward: the estimator ALGORITHMS.md section 7 calls a
distilled value head, not the cheaper FUDGE-style regression of whole-sample rewards onto prefixes
(which would only see the tokens the baseline itself picks).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from alignd.settings import Settings
from alignd.train.data import PromptRecord, TrainingInputError, append_work_records, read_work_file
from alignd.train.value_head.context import _MadeData, _RunContext
from alignd.train.value_head.features import compute_features
from alignd.train.value_head.inputs import BaselineChoice
from alignd.train.value_head.options import FEATURES_FILE, STATES_FILE, TargetOptions, ValueHeadRun
from alignd.train.value_head.shards import locked
from alignd.train.value_head.slots import StateSlot, state_slots

if TYPE_CHECKING:
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import Generation
    from alignd.decoding.prompt import Prompt
    from alignd.decoding.values import ValueEstimator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateTargets:
    candidates: list[int]
    sft_logprobs: list[float]
    values: list[float]
    cost: dict


class TargetMaker:
    """The targets of states: the SFT model's top-k candidates and ``Q^BL(s, z)`` from the estimator that
    transfer_q decoding itself builds (:meth:`Generation.value_estimator`), called as ``ValueGuidedDecoder`` calls it
    (its ``top_k_next`` on the SFT prefix, then ``estimate`` with the baseline's own prefix)."""

    def __init__(
        self, generation: Generation, estimator: ValueEstimator, config: DecodingConfig, options: TargetOptions
    ) -> None:
        self.generation = generation
        self.estimator = estimator
        self.config = config
        self.options = options
        self.engine = generation.engine
        self.eos = frozenset(self.engine.info.eos_token_ids)

    @classmethod
    def for_transfer_q(
        cls, generation: Generation, *, reward: str, options: TargetOptions, baseline: str = "default"
    ) -> TargetMaker:
        """The estimator of ``{"method": "transfer_q", "baseline": ..., "reward": ..., "top_k": ...,
        "num_rollouts": ..., "rollout_len": ...}``, planned and resolved as a request would be (the
        server's defaults and limits apply: rollouts are greedy for one rollout, temperature 1 else)."""
        from alignd.decoding.config import DecodingConfig

        request = DecodingConfig(
            method="transfer_q",
            baseline=baseline,
            reward=reward,
            top_k=options.top_k,
            num_rollouts=options.num_rollouts,
            rollout_len=options.rollout_len,
        )
        config, estimator = generation.value_estimator(request)
        return cls(generation, estimator, config, options)

    def policy_prefix(self, prompt: Prompt) -> list[int]:
        policy = self.estimator.policy_for_prefix()
        return policy.prefix(prompt) if policy is not None else list(prompt.token_ids)

    async def values_at(self, prompt: Prompt, generated: list[int], seed: int | None) -> StateTargets:
        """Candidates and targets at the state (``prompt``, ``generated``)."""
        top = (await self.engine.top_k_next([list(prompt.token_ids) + generated], self.config.top_k))[0]
        candidates = [t.token_id for t in top]
        values, cost = await self.estimator.estimate(prompt, self.policy_prefix(prompt), generated, candidates, seed)
        return StateTargets(
            candidates,
            [float(t.logprob) for t in top],
            [float(v) for v in values],
            {"rollouts": cost.rollouts, "rollout_tokens": cost.rollout_tokens, "reward_calls": cost.reward_calls},
        )

    async def state(self, slot: StateSlot) -> dict:
        """One state: an SFT answer to the slot's prompt (temperature ``sample_temperature``), cut at a
        seeded random length, then its targets. The answer is sampled whole and cut uniformly over its
        positions (a finished answer's last state is the one where it chose end-of-text)."""
        began = time.perf_counter()
        opts = self.options
        prompt = self.generation.render_chat(slot.prompt.chat())
        prefix = list(prompt.token_ids)
        answer = (
            await self.engine.rollouts([prefix], 1, opts.answer_len, opts.sample_temperature, seed=slot.answer_seed)
        )[0][0].token_ids
        finished = bool(answer) and answer[-1] in self.eos
        body = answer[:-1] if finished else answer
        cut = random.Random(slot.cut_seed).randint(0, min(len(body), opts.answer_len - 1))
        generated = list(body[:cut])
        seed = slot.rollout_seed if self.config.rollout_temperature > 0 else None
        targets = await self.values_at(prompt, generated, seed)
        return {
            "slot": slot.index,
            "prompt_id": slot.prompt.id,
            "tokens": prefix + generated,
            "prompt_tokens": len(prefix),
            "cut": cut,
            "answer_tokens": len(body),
            "answer_finished": finished,
            "candidates": targets.candidates,
            "sft_logprobs": targets.sft_logprobs,
            "values": targets.values,
            "cost": targets.cost,
            "seconds": round(time.perf_counter() - began, 4),
        }

    def check_context(self, prompts: Sequence[PromptRecord], prompts_file: Path) -> None:
        """Every state and its rollouts must fit the model's context."""
        context = self.engine.info.max_model_len
        need = self.options.answer_len + 1 + self.options.rollout_len
        for p in prompts:
            prompt = self.generation.render_chat(p.chat())
            longest = max(len(prompt.token_ids), len(self.policy_prefix(prompt)))
            if longest + need > context:
                raise TrainingInputError(
                    f"{prompts_file}:{p.line}: prompt '{p.id}' is {longest} tokens; with --answer-len "
                    f"{self.options.answer_len} and --rollout-len {self.options.rollout_len} it exceeds the "
                    f"model's context of {context}"
                )


def _unknown_reward(name: str, known: list[str]) -> TrainingInputError:
    return TrainingInputError(
        f"unknown reward '{name}'; known rewards: {', '.join(sorted(known))} (more through ALIGND_REWARDS)"
    )


async def _make_states(
    run: ValueHeadRun,
    engine_settings: Settings,
    prompts: list[PromptRecord],
    todo: list[StateSlot],
    total: int,
    states_file: Path,
) -> None:
    """Targets for the slots in ``todo`` on the served engine, with the server's baselines and rewards,
    ``concurrency`` states in flight; each state is appended to ``states_file`` as soon as it is done."""
    from alignd.decoding.generation import open_generation
    from alignd.errors import RewardNotFoundError
    from alignd.models.factory import open_engine

    async with (
        open_engine(engine_settings, progress=run.progress) as engine,
        open_generation(engine, engine_settings) as generation,
    ):
        try:
            generation.rewards.get(run.reward)
        except RewardNotFoundError:
            raise _unknown_reward(run.reward, generation.rewards.names()) from None
        maker = TargetMaker.for_transfer_q(generation, reward=run.reward, options=run.targets)
        maker.check_context(prompts, run.prompts_file)
        pending = iter(todo)
        bar = tqdm(
            total=total,
            initial=total - len(todo),
            unit="state",
            disable=not run.progress,
            desc=f"states: Q^BL of top-{run.targets.top_k} ({run.reward})",
        )

        async def worker() -> None:
            for slot in pending:  # one shared iterator: each slot goes to one worker
                record = await maker.state(slot)
                append_work_records(states_file, [record])
                bar.update(1)

        with bar:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(run.targets.concurrency, len(todo))):
                        group.create_task(worker())
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None


def _rollout_temperature(settings: Settings, options: TargetOptions) -> float:
    """The rollout temperature transfer_q resolves for these options (greedy for one rollout)."""
    from alignd.decoding.config import DecodingConfig

    request = DecodingConfig(
        method="transfer_q", num_rollouts=options.num_rollouts, rollout_len=options.rollout_len, top_k=options.top_k
    )
    return float(request.resolved(settings).rollout_temperature)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _generate_states(
    run: ValueHeadRun,
    settings: Settings,
    model_dir: Path,
    baseline: BaselineChoice,
    prompts: list[PromptRecord],
    todo: list[StateSlot],
    total: int,
    states_file: Path,
) -> None:
    updates = {"model": str(model_dir), **baseline.engine_updates}
    if "value_head" in type(settings).model_fields:
        updates["value_head"] = "none"  # the targets come from rollouts: a plain SFT engine, no head in it
    engine_settings = settings.model_copy(update=updates)
    asyncio.run(_make_states(run, engine_settings, prompts, todo, total, states_file))
    # Free the engine now, while the modules its finalizers need are alive (see train/dpo.py).
    gc.collect()


def rollout_data(ctx: _RunContext) -> _MadeData | None:
    """States cut from sampled answers and their rollout targets (resumable; a shard makes its own and
    returns None), then their features in transformers."""
    run, settings, workspace = ctx.run, ctx.settings, ctx.workspace
    states_file = workspace.partial / (STATES_FILE if run.shard is None else run.shard.file)
    slots = state_slots(ctx.prompts, run.targets.states, ctx.inputs["seed"])
    # A shard reads the merged states and its own file only: another shard's file is being written.
    finished = {r["slot"] for r in read_work_file(workspace.partial / STATES_FILE)}
    if run.shard is not None:
        finished |= {r["slot"] for r in read_work_file(states_file)}
    todo = [s for s in slots if s.index not in finished and (run.shard is None or run.shard.owns(s))]
    if run.shard is not None:
        with locked(states_file, wait=False) as free:
            if not free:
                raise TrainingInputError(f"--shard {run.shard} is already running for {run.out}")
            if todo:  # the bar counts this shard's slots only (the others are another process's)
                owned = sum(1 for s in slots if run.shard.owns(s))
                _generate_states(run, settings, ctx.model_dir, ctx.baseline, ctx.prompts, todo, owned, states_file)
        logger.warning(
            "shard %s: its states are made (%d this process); when every shard is done, the command "
            "without --shard trains on all of them",
            run.shard,
            len(todo),
        )
        return None
    generation_s = 0.0
    if todo:
        began = time.perf_counter()
        _generate_states(run, settings, ctx.model_dir, ctx.baseline, ctx.prompts, todo, len(slots), states_file)
        generation_s = time.perf_counter() - began
    by_slot = {r["slot"]: r for r in read_work_file(states_file)}
    records = [by_slot[s.index] for s in slots]  # the first --states slots (a larger earlier run kept more)
    began = time.perf_counter()
    features = compute_features(ctx.model_dir, records, workspace.partial / FEATURES_FILE, progress=run.progress)
    row_of = {slot: i for i, slot in enumerate(features.slots)}
    check_rows = [row_of[r["slot"]] for r in records]
    costs = [r["cost"] for r in records]
    return _MadeData(
        records,
        features,
        manifest={
            "transfer": "direct",
            "targets": "rollouts",
            "top_k": run.targets.top_k,
            "rollout_len": run.targets.rollout_len,
            "num_rollouts": run.targets.num_rollouts,
            "rollout_temperature": _rollout_temperature(settings, run.targets),
        },
        features_check={
            "hf_top1_agreement": _mean([float(features.hf_top1_agrees[i]) for i in check_rows]),
            "max_logprob_gap": max((features.logprob_gap[i] for i in check_rows), default=None),
            "mean_logprob_gap": _mean([features.logprob_gap[i] for i in check_rows]),
            "meaning": "the engine's top-1 candidate vs the argmax of lm_head(h), and the largest gap between "
            "the engine's candidate log-probabilities and log-softmax(lm_head(h)) (engine dtype vs "
            "float32)",
        },
        data={
            "cost_per_state": {
                key: _mean([c[key] for c in costs]) for key in ("rollouts", "rollout_tokens", "reward_calls")
            },
            "cut": "uniform over the answer's positions",
            "cut_mean": _mean([r["cut"] for r in records]),
        },
        notes=[
            f"targets: Q^BL(s, z) from the rollout estimator of decoding method transfer_q (direct transfer), "
            f"baseline '{ctx.baseline.name}' ({ctx.baseline.kind}), for the SFT model's top-{run.targets.top_k} "
            "at states cut from its own sampled answers"
        ],
        wall_s={
            "states_this_process": round(generation_s, 3),
            "states_sum_of_per_state": round(sum(r.get("seconds", 0.0) for r in records), 3),
            "features": round(time.perf_counter() - began, 3),
        },
    )
