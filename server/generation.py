"""What every generate endpoint shares: model check, prompt rendering, limits, metered streaming,
server-sent events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

from pydantic import BaseModel

from alignd.decoding.config import DecodingConfig
from alignd.decoding.service import AlignedDecoding
from alignd.decoding.values import Prompt
from alignd.errors import AligndError, DeadlineExceededError, InvalidRequestError, ModelNotFoundError, ServerError
from alignd.models.engine import Engine, GenerationParams, GenerationResult, StreamDelta, collect_stream
from alignd.server.admission import ALIGNED, PLAIN, AdmissionController, Slot
from alignd.server.errors import error_body
from alignd.server.request_scope import AdmittedStream, RequestContext
from alignd.server.metrics import ServerMetrics
from alignd.server.sampling import SamplingFields
from alignd.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Plan:
    """A validated generation: the prompt, engine parameters, and the aligned decoding to use (None =
    the engine's own sampler)."""

    prompt: Prompt
    params: GenerationParams
    decoding: DecodingConfig | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.prompt.token_ids)


class GenerationService:
    """Base of the serving classes: holds the engine and turns requests into engine calls."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: ServerMetrics,
        aligned: AlignedDecoding | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.aligned = aligned
        self.admission = admission or AdmissionController(settings)
        self.model_name = settings.model_name
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(
                f"model '{name}' is not served here; this server serves '{self.model_name}' (see GET /v1/models)",
                param="model",
            )

    def render_messages(self, messages: Sequence) -> Prompt:
        chat = tuple(m.as_template_message() for m in messages)
        return Prompt(tuple(self.engine.render_chat(list(chat))), messages=chat)

    def render_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(tuple(self.engine.encode(prompt)), text=prompt)
        vocab = self.engine.info.vocab_size
        bad = [t for t in prompt if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="prompt"
            )
        return Prompt(tuple(prompt), text=self.engine.decode(prompt))

    def check_prompt_count(self, count: int) -> None:
        limit = self.settings.max_prompts_per_request
        if count > limit:
            raise InvalidRequestError(
                f"{count} prompts in one request is above this server's limit of {limit}: split the request",
                param="prompt",
            )

    def plan(self, request: SamplingFields, prompt: Prompt, logprobs: int | None = None) -> Plan:
        """Validate everything before any work (and before a stream's headers): sampling values
        against the context, the engine's own checks, and the decoding method's parameters."""
        params = request.generation_params(
            prompt_tokens=len(prompt.token_ids),
            max_model_len=self.engine.info.max_model_len,
            settings=self.settings,
            logprobs=logprobs,
        )
        self.engine.check_params(params)
        decoding = request.decoding
        if decoding is None or (decoding.method == "sft" and not decoding.diagnostics):
            return Plan(prompt, params)
        if self.aligned is None:
            raise InvalidRequestError("aligned decoding is not enabled on this server", param="decoding")
        if logprobs is not None:
            raise InvalidRequestError(
                f"logprobs are not available with decoding.method={decoding.method}; the diagnostics "
                "(decoding.diagnostics=true) report each step's candidates and log-probabilities",
                param="logprobs",
            )
        return Plan(prompt, params, self.aligned.resolve(decoding))

    # ------------------------------------------------------------------ admission and deadlines
    @staticmethod
    def family(plans: Sequence[Plan]) -> str:
        """The decoding family a request is admitted under: the costliest of its plans."""
        aligned = any(p.decoding is not None and p.decoding.method != "sft" for p in plans)
        return ALIGNED if aligned else PLAIN

    async def admit(self, plans: Sequence[Plan], ctx: RequestContext) -> Slot:
        return await self.admission.acquire(self.family(plans), ctx.remaining())

    async def run_admitted(self, endpoint: str, plans: Sequence[Plan], ctx: RequestContext, work: Callable[[], Awaitable[T]]) -> T:
        """A whole (non-streamed) answer: take a slot, run ``work`` under the request's deadline,
        free the slot however it ends."""
        slot = await self.admit(plans, ctx)
        try:
            async with ctx.timeout() as timeout:
                return await work()
        except TimeoutError:
            if not timeout.expired():
                raise
            self.metrics.deadline_exceeded.labels(endpoint).inc()
            raise DeadlineExceededError(
                f"the request's deadline of {ctx.timeout_s:g} s passed before the answer was complete; "
                "ask for fewer tokens or a cheaper decoding, or allow more time (X-Request-Timeout)"
            ) from None
        finally:
            slot.release()

    async def open_stream(
        self, endpoint: str, plans: Sequence[Plan], ctx: RequestContext, events: AsyncIterator[BaseModel | dict]
    ) -> AdmittedStream:
        """A streamed answer: the slot is taken now, before the response starts (so a refusal is
        still a 429/503 status); the stream frees it when it ends."""
        try:
            slot = await self.admit(plans, ctx)
        except BaseException:
            await events.aclose()
            raise
        return AdmittedStream(self.sse_events(events, endpoint, ctx), slot.release)

    def _source(self, plan: Plan, request_id: str) -> AsyncIterator[StreamDelta]:
        if plan.decoding is None:
            return self.engine.stream(plan.prompt_ids, plan.params, request_id)
        return self.aligned.stream(plan.prompt, plan.params, plan.decoding, request_id)

    async def metered_stream(self, endpoint: str, plan: Plan, request_id: str) -> AsyncIterator[StreamDelta]:
        """The plan's stream, counted into the metrics (running gauge, TTFT, tokens)."""
        start = time.perf_counter()
        first_token_at = None
        tokens = 0
        self.metrics.running_requests.labels(endpoint).inc()
        self.metrics.prompt_tokens.labels(endpoint).inc(len(plan.prompt.token_ids))
        try:
            async for delta in self._source(plan, request_id):
                if first_token_at is None and delta.token_ids:
                    first_token_at = time.perf_counter()
                    self.metrics.time_to_first_token.labels(endpoint).observe(first_token_at - start)
                tokens += len(delta.token_ids)
                self.metrics.generation_tokens.labels(endpoint).inc(len(delta.token_ids))
                yield delta
            if first_token_at is not None and tokens > 1:
                per_token = (time.perf_counter() - first_token_at) / (tokens - 1)
                self.metrics.time_per_output_token.labels(endpoint).observe(per_token)
        except AligndError:
            raise
        except ValueError as exc:  # vLLM rejects some inputs with ValueError (e.g. prompt too long)
            raise InvalidRequestError(str(exc)) from exc
        finally:
            self.metrics.running_requests.labels(endpoint).dec()

    async def collect(self, endpoint: str, plan: Plan, request_id: str) -> GenerationResult:
        """A whole answer, gathered from the metered stream (so the metrics see it too)."""
        return await collect_stream(self.metered_stream(endpoint, plan, request_id), plan.params, len(plan.prompt.token_ids))

    async def sse_events(
        self, events: AsyncIterator[BaseModel | dict], endpoint: str, ctx: RequestContext
    ) -> AsyncIterator[str]:
        """Server-sent events of a stream, ended by [DONE]. An error after the headers were sent
        can no longer change the status, so it becomes an error event in the OpenAI shape; so does
        the deadline passing (the generation is stopped then)."""
        try:
            while True:
                # The deadline covers the wait for the next event only, never a suspended yield.
                try:
                    async with ctx.timeout() as timeout:
                        event = await anext(events)
                except StopAsyncIteration:
                    break
                yield sse(event)
        except TimeoutError:
            if not timeout.expired():
                raise
            self.metrics.deadline_exceeded.labels(endpoint).inc()
            yield sse(error_body(DeadlineExceededError(
                f"the request's deadline of {ctx.timeout_s:g} s passed; the answer is incomplete"
            )))
        except AligndError as exc:
            yield sse(error_body(exc))
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not a cut
            logger.exception("stream failed")
            yield sse(error_body(ServerError(f"generation failed: {type(exc).__name__}")))
        finally:
            await events.aclose()  # a client that left, or the deadline: the engine work stops now
        yield SSE_DONE

