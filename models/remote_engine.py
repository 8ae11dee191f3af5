"""An engine on a remote ``vllm serve`` deployment: the engine contract over vLLM's OpenAI-compatible HTTP
API (``/v1/completions`` with token-id prompts).

A team that outgrows one machine runs each model on its own vLLM deployment (tensor and pipeline
parallel, Ray across nodes); alignd then orchestrates it instead of holding it. What each primitive
sends (vLLM's own extensions of the completions request):

    stream / generate      prompt = token ids, ``return_token_ids`` (the tokens of each delta, not text
                           re-tokenized), ``logprobs`` with ``return_tokens_as_token_ids`` ("token_id:N")
    top_k_next             one greedy token with ``logprobs = k``: the unmodified model's top k
    rollouts               ``n`` continuations, ``seed`` (vLLM seeds choice j with seed + j, as in process)
    continuation_logprobs  prefix + continuation as the prompt, ``prompt_logprobs = 0``, one token

Every call goes through one pooled ``httpx.AsyncClient``. A stream that is closed early closes its
HTTP response, and vLLM aborts a request whose client has gone. A remote that cannot be reached, or
drops the connection, is :class:`alignd.errors.EngineUnavailableError` (503 ``engine_unavailable``,
naming the engine, with Retry-After): the requests that need it fail fast, the others are untouched,
and the next call tries again, so the engine recovers when the remote does. That connection (client,
start-up checks, up and down, metering, transport errors) is :mod:`alignd.models.remote_server`'s
:class:`RemoteVLLMServer`, re-exported here.

The tokenizer is the local one of the served model (prompts are token ids, and TQ* and implicit
rewards need ids that mean the same on every engine): :meth:`RemoteVLLMEngine.connect` asks the
remote to tokenize probe texts with its own tokenizer and refuses a remote whose ids differ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import httpx

from alignd.errors import ConfigurationError, InvalidRequestError, ServerError
from alignd.models.engine import (
    ENGINE_CALLS,
    Engine,
    EngineInfo,
    GeneratedTokenLogprobs,
    GenerationParams,
    Rollout,
    StreamDelta,
    TokenLogprob,
)
from alignd.models.remote_server import RECHECK_INTERVAL_S as RECHECK_INTERVAL_S
from alignd.models.remote_server import RETRY_AFTER_S as RETRY_AFTER_S
from alignd.models.remote_server import RemoteVLLMServer, _checked_json, _translated
from alignd.models.value_head import ALPHA_KEY, TOP_K_KEY

# Texts whose token ids must be the same on both sides (words, digits, whitespace, non-ASCII, and the
# chat template's own markers are covered by rendering a conversation).
PROBE_TEXTS = ("Hello, world! 123 4567", "  two  spaces\nand a newline\t tab", "naïve café – 東京 🙂")


def _token_id(key: str) -> int:
    """vLLM's ``return_tokens_as_token_ids`` spelling of a token: ``"token_id:<id>"``."""
    return int(key.rsplit(":", 1)[1])


