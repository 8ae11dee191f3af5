"""The one door from the server to generation.

A request becomes a :class:`GenerationPlan` (the prompt, the engine parameters, and the resolved
decoding method or none), checked by :meth:`Generation.plan` before any work; :meth:`Generation.stream`
then yields :class:`DecodedDelta` s for every method, plain sampling included. Nothing outside this
module chooses between the engine's own sampler and a decoding method.

What the methods share lives here: the SFT and baseline policies, the reward registry, text assembly
(incremental detokenisation, stop strings), ``n`` concurrent choices, and the per-response
diagnostics (steps, target reward, KL from the SFT model, cost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from alignd.decoding.baselines import DEFAULT, BaselineRegistry, build_baselines, prompted_only
from alignd.decoding.config import DecodingConfig, resolved_field
from alignd.decoding.methods import Decoder, StepRecord
from alignd.decoding.prompt import Policy, Prompt
from alignd.decoding.registry import ALIGNED, PLAIN, Family
from alignd.decoding.text import TextAssembler
from alignd.decoding.values import ValueEstimator
from alignd.errors import InvalidRequestError
from alignd.models.engine import (
    Choice,
    Engine,
    EngineInfo,
    FinishReason,
    GenerationParams,
    GenerationResult,
    StreamDelta,
    collect_stream,
)
from alignd.models.streams import merge_streams
from alignd.protocol.diagnostics import AlignmentSummary, DecodingCost
from alignd.rewards.registry import RewardRegistry, build_rewards
from alignd.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["ALIGNED", "PLAIN", "Completion", "DecodedDelta", "Generation", "GenerationPlan", "open_generation"]

# Observers (metrics): called with (method, step, seconds the step took) for every decision, and with
# (method, target reward or None, KL from SFT) for every finished choice, diagnostics or not.
StepObserver = Callable[[str, StepRecord, float], None]
ResponseObserver = Callable[[str, "float | None", "float | None"], None]


@dataclass(frozen=True)
class GenerationPlan:
    """A validated generation: the prompt, engine parameters, and the resolved decoding method (None =
    the engine's own sampler, without diagnostics)."""

    prompt: Prompt
    params: GenerationParams
    decoding: DecodingConfig | None = None
    admission: Family | None = None  # where the served stack decided it (registry.ValueSourceSpec.family_of)

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.prompt.token_ids)

    @property
    def family(self) -> Family:
        """The admission family (the method's, registry.MethodSpec.family): the engine's own sampler is plain."""
        if self.admission is not None:
            return self.admission
        return PLAIN if self.decoding is None else self.decoding.family


@dataclass
class DecodedDelta(StreamDelta):
    """An engine delta, plus the choice's diagnostics on its last delta when they were asked for."""

    alignment: AlignmentSummary | None = None


@dataclass
class DecodedChoice(Choice):
    alignment: AlignmentSummary | None = None


@dataclass
class Completion(GenerationResult):
    choices: list[DecodedChoice]  # type: ignore[assignment]  # narrower than GenerationResult's list[Choice] (invariant)


