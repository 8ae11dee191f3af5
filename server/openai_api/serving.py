"""Serving logic of the OpenAI-compatible endpoints: request -> engine parameters -> response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from alignd.models.engine import GeneratedTokenLogprobs
from alignd.server.generation import GenerationService, new_id
from alignd.server.openai_api.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
)
from alignd.server.request_scope import AdmittedStream, RequestContext

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


class OpenAIServing(GenerationService):
    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.generation.info.max_model_len)])

    # ------------------------------------------------------------------ logprobs shapes
    def _chat_logprobs(self, items: list[GeneratedTokenLogprobs] | None) -> ChatChoiceLogprobs | None:
        if items is None:
            return None
        content = []
        for it in items:
            text = self.token_text(it.token_id)
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=it.logprob,
                    bytes=list(text.encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=(t := self.token_text(alt.token_id)), logprob=alt.logprob, bytes=list(t.encode())
                        )
                        for alt in it.top
                    ],
                )
            )
        return ChatChoiceLogprobs(content=content)

    def _completion_logprobs(
        self, items: list[GeneratedTokenLogprobs] | None, offset: int = 0
    ) -> CompletionLogprobs | None:
        if items is None:
            return None
        out = CompletionLogprobs()
        for it in items:
            text = self.token_text(it.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(it.logprob)
            out.top_logprobs.append({self.token_text(a.token_id): a.logprob for a in it.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    # ------------------------------------------------------------------ chat
    def _prepare_chat(self, request: ChatCompletionRequest):
        self.check_model(request.model)
        return self.plan(
            request,
            self.render_messages(request.messages),
            logprobs=request.num_logprobs,
            logprobs_field="top_logprobs",
        )

    async def chat(self, request: ChatCompletionRequest, ctx: RequestContext) -> ChatCompletionResponse:
        plan = self._prepare_chat(request)
        request_id = new_id("chatcmpl")
        result = await self.run_admitted(
            CHAT_ENDPOINT, [plan], ctx, lambda: self.collect(CHAT_ENDPOINT, plan, request_id)
        )
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
                alignment=c.alignment,
            )
            for c in result.choices
        ]
        completion_tokens = sum(len(c.token_ids) for c in result.choices)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo.of(len(plan.prompt_ids), completion_tokens),
        )

    async def chat_stream(self, request: ChatCompletionRequest, ctx: RequestContext) -> AdmittedStream:
        # Validation and admission happen here, before the response starts, so bad input still gets
        # a 4xx status and overload a 429/503.
        plan = self._prepare_chat(request)
        prompt_ids = plan.prompt_ids
        request_id = new_id("chatcmpl")
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def events() -> AsyncGenerator[ChatCompletionChunk, None]:
            started: set[int] = set()
            completion_tokens = 0
            async for delta in self.metered_stream(CHAT_ENDPOINT, plan, request_id):
                completion_tokens += len(delta.token_ids)
                role = None
                if delta.index not in started:
                    started.add(delta.index)
                    role = "assistant"
                yield ChatCompletionChunk(
                    id=request_id,
                    model=self.model_name,
                    choices=[
                        ChatStreamChoice(
                            index=delta.index,
                            delta=ChatDelta(role=role, content=delta.text),
                            logprobs=self._chat_logprobs(delta.logprobs),
                            finish_reason=delta.finish_reason,
                            alignment=delta.alignment,
                        )
                    ],
                )
            if include_usage:
                yield ChatCompletionChunk(
                    id=request_id,
                    model=self.model_name,
                    choices=[],
                    usage=UsageInfo.of(len(prompt_ids), completion_tokens),
                )

        return await self.open_stream(CHAT_ENDPOINT, [plan], ctx, events())

    # ------------------------------------------------------------------ completions
    def _prepare_completion(self, request: CompletionRequest):
        self.check_model(request.model)
        prompts = request.prompts()
        self.check_prompt_count(len(prompts))
        prepared = []
        for prompt in prompts:
            prepared.append((prompt, self.plan(request, self.render_prompt(prompt), logprobs=request.logprobs)))
        return prepared

    async def complete(self, request: CompletionRequest, ctx: RequestContext) -> CompletionResponse:
        prepared = self._prepare_completion(request)
        request_id = new_id("cmpl")
        plans = [plan for _, plan in prepared]

        async def work():
            return await asyncio.gather(
                *(self.collect(COMPLETIONS_ENDPOINT, plan, f"{request_id}-{i}") for i, plan in enumerate(plans))
            )

        results = await self.run_admitted(COMPLETIONS_ENDPOINT, plans, ctx, work)
        choices = []
        prompt_tokens = completion_tokens = 0
        for i, ((prompt, plan), result) in enumerate(zip(prepared, results, strict=False)):
            prompt_tokens += len(plan.prompt_ids)
            echo = (
                (prompt if isinstance(prompt, str) else self.generation.decode(plan.prompt_ids)) if request.echo else ""
            )
            for c in result.choices:
                completion_tokens += len(c.token_ids)
                choices.append(
                    CompletionChoice(
                        index=i * plan.params.n + c.index,
                        text=echo + c.text,
                        logprobs=self._completion_logprobs(c.logprobs),
                        finish_reason=c.finish_reason,
                        alignment=c.alignment,
                    )
                )
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=UsageInfo.of(prompt_tokens, completion_tokens)
        )

    async def complete_stream(self, request: CompletionRequest, ctx: RequestContext) -> AdmittedStream:
        prepared = self._prepare_completion(request)
        request_id = new_id("cmpl")
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def events() -> AsyncGenerator[CompletionResponse, None]:
            prompt_tokens = completion_tokens = 0
            # Several prompts are streamed one after another; each gets its own choice indices.
            for i, (prompt, plan) in enumerate(prepared):
                ids, params = plan.prompt_ids, plan.params
                prompt_tokens += len(ids)
                offsets: dict[int, int] = {}
                if request.echo:
                    echo = prompt if isinstance(prompt, str) else self.generation.decode(ids)
                    for j in range(params.n):
                        yield CompletionResponse(
                            id=request_id,
                            model=self.model_name,
                            choices=[CompletionChoice(index=i * params.n + j, text=echo, finish_reason=None)],
                        )
                async for delta in self.metered_stream(COMPLETIONS_ENDPOINT, plan, f"{request_id}-{i}"):
                    completion_tokens += len(delta.token_ids)
                    offset = offsets.get(delta.index, 0)
                    offsets[delta.index] = offset + len(delta.text)
                    yield CompletionResponse(
                        id=request_id,
                        model=self.model_name,
                        choices=[
                            CompletionChoice(
                                index=i * params.n + delta.index,
                                text=delta.text,
                                logprobs=self._completion_logprobs(delta.logprobs, offset),
                                finish_reason=delta.finish_reason,
                                alignment=delta.alignment,
                            )
                        ],
                    )
            if include_usage:
                yield CompletionResponse(
                    id=request_id,
                    model=self.model_name,
                    choices=[],
                    usage=UsageInfo.of(prompt_tokens, completion_tokens),
                )

        return await self.open_stream(COMPLETIONS_ENDPOINT, [plan for _, plan in prepared], ctx, events())