class RemoteVLLMEngine(RemoteVLLMServer, Engine):
    """The engine contract over a ``vllm serve`` deployment at ``base_url``, for its model ``model``."""

    applies_stop_strings = True  # vLLM applies stop strings server-side
    calls = ENGINE_CALLS

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str | None,
        tokenizer,
        info: EngineInfo,
        *,
        client: httpx.AsyncClient,
        owns_client: bool = True,
        parent: RemoteVLLMEngine | None = None,
    ) -> None:
        super().__init__(name, base_url, model, client=client, owns_client=owns_client, parent=parent)
        self._tokenizer = tokenizer
        self.info = info

    # ------------------------------------------------------------------ start-up
    @classmethod
    async def connect(
        cls,
        name: str,
        base_url: str,
        tokenizer,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        allow_down: bool = False,
        max_model_len: int = 2048,
        local_model_dir: str | None = None,
    ) -> RemoteVLLMEngine:
        """Check the remote and return its engine: it must answer ``/v1/models`` as a vLLM server, serve
        ``model`` (or exactly one model when ``model`` is None), and tokenize like ``tokenizer``.
        Raises :class:`ConfigurationError` naming both sides when it is not what alignd needs. A remote
        that cannot be reached raises :class:`EngineUnavailableError`, or with ``allow_down`` gives an
        engine that is down (its calls are 503s) until the remote answers; ``max_model_len`` stands in for
        the remote's until then. ``local_model_dir``: the local folder of the same model (its tokenizer's;
        adapters are checked against its weights), kept in ``info.extra``."""
        eos = tokenizer.eos_token_id
        info = EngineInfo(
            model_path=f"{base_url.rstrip('/')}#{model or '?'}",
            max_model_len=max_model_len,
            vocab_size=len(tokenizer),
            eos_token_ids=(eos,) if eos is not None else (),
            extra={"remote": base_url, "model": model, "local_model_dir": local_model_dir},
        )
        engine = cls(name, base_url, model, tokenizer, info, client=cls.http_client(base_url, api_key, timeout_s))
        await engine._start(allow_down)
        return engine

    async def _verify(self) -> None:
        model, _, length = await self._served_card()
        name, base_url, client, tokenizer = self.name, self.base_url, self._client, self._tokenizer
        conversation = [{"role": "user", "content": "Hi there"}]
        probes = [*PROBE_TEXTS, tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)]
        for text in probes:
            async with _translated(name, base_url):
                reply = await client.post(
                    "/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False}
                )
            if reply.status_code != 200:
                raise ConfigurationError(
                    f"engine '{name}': {base_url} did not tokenize a probe text "
                    f"({reply.status_code}: {reply.text[:200]})"
                )
            theirs, ours = reply.json()["tokens"], list(tokenizer.encode(text, add_special_tokens=False))
            if theirs != ours:
                raise ConfigurationError(
                    f"engine '{name}': the tokenizer of '{model}' at {base_url} differs from the served model's "
                    f"({tokenizer.name_or_path}): {text!r} is {theirs[:12]} there and {ours[:12]} here; TQ* and "
                    "implicit rewards need token ids that mean the same thing on every engine"
                )
        self.model = model
        self.info = EngineInfo(
            model_path=f"{base_url}#{model}",
            max_model_len=length,
            vocab_size=self.info.vocab_size,
            eos_token_ids=self.info.eos_token_ids,
            extra={**self.info.extra, "model": model},
        )

    # ------------------------------------------------------------------ the contract
    @property
    def tokenizer(self):
        return self._tokenizer

    def with_adapter(self, name: str, path: str) -> RemoteVLLMEngine:
        """The adapter ``name`` as the remote serves it (``vllm serve --lora-modules name=path``): the same
        connection, requests for model ``name``."""
        info = EngineInfo(
            model_path=f"{self.base_url}#{name}",
            max_model_len=self.info.max_model_len,
            vocab_size=self.info.vocab_size,
            eos_token_ids=self.info.eos_token_ids,
            extra={**self.info.extra, "model": name, "adapter": name},
        )
        view = RemoteVLLMEngine(
            self.name, self.base_url, name, self._tokenizer, info, client=self._client, owns_client=False, parent=self
        )
        view._meter = self._meter
        return view

    def check_params(self, params: GenerationParams) -> None:
        if params.n < 1 or params.max_tokens < 1:
            raise InvalidRequestError("n and max_tokens must be at least 1")

    def _body(self, prompt: Sequence[int], params: GenerationParams, **extra) -> dict:
        body = {
            "model": self.model,
            "prompt": list(prompt),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "ignore_eos": params.ignore_eos,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
            **extra,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        if params.value_guidance is not None:
            body["vllm_xargs"] = {
                ALPHA_KEY: float(params.value_guidance.alpha),
                TOP_K_KEY: int(params.value_guidance.top_k),
            }
        return body

    async def _complete(self, call: str, body: dict) -> dict:
        async with self._call(call):
            response = await self._client.post("/v1/completions", json=body)
            return _checked_json(self.name, response)

    async def stream(self, prompt_token_ids, params, request_id) -> AsyncIterator[StreamDelta]:
        body = self._body(prompt_token_ids, params, stream=True)
        # leaving the block closes the response: vLLM aborts a request whose connection is gone
        async with (
            self._call("stream"),
            self._client.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": request_id}) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                _checked_json(self.name, response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(f"engine '{self.name}': {chunk['error'].get('message', chunk['error'])}")
                for choice in chunk.get("choices", []):
                    yield self._delta(choice, params, len(prompt_token_ids))

    @staticmethod
    def _delta(choice: dict, params: GenerationParams, prompt_count: int) -> StreamDelta:
        tokens = list(choice.get("token_ids") or [])
        logprobs = None
        if params.logprobs is not None and choice.get("logprobs"):
            lp = choice["logprobs"]
            logprobs = []
            for key, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or [], strict=False):
                ranked = sorted(((_token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda t: -t[1])
                logprobs.append(
                    GeneratedTokenLogprobs(
                        _token_id(key), float(value), tuple(TokenLogprob(t, v) for t, v in ranked[: params.logprobs])
                    )
                )
        return StreamDelta(
            index=int(choice.get("index", 0)),
            token_ids=tokens,
            text=choice.get("text") or "",
            finish_reason=choice.get("finish_reason"),
            logprobs=logprobs,
            prompt_token_count=prompt_count,
        )

    async def top_k_next(self, prefixes, k):
        params = GenerationParams(max_tokens=1, temperature=0.0, logprobs=k)

        async def one(prefix) -> list[TokenLogprob]:
            reply = await self._complete("top_k_next", self._body(prefix, params))
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            ranked = sorted(((_token_id(key), float(v)) for key, v in top.items()), key=lambda t: -t[1])
            return [TokenLogprob(t, v) for t, v in ranked[:k]]

        return list(await asyncio.gather(*(one(p) for p in prefixes)))

    async def rollouts(
        self,
        prefixes,
        n,
        max_tokens,
        temperature=1.0,
        seed=None,
        *,
        top_p=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
    ):
        async def one(i: int, prefix) -> list[Rollout]:
            params = GenerationParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                n=n,
                seed=None if seed is None else seed + i * n,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
            )
            reply = await self._complete("rollouts", self._body(prefix, params))
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            return [Rollout(list(c["token_ids"]), c.get("finish_reason"), c.get("text") or "") for c in choices]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prefixes))))

    async def continuation_logprobs(self, prefixes, continuations):
        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        params = GenerationParams(max_tokens=1, temperature=0.0)

        async def one(prefix, cont) -> list[float]:
            if not cont:
                return []
            full = [*prefix, *cont]
            reply = await self._complete("continuation_logprobs", self._body(full, params, prompt_logprobs=0))
            # prompt_logprobs[j]: {token id: {"logprob", ...}} of full[j] given full[:j] (None at j = 0)
            scored = reply["choices"][0]["prompt_logprobs"]
            return [float(scored[j][str(full[j])]["logprob"]) for j in range(len(prefix), len(full))]

        return list(await asyncio.gather(*(one(p, c) for p, c in zip(prefixes, continuations, strict=False))))


