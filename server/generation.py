"""What every generate endpoint shares: model check, prompt rendering, limits, metered streaming,
server-sent events. Generation itself goes through one door, :class:`alignd.decoding.generation.Generation`."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel

from alignd.decoding.generation import Completion, DecodedDelta, Generation, GenerationPlan
from alignd.decoding.prompt import Prompt
from alignd.errors import AligndError, DeadlineExceededError, InvalidRequestError, ModelNotFoundError, ServerError
from alignd.protocol.common import ChatMessage
from alignd.server.admission import AdmissionController, Slot
from alignd.server.errors import error_body
from alignd.server.metrics import ServerMetrics
from alignd.server.request_scope import AdmittedStream, RequestContext
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


class GenerationService:
    """Base of the serving classes: turns requests into plans of the one generation door."""

    def __init__(
        self,
        generation: Generation,
        settings: Settings,
        metrics: ServerMetrics,
        admission: AdmissionController | None = None,
    ) -> None:
        self.generation = generation
        self.settings = settings
        self.metrics = metrics
        self.admission = admission or AdmissionController(settings)
        self.model_name = settings.model_name
        self.token_text = lru_cache(maxsize=65536)(generation.token_text)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(
                f"model '{name}' is not served here; this server serves '{self.model_name}' (see GET /v1/models)",
                param="model",
            )

    def render_messages(self, messages: Sequence[ChatMessage]) -> Prompt:
        return self.generation.render_chat([m.as_template_message() for m in messages])

    def render_prompt(self, prompt: str | list[int]) -> Prompt:
        return self.generation.render_text(prompt)

    def check_prompt_count(self, count: int) -> None:
        limit = self.settings.max_prompts_per_request
        if count > limit:
            raise InvalidRequestError(
                f"{count} prompts in one request is above this server's limit of {limit} "
                "(ALIGND_MAX_PROMPTS_PER_REQUEST): split the request",
                param="prompt",
            )

    def plan(
        self, request: SamplingFields, prompt: Prompt, logprobs: int | None = None, logprobs_field: str = "logprobs"
    ) -> GenerationPlan:
        """Validate everything before any work (and before a stream's headers): sampling values
        against the context and the server's limits, then the generation door's own checks."""
        params = request.generation_params(
            prompt_tokens=len(prompt.token_ids),
            max_model_len=self.generation.info.max_model_len,
            settings=self.settings,
            logprobs=logprobs,
            logprobs_field=logprobs_field,
        )
        return self.generation.plan(prompt, params, request.decoding)

    # ------------------------------------------------------------------ admission and deadlines
    async def admit(self, plans: Sequence[GenerationPlan], ctx: RequestContext) -> Slot:
        """A slot of the request's decoding family: the costliest of its plans'."""
        return await self.admission.acquire(self.admission.family_of(p.family for p in plans), ctx.remaining())

    async def run_admitted(
        self, endpoint: str, plans: Sequence[GenerationPlan], ctx: RequestContext, work: Callable[[], Awaitable[T]]
    ) -> T:
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
        self,
        endpoint: str,
        plans: Sequence[GenerationPlan],
        ctx: RequestContext,
        events: AsyncGenerator[BaseModel | dict[str, Any], None],
    ) -> AdmittedStream:
        """A streamed answer: the slot is taken now, before the response starts (so a refusal is
        still a 429/503 status); the stream frees it when it ends."""
        try:
            slot = await self.admit(plans, ctx)
        except BaseException:
            await events.aclose()
            raise
        return AdmittedStream(self.sse_events(events, endpoint, ctx), slot.release)

    async def metered_stream(self, endpoint: str, plan: GenerationPlan, request_id: str) -> AsyncIterator[DecodedDelta]:
        """The plan's stream, counted into the metrics (running gauge, TTFT, tokens)."""
        start = time.perf_counter()
        first_token_at = None
        tokens = 0
        self.metrics.running_requests.labels(endpoint).inc()
        self.metrics.prompt_tokens.labels(endpoint).inc(len(plan.prompt.token_ids))
        deltas = self.generation.stream(plan, request_id)
        try:
            async for delta in deltas:
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
            await deltas.aclose()
            self.metrics.running_requests.labels(endpoint).dec()

    async def collect(self, endpoint: str, plan: GenerationPlan, request_id: str) -> Completion:
        """A whole answer, gathered from the metered stream (so the metrics see it too)."""
        return await self.generation.collect(self.metered_stream(endpoint, plan, request_id), plan)

    async def sse_events(
        self, events: AsyncGenerator[BaseModel | dict[str, Any], None], endpoint: str, ctx: RequestContext
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
            yield sse(
                error_body(
                    DeadlineExceededError(
                        f"the request's deadline of {ctx.timeout_s:g} s passed; the answer is incomplete"
                    )
                )
            )
        except AligndError as exc:
            yield sse(error_body(exc))
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not a cut
            logger.exception("stream failed")
            yield sse(error_body(ServerError(f"generation failed: {type(exc).__name__}")))
        finally:
            await events.aclose()  # a client that left, or the deadline: the engine work stops now
        yield SSE_DONE
