"""Serving logic of the native ``POST /generate`` endpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import cast

from alignd.decoding.listing import describe_methods
from alignd.models.engine import GeneratedTokenLogprobs
from alignd.protocol.common import UsageInfo
from alignd.protocol.native import BaselineCard, BaselineList, ImplicitQCard, MethodList, ValueHeadCard
from alignd.server.generation import GenerationService, new_id
from alignd.server.native.protocol import (
    GenerateChoice,
    GeneratedTokenOut,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    TokenLogprobOut,
)
from alignd.server.request_scope import AdmittedStream, RequestContext

GENERATE_ENDPOINT = "/generate"


class NativeServing(GenerationService):
    def list_baselines(self) -> BaselineList:
        cards = []
        for name in self.generation.baselines.names():
            b = self.generation.baselines.get(name)
            form = b.implicit_form()
            implicit = None if isinstance(form, str) else ImplicitQCard(**dataclasses.asdict(form))
            cards.append(
                BaselineCard(
                    name=name,
                    kind=b.kind,
                    source=b.source,
                    same_as=b.name if b.name != name else None,
                    implicit_reward=b.implicit_reward,
                    beta=b.beta,
                    provenance=b.provenance,
                    implicit_q=implicit,
                    implicit_q_unavailable=form if isinstance(form, str) else None,
                )
            )
        return BaselineList(data=cards)

    def list_methods(self) -> MethodList:
        return describe_methods(self.generation)

    def value_head(self) -> ValueHeadCard:
        head = self.generation.value_head
        if not head:
            return ValueHeadCard(available=False)
        return ValueHeadCard(
            available=True,
            path=head.get("path"),
            reward=head.get("reward"),
            baseline=self.generation.head_baseline()[1],
            provenance=head,
        )

    def _prepare(self, request: GenerateRequest):
        self.check_model(request.model)
        prompt = (
            self.render_messages(request.messages)
            if request.messages is not None
            else self.render_prompt(cast(str, request.prompt))  # _one_input: 'prompt' is given when 'messages' is not
        )
        return self.plan(request, prompt, logprobs=request.logprobs)

    def _logprobs(self, items: list[GeneratedTokenLogprobs] | None) -> list[GeneratedTokenOut] | None:
        if items is None:
            return None
        return [
            GeneratedTokenOut(
                token_id=it.token_id,
                token=self.token_text(it.token_id),
                logprob=it.logprob,
                top=[
                    TokenLogprobOut(token_id=a.token_id, token=self.token_text(a.token_id), logprob=a.logprob)
                    for a in it.top
                ],
            )
            for it in items
        ]

    async def generate(self, request: GenerateRequest, ctx: RequestContext) -> GenerateResponse:
        plan = self._prepare(request)
        prompt_ids = plan.prompt_ids
        request_id = new_id("gen")
        result = await self.run_admitted(
            GENERATE_ENDPOINT, [plan], ctx, lambda: self.collect(GENERATE_ENDPOINT, plan, request_id)
        )
        completion_tokens = sum(len(c.token_ids) for c in result.choices)
        return GenerateResponse(
            id=request_id,
            model=self.model_name,
            choices=[
                GenerateChoice(
                    index=c.index,
                    text=c.text,
                    token_ids=c.token_ids,
                    finish_reason=c.finish_reason,
                    logprobs=self._logprobs(c.logprobs),
                    alignment=c.alignment,
                )
                for c in result.choices
            ],
            usage=UsageInfo.of(len(prompt_ids), completion_tokens),
        )

    async def generate_stream(self, request: GenerateRequest, ctx: RequestContext) -> AdmittedStream:
        plan = self._prepare(request)  # before the response starts: errors stay 4xx
        prompt_ids = plan.prompt_ids
        request_id = new_id("gen")

        async def events() -> AsyncGenerator[GenerateStreamEvent, None]:
            completion_tokens = 0
            async for delta in self.metered_stream(GENERATE_ENDPOINT, plan, request_id):
                completion_tokens += len(delta.token_ids)
                yield GenerateStreamEvent(
                    id=request_id,
                    index=delta.index,
                    text=delta.text,
                    token_ids=delta.token_ids,
                    finish_reason=delta.finish_reason,
                    logprobs=self._logprobs(delta.logprobs),
                    alignment=delta.alignment,
                )
            yield GenerateStreamEvent(
                id=request_id,
                usage=UsageInfo.of(len(prompt_ids), completion_tokens),
            )

        return await self.open_stream(GENERATE_ENDPOINT, [plan], ctx, events())
