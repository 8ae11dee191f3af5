"""The engine contract: the batched primitives that serving and decoding methods build on.

Two engines implement it: :class:`alignd.models.vllm_engine.VLLMEngine` (serves; requests batched by
vLLM's scheduler, prefix caching on) and :class:`alignd.models.hf_engine.HFEngine` (the
``transformers`` reference path, also for tiny-model unit tests and hidden-state probes).

Every primitive takes *many* prefixes at once, so that a decoding method hands one step's whole
work (all candidates, all rollouts) to the engine in a single call. Prompts and prefixes are token
ids; text goes in and out through :attr:`Engine.tokenizer`.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

FinishReason = Literal["stop", "length", "abort"]
T = TypeVar("T")


@dataclass(frozen=True)
class ValueGuidance:
    """Transfer Q* inside the engine's own decode step: over the SFT model's ``top_k`` tokens, sample from
    ``pi_sft * exp(Q / alpha)`` with ``Q`` from the engine's learned value head (``value`` "head") or from its
    baseline stack's implicit Q (``value`` "implicit"; top_k 0: the whole vocabulary) (alignd.vllm_plugin)."""

    alpha: float
    top_k: int
    value: str = "head"


@dataclass(frozen=True)
class GenerationParams:
    """Engine-neutral sampling parameters (the server maps API fields onto these)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Number of top alternatives to report per generated token; None = no log-probabilities.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    # Value-guided decoding by the engine's value head (None: the SFT model's own distribution).
    value_guidance: ValueGuidance | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class GeneratedTokenLogprobs:
    """Log-probability of a generated token and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Choice:
    """One generated continuation of a prompt."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    logprobs: list[GeneratedTokenLogprobs] | None = None


@dataclass
class GenerationResult:
    prompt_token_count: int
    choices: list[Choice]


@dataclass
class StreamDelta:
    """New output of one choice since the previous delta. ``finish_reason`` is set on its last one.

    ``text`` is the new text when the engine detokenizes (:attr:`Engine.applies_stop_strings`), else
    empty: then :mod:`alignd.decoding` assembles the text and applies the stop strings."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list[GeneratedTokenLogprobs] | None = None
    prompt_token_count: int = 0


@dataclass
class Rollout:
    token_ids: list[int]
    finish_reason: FinishReason | None
    text: str = ""


@dataclass
class EngineInfo:
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    extra: dict[str, object] = field(default_factory=dict)
    # Decoder blocks of the model (hidden-state representations are numbered 0..num_layers); None
    # where the engine does not report it.
    num_layers: int | None = None


class CallMeter:
    """Counts and times one engine's requests (each prefix of a batched primitive is a request) for the
    observers of :meth:`Engine.observe_calls`, and knows how many are running."""

    def __init__(self) -> None:
        self.observers: list[EngineCallObserver] = []
        self.running = 0

    @asynccontextmanager
    async def call(self, name: str) -> AsyncIterator[None]:
        from alignd.errors import EngineUnavailableError

        started, outcome = time.perf_counter(), "error"
        self.running += 1
        try:
            yield
            outcome = "ok"
        except EngineUnavailableError:
            outcome = "unavailable"
            raise
        except (asyncio.CancelledError, GeneratorExit):  # a client that went away, a deadline
            outcome = "cancelled"
            raise
        finally:
            self.running -= 1
            seconds = time.perf_counter() - started
            for observer in self.observers:
                observer(name, seconds, outcome)


EngineStatus = Literal["up", "down"]
# (call, seconds, outcome) of one engine call, outcome one of CALL_OUTCOMES; see Engine.call_observers
EngineCallObserver = Callable[[str, float, str], None]
CALL_OUTCOMES = ("ok", "error", "unavailable", "cancelled")
ENGINE_CALLS = ("stream", "top_k_next", "rollouts", "continuation_logprobs")


@dataclass(frozen=True)
class EngineHealth:
    """Whether an engine can serve now. ``detail`` says why not; ``location`` is a remote's URL."""

    status: EngineStatus
    kind: str
    detail: str | None = None
    location: str | None = None
    since: float | None = None  # time.time() of the last change of status, where the engine tracks it


async def collect_stream(
    deltas: AsyncIterator[StreamDelta], params: GenerationParams, prompt_token_count: int
) -> GenerationResult:
    """Assemble a stream of deltas into whole choices."""
    choices = [Choice(i, [], "", None, [] if params.logprobs is not None else None) for i in range(params.n)]
    async for delta in deltas:
        choice = choices[delta.index]
        choice.token_ids.extend(delta.token_ids)
        choice.text += delta.text
        if delta.logprobs is not None and choice.logprobs is not None:
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
    return GenerationResult(prompt_token_count=prompt_token_count, choices=choices)