class Generation:
    """Every generation goes through here: plans, then streams or whole answers."""

    def __init__(
        self, engine: Engine, rewards: RewardRegistry, settings: Settings, baselines: BaselineRegistry | None = None
    ) -> None:
        """``baselines``: the aligned policies TQ* transfers from (:func:`alignd.decoding.baselines.build_baselines`);
        default: the prompted baseline only, sharing the SFT engine (same weights, prefix cache, batches)."""
        self.engine = engine
        self.rewards = rewards
        self.settings = settings
        self.sft = Policy(engine, "sft")
        self.baselines = baselines or prompted_only(engine, settings)
        self._baseline_digests: dict[str, str | None] = {}  # baseline name -> weights digest (head matching)
        self.step_observers: list[StepObserver] = []
        self.response_observers: list[ResponseObserver] = []

    @property
    def baseline(self) -> Policy:
        """The default baseline's policy."""
        return self.baselines.get(DEFAULT).policy

    async def prepare(self) -> None:
        """Work done once before serving: where the engine has a value head, the weights digests that match
        it to a served baseline (reading an adapter's or a model's tensors), in a worker thread, so that
        the first head request does not read them on the event loop."""
        if self.value_head:
            await asyncio.to_thread(self.head_baseline)

    async def close(self) -> None:
        await self.baselines.close()

    def engines(self) -> dict[str, Engine]:
        """Every engine behind the door, once each, by role: ``sft`` (the served one), ``baseline/<name>``
        and ``reward/<name>`` for the engines started for a baseline or a reward (a LoRA adapter or a
        prompted baseline runs in the SFT engine and is not listed apart)."""
        named: dict[str, Engine] = {"sft": self.engine}
        owned = {id(e) for e in self.baselines.owned_engines}
        for baseline in self.baselines.all():
            engine = baseline.policy.engine
            if id(engine) in owned and engine not in named.values():
                named[f"baseline/{baseline.name}"] = engine
        for reward, engine in self.rewards.engines().items():
            if engine not in named.values():
                named[f"reward/{reward}"] = engine
        return named

    # ------------------------------------------------------------------ the model's text
    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.decode(token_ids)

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens included), as logprobs report it."""
        return self.engine.tokenizer.decode([token_id])

    def render_chat(self, messages: Sequence[dict]) -> Prompt:
        chat = tuple(dict(m) for m in messages)
        return Prompt(tuple(self.engine.render_chat(list(chat))), messages=chat)

    def render_text(self, prompt: str | list[int]) -> Prompt:
        """A raw prompt: text (no chat template) or token ids of this model's vocabulary."""
        if isinstance(prompt, str):
            return Prompt(tuple(self.engine.encode(prompt)), text=prompt)
        vocab = self.engine.info.vocab_size
        bad = [t for t in prompt if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="prompt"
            )
        return Prompt(tuple(prompt), text=self.engine.decode(prompt))

    # ------------------------------------------------------------------ plans
    def plan(self, prompt: Prompt, params: GenerationParams, decoding: DecodingConfig | None) -> GenerationPlan:
        """Check everything before any work (and before a stream's headers): the engine's own checks,
        the decoding method's parameters, and which of the request's fields the method can honour."""
        self.engine.check_params(params)
        if decoding is None or (decoding.spec.is_engine_sampler and not decoding.diagnostics):
            return GenerationPlan(prompt, params)
        if params.logprobs is not None:
            raise InvalidRequestError(
                f"logprobs are not available with decoding.method={decoding.method}; the diagnostics "
                "(decoding.diagnostics=true) report each step's candidates and log-probabilities",
                param="logprobs",
            )
        resolved = self.plan_decoding(decoding)
        resolved.spec.check_params(resolved, params)
        source = resolved.value_source
        if source is not None:
            source.check_params(resolved, params)
        admission = source.family_of(self, resolved) if source is not None and source.family_of else None
        return GenerationPlan(prompt, params, resolved, admission)

    def plan_decoding(self, decoding: DecodingConfig) -> DecodingConfig:
        """The part of :meth:`plan` that depends on the decoding request alone: the method's and its value
        source's defaults from the served stack, the settings' defaults and limits, and the rewards named."""
        decoding = decoding.spec.prepare(self, decoding)
        source = decoding.value_source
        if source is not None:
            reason = source.unavailable(self)
            if reason is not None:
                raise InvalidRequestError(reason, param="decoding.value")
            decoding = source.prepare(self, decoding)
        resolved = decoding.resolved(self.settings)
        if resolved.spec.needs_reward:
            self.rewards.get(resolved_field(resolved.reward))  # unknown names fail before any work
            if resolved.indirect:
                self.rewards.get(resolved_field(resolved.baseline_reward))
        return resolved

    def value_estimator(self, decoding: DecodingConfig) -> tuple[DecodingConfig, ValueEstimator]:
        """The value estimator a request for ``decoding`` decodes with, and the resolved request (for
        training targets: the same values the method uses). A 400 where the values never leave the engine."""
        resolved = self.plan_decoding(decoding)
        source = resolved.value_source
        if source is None or source.estimator is None:
            raise InvalidRequestError(
                f"decoding.method={resolved.method} with value={resolved.value} has no value estimator outside the "
                "engine",
                param="decoding",
            )
        return resolved, source.estimator(self, resolved)

    @property
    def value_head(self) -> dict[str, Any] | None:
        """The manifest of the engine's value head (None: the engine has none)."""
        # EngineInfo.extra is typed object; its "value_head" is the head's manifest, or None (VLLMEngine)
        return cast("dict[str, Any] | None", self.engine.info.extra.get("value_head"))

    def head_baseline(self) -> tuple[str | None, str]:
        """(the name of this server's baseline the value head was distilled from, or None where none of
        them is; how to name that baseline in messages and diagnostics).

        Matched by content, not by name or path: an adapter or model baseline by the weights digest the
        head's manifest records (the same adapter in another clone or folder matches, another adapter
        named "default" does not), a prompted baseline by its system prompt. Digests are computed once
        per baseline, for the kind the head names only."""
        made = (self.value_head or {}).get("baseline") or {}
        kind, source, digest = made.get("kind"), made.get("source"), made.get("weights_digest")
        described = made.get("name") or "unknown"
        for baseline in self.baselines.all():
            if baseline.kind != kind:
                continue
            if kind == "prompted" and source is not None and baseline.source == source:
                return baseline.name, baseline.name
            if kind in ("adapter", "model") and digest is not None and self._baseline_digest(baseline) == digest:
                return baseline.name, baseline.name
        return None, f"{described} ({kind}, not served here)" if kind else described

    def _baseline_digest(self, baseline) -> str | None:
        from alignd.models.weights import weights_digest

        digests = self._baseline_digests
        if baseline.name not in digests:
            try:
                digests[baseline.name] = weights_digest(baseline.source)
            except Exception:  # noqa: BLE001 - a folder that cannot be read has no digest: no match
                logger.warning("could not digest baseline '%s' (%s)", baseline.name, baseline.source, exc_info=True)
                digests[baseline.name] = None
        return digests[baseline.name]

    # ------------------------------------------------------------------ streams
    def stream(self, plan: GenerationPlan, request_id: str) -> AsyncGenerator[DecodedDelta, None]:
        """Deltas of all ``params.n`` choices. Closing the iterator early (client gone, deadline)
        cancels every engine request of the plan."""
        if plan.decoding is None:
            return self._plain(plan, request_id)
        return self._decoded(plan, request_id)

    async def collect(self, deltas: AsyncIterator[DecodedDelta], plan: GenerationPlan) -> Completion:
        """Whole choices from a stream of the plan's deltas (pass :meth:`stream`'s, or a metered copy)."""
        alignments: dict[int, AlignmentSummary] = {}

        async def engine_view() -> AsyncIterator[StreamDelta]:
            async for delta in deltas:
                if delta.alignment is not None:
                    alignments[delta.index] = delta.alignment
                yield delta

        result = await collect_stream(engine_view(), plan.params, len(plan.prompt.token_ids))
        choices = [
            DecodedChoice(
                **{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}, alignment=alignments.get(c.index)
            )
            for c in result.choices
        ]
        return Completion(result.prompt_token_count, choices)

    async def generate(self, plan: GenerationPlan, request_id: str) -> Completion:
        return await self.collect(self.stream(plan, request_id), plan)

    async def _plain(self, plan: GenerationPlan, request_id: str) -> AsyncGenerator[DecodedDelta, None]:
        """The engine's own sampler: its deltas as they come, with text and stop strings assembled
        here when the engine leaves them to the caller."""
        # Engine.stream is typed AsyncIterator; every engine's is an async generator (closing it cancels the work)
        deltas = cast("AsyncGenerator[StreamDelta, None]", self.engine.stream(plan.prompt_ids, plan.params, request_id))
        try:
            if self.engine.applies_stop_strings:
                async for d in deltas:  # the plain hot path: one cheap copy per delta
                    yield DecodedDelta(d.index, d.token_ids, d.text, d.finish_reason, d.logprobs, d.prompt_token_count)
                return
            texts = [_ChoiceText(self.engine.decode, plan.params.stop) for _ in range(plan.params.n)]
            async for delta in deltas:
                out = texts[delta.index].add(delta)
                if out is not None:
                    yield out
                if all(t.finished for t in texts):
                    return  # every choice hit a stop string: closing the stream stops the engine's work
        finally:
            await deltas.aclose()

    async def _decoded(self, plan: GenerationPlan, request_id: str) -> AsyncGenerator[DecodedDelta, None]:
        """Deltas of the plan's decoding method for all ``n`` choices, decoded concurrently (their
        engine calls batch together)."""
        n = plan.params.n
        if n == 1:
            async for delta in self._one_choice(0, plan):
                yield delta
            return
        # merge_streams is an async generator function typed as returning AsyncIterator (models/streams.py)
        merged_streams = cast(
            "AsyncGenerator[DecodedDelta, None]", merge_streams([self._one_choice(i, plan) for i in range(n)])
        )
        async with aclosing(merged_streams) as merged:
            async for delta in merged:
                yield delta

    # ------------------------------------------------------------------ one choice of a method
    def build(self, config: DecodingConfig, params: GenerationParams) -> Decoder:
        """The decoder of one choice. ``config`` must be resolved; ``params`` are the choice's own."""
        return config.spec.build(self, config, params)

    async def _one_choice(self, index: int, plan: GenerationPlan) -> AsyncGenerator[DecodedDelta, None]:
        prompt, params, config = plan.prompt, plan.params, plan.decoding
        assert config is not None  # a plan with a decoding method (stream: _decoded)
        seed = None if params.seed is None else params.seed + index
        decoder = self.build(config, dataclasses.replace(params, n=1, seed=seed))
        text = _ChoiceText(self.engine.decode, params.stop, index=index)
        steps: list[StepRecord] = []
        chunks = decoder.run(prompt)
        try:
            while not text.finished:
                started = time.perf_counter()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                if chunk.step is not None:
                    steps.append(chunk.step)
                    for observer in self.step_observers:
                        observer(config.metric_label, chunk.step, time.perf_counter() - started)
                delta = text.add(
                    StreamDelta(
                        index, chunk.token_ids, "", chunk.finish_reason, prompt_token_count=len(prompt.token_ids)
                    ),
                    hold_last=True,
                )
                if delta is not None:
                    yield delta
        finally:
            await chunks.aclose()  # a stop string or a gone client ends the method's engine work now
        # every step's KL is set where the values leave the engine (only the head's steps have kl None)
        kl = None if config.values_in_engine else sum(cast(float, s.kl) for s in steps)
        reward = None
        if config.diagnostics or (self.response_observers and self.settings.score_responses):
            reward = await self._target_reward(prompt, config, text.answer)
        for response_observer in self.response_observers:
            response_observer(config.metric_label, reward, kl)
        last = text.last(len(prompt.token_ids))
        if config.diagnostics:
            assert reward is not None  # scored above: the diagnostics report the target reward
            last.alignment = self._summary(config, reward, steps, kl)
        yield last

    async def _target_reward(self, prompt: Prompt, config: DecodingConfig, text: str) -> float:
        reward = self.rewards.get(resolved_field(config.reward))
        return (await reward.score([prompt.reward_item(text)], truncate=True))[0].value

    def _summary(
        self, config: DecodingConfig, reward: float, steps: list[StepRecord], kl: float | None
    ) -> AlignmentSummary:
        named_by = config.value_source.named_baseline if config.value_source is not None else config.spec.named_baseline
        baseline, kind = named_by(self, config)
        return AlignmentSummary(
            method=config.method,
            baseline=baseline,
            baseline_kind=kind,
            baseline_reward=config.baseline_reward if config.indirect else None,
            reward_name=config.reward,
            reward=reward,
            kl=kl,
            value=config.value if config.value_source is not None else None,
            cost=DecodingCost(
                decisions=len(steps),
                gated=sum(1 for s in steps if s.gated),
                rollouts=sum(s.cost.rollouts for s in steps),
                rollout_tokens=sum(s.cost.rollout_tokens for s in steps),
                reward_calls=sum(s.cost.reward_calls for s in steps),
            ),
            steps=steps,
        )