class RemoteVLLMClassifier(RemoteVLLMServer):
    """A sequence classifier (a reward model) on ``vllm serve --runner pooling``: texts are rendered and
    tokenized by the remote itself (``/tokenize``, with its own chat template where it has one, the way
    the reward model was trained) and scored by ``/classify`` on token ids, as raw logits
    (``use_activation: false``), like the in-process backends."""

    calls = ("tokenize", "classify")

    def __init__(
        self, name: str, base_url: str, model: str | None, *, client: httpx.AsyncClient, max_model_len: int
    ) -> None:
        super().__init__(name, base_url, model, client=client)
        self.max_model_len = max_model_len  # the remote's, once checked
        self.num_labels: int | None = None
        self.chat_template = False  # whether the remote renders conversations (its model has a chat template)

    @classmethod
    async def connect(
        cls,
        name: str,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        allow_down: bool = False,
        max_model_len: int = 2048,
    ) -> RemoteVLLMClassifier:
        """Check that the remote serves ``model`` (None: its only one) as a classifier; see
        :meth:`RemoteVLLMEngine.connect` for ``allow_down`` and ``max_model_len``."""
        remote = cls(
            name, base_url, model, client=cls.http_client(base_url, api_key, timeout_s), max_model_len=max_model_len
        )
        await remote._start(allow_down)
        return remote

    async def _verify(self) -> None:
        model, _, length = await self._served_card()
        async with _translated(self.name, self.base_url):
            probe = await self._client.post(
                "/tokenize", json={"model": model, "prompt": "Hello", "add_special_tokens": True}
            )
            ids = _checked_json(self.name, probe)["tokens"]
            reply = await self._client.post("/classify", json={"model": model, "input": [ids], "use_activation": False})
        if reply.status_code != 200:
            raise ConfigurationError(
                f"reward '{self.name}': '{model}' at {self.base_url} does not classify ({reply.status_code}: "
                f"{reply.text[:200]}); serve the reward model with `vllm serve <model> --runner pooling`"
            )
        num_labels = len(reply.json()["data"][0]["probs"])
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        async with _translated(self.name, self.base_url):
            chat = await self._client.post(
                "/tokenize", json={"model": model, "messages": conversation, "add_generation_prompt": False}
            )
        self.model, self.max_model_len, self.num_labels = model, length, num_labels
        self.chat_template = chat.status_code == 200

    async def token_ids(self, conversation: list[dict] | None, text: str) -> list[int]:
        """The remote's tokens of ``conversation`` rendered with its chat template, or of ``text`` where
        it has none."""
        if self.chat_template and conversation is not None:
            body = {"model": self.model, "messages": conversation, "add_generation_prompt": False}
        else:
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        async with self._call("tokenize"):
            return _checked_json(self.name, await self._client.post("/tokenize", json=body))["tokens"]

    async def classify(self, batch: Sequence[Sequence[int]]) -> list[list[float]]:
        """Raw logits of every label, for each token-id sequence (one request: one continuous batch)."""
        body = {"model": self.model, "input": [list(ids) for ids in batch], "use_activation": False}
        async with self._call("classify"):
            data = _checked_json(self.name, await self._client.post("/classify", json=body))["data"]
        return [row["probs"] for row in sorted(data, key=lambda row: row["index"])]