class Engine(abc.ABC):
    """Batched generation primitives over one causal language model."""

    info: EngineInfo
    # True when :meth:`stream` detokenizes and honours ``params.stop`` itself (vLLM does, in its output
    # processor); otherwise it yields token ids only and the caller assembles text and stop strings.
    applies_stop_strings: bool = True

    @property
    @abc.abstractmethod
    def tokenizer(self):  # a transformers tokenizer
        ...

    # --- serving ---
    @abc.abstractmethod
    def stream(
        self, prompt_token_ids: Sequence[int], params: GenerationParams, request_id: str
    ) -> AsyncIterator[StreamDelta]:
        """Yield deltas of all ``params.n`` choices as they are produced (with their text and cut at
        ``params.stop`` when :attr:`applies_stop_strings`, token ids only otherwise).

        Closing the iterator early (client gone) must cancel the engine work for this request.
        """

    async def generate(
        self, prompt_token_ids: Sequence[int], params: GenerationParams, request_id: str
    ) -> GenerationResult:
        """Whole-answer generation, assembled from :meth:`stream` (stop strings are applied only by an
        engine that :attr:`applies_stop_strings`; :mod:`alignd.decoding` applies them for every engine)."""
        result = await collect_stream(self.stream(prompt_token_ids, params, request_id), params, len(prompt_token_ids))
        if not self.applies_stop_strings:
            for choice in result.choices:
                choice.text = self.decode(choice.token_ids)
        return result

    def check_params(self, params: GenerationParams) -> None:  # noqa: B027 - a no-op unless an engine has limits
        """Raise :class:`alignd.errors.InvalidRequestError` if this engine cannot run ``params``;
        called before a response starts, so that a stream never begins with a doomed request."""

    # --- batched primitives for decoding methods ---
    @abc.abstractmethod
    async def top_k_next(self, prefixes: Sequence[Sequence[int]], k: int) -> list[list[TokenLogprob]]:
        """For each prefix, the ``k`` most likely next tokens with their log-probabilities,
        most likely first (log-probabilities of the unmodified model distribution)."""

    @abc.abstractmethod
    async def rollouts(
        self,
        prefixes: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        *,
        top_p: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> list[list[Rollout]]:
        """For each prefix, ``n`` continuations of at most ``max_tokens`` tokens, stopping at EOS
        (the EOS token is kept as the last token of a rollout that stopped on it). Penalties count
        the continuation's own tokens only, as vLLM's do."""

    @abc.abstractmethod
    async def continuation_logprobs(
        self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """For each (prefix, continuation) pair, ``log p(c_t | prefix, c_<t)`` for every token of the
        continuation."""

    async def next_token_logprobs(
        self, prefixes: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """For each prefix, ``log p(z | prefix)`` of each token ``z`` of its list (the unmodified model
        distribution). This default asks :meth:`continuation_logprobs` for one-token continuations (one
        scored prompt per token); engines that can score listed tokens in one request override it."""
        if len(prefixes) != len(token_ids):
            raise ValueError("prefixes and token_ids must have the same length")
        pairs = [(list(prefix), [z]) for prefix, ids in zip(prefixes, token_ids, strict=False) for z in ids]
        flat = iter(await self.continuation_logprobs([p for p, _ in pairs], [c for _, c in pairs]))
        return [[next(flat)[0] for _ in ids] for ids in token_ids]

    def with_adapter(self, name: str, path: str) -> Engine:
        """This model with the LoRA adapter in folder ``path``, as an engine of its own (for a baseline
        or the aligned model of an implicit reward). Engines that cannot run adapters refuse."""
        from alignd.errors import ConfigurationError

        raise ConfigurationError(f"adapter '{name}': {type(self).__name__} cannot run LoRA adapters")

    kind: str = "engine"  # what /health and metrics call it: "vllm", "hf", "remote"

    def observe_calls(self, observer: EngineCallObserver) -> bool:
        """Tell ``observer`` of each of this engine's calls (the server's per-engine metrics); False when
        the engine does not report calls (in-process engines, whose calls fail only with the process)."""
        return False

    def health(self) -> EngineHealth:
        """Whether the engine could serve at its last call or check (no I/O: metrics read it)."""
        return EngineHealth("up", self.kind)

    async def check_health(self) -> EngineHealth:
        """Whether the engine can serve now; a remote one that is down is asked again here, so that
        ``/health`` sees it come back even with no traffic."""
        return self.health()

    def restart_count(self) -> int:
        """Times the engine was brought back after it died, since it started (in-process vLLM engines are
        supervised: models/supervision.py)."""
        return 0

    def unfinished_requests(self) -> int:
        """Engine requests started and not yet finished or aborted (streams and primitive calls alike).
        Zero when idle: a client that goes away must bring it back to zero."""
        return 0

    async def shutdown(self) -> None:  # pragma: no cover - engines override when they hold resources
        return None

    # --- optional capability: the model itself (hidden-state probes) ---
    @property
    def supports_hidden_states(self) -> bool:
        """True when :meth:`run_on_model` can run the ``transformers`` model behind this engine, so that
        probes can read its hidden states (the reference engine, HFEngine); False otherwise (vLLM does
        not expose them)."""
        return False

    async def run_on_model(self, fn: Callable[[Any], T]) -> T:
        """``fn(model)`` on the engine's ``transformers`` causal LM, in a worker thread and never at the
        same time as the engine's own model calls (generation included); ``fn``'s result or exception
        comes back. Only where :attr:`supports_hidden_states` is True."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its model (supports_hidden_states is False)")

    # --- helpers shared by engines ---
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a chat conversation rendered with the model's chat template, ready for the
        assistant's answer."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.encode(text)