class _ChoiceText:
    """One choice's text as its tokens arrive: released piece by piece (never inside a UTF-8
    character), cut at the first stop string, which finishes the choice."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], index: int = 0) -> None:
        self.assembler = TextAssembler(decode, stop)
        self.index = index
        self.tokens: list[int] = []
        self.pending: list[int] = []  # tokens not yet sent (held back by an incomplete character)
        self.pending_logprobs: list | None = None
        self.piece = ""
        self.finish: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def answer(self) -> str:
        """The choice's text so far (cut at the stop string)."""
        return self.assembler.text

    def add(self, delta: StreamDelta, *, hold_last: bool = False) -> DecodedDelta | None:
        """The delta to send for ``delta``'s tokens, or None while text is held back. With
        ``hold_last``, the finishing delta is kept for :meth:`last` (it carries the diagnostics)."""
        if self.finished:
            return None
        self.index = delta.index
        self.tokens += delta.token_ids
        self.pending += delta.token_ids
        if delta.logprobs is not None:
            self.pending_logprobs = (self.pending_logprobs or []) + list(delta.logprobs)
        new = self.assembler.advance(self.tokens, final=delta.finish_reason is not None)
        self.finish = "stop" if self.assembler.stopped else delta.finish_reason
        if new is None:
            return None  # an incomplete UTF-8 character: wait for the next bytes
        self.piece += new
        if self.finished and hold_last:
            return None
        return self._release(delta.prompt_token_count)

    def last(self, prompt_token_count: int) -> DecodedDelta:
        """The choice's final delta (whatever is left, with its finish reason)."""
        self.finish = self.finish or "length"
        self.piece += self.assembler.flush()  # text held back while a stop string might have followed
        return self._release(prompt_token_count)

    def _release(self, prompt_token_count: int) -> DecodedDelta:
        out = DecodedDelta(self.index, self.pending, self.piece, self.finish, self.pending_logprobs, prompt_token_count)
        self.pending, self.piece, self.pending_logprobs = [], "", None
        return out


@asynccontextmanager
async def open_generation(
    engine: Engine,
    settings: Settings,
    *,
    configured_baselines: bool = True,
) -> AsyncIterator[Generation]:
    """The one wiring of the stack over an open engine, as the server, the evaluation, the benchmarks and
    training use it: the configured baselines (adapters in the engine, or engines of their own; with
    ``configured_baselines=False`` the prompted one only, sharing the engine), the rewards that come with
    them, and :class:`Generation` prepared for serving. On exit, what it started is shut down (the
    baselines' own engines, then the rewards'); ``engine`` stays the caller's."""
    baselines = await build_baselines(engine, settings) if configured_baselines else prompted_only(engine, settings)
    try:
        rewards = await build_rewards(settings, engine, baselines.aligned_policies())
    except BaseException:
        await baselines.close()
        raise
    generation = Generation(engine, rewards, settings, baselines)
    try:
        await generation.prepare()
        yield generation
    finally:
        try:
            await generation.close()
        finally:
            await rewards.close()
