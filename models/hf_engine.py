"""The Hugging Face ``transformers`` engine: the reference path.

It implements the same batched primitives as the vLLM engine with one padded, KV-cached decode loop
written here rather than ``model.generate``: the primitives need per-step raw log-probabilities,
per-row stop handling and token-by-token streaming with cancellation, which ``generate`` only offers
through a streamer thread and post-hoc score tensors. Model calls run in a worker thread, one at a
time, so the event loop stays free. It also runs caller code on the model under the same lock
(:meth:`HFEngine.run_on_model`), which is how hidden-state probes read its layers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from alignd.models.engine import (
    Engine,
    EngineInfo,
    FinishReason,
    GeneratedTokenLogprobs,
    GenerationParams,
    Rollout,
    StreamDelta,
    TokenLogprob,
)

# Rows per forward pass for the scoring primitives (top-k, continuation log-probabilities).
_SCORING_CHUNK = 32
T = TypeVar("T")


def text_config(config):
    """The language-model part of a ``transformers`` config (``text_config`` of a multimodal one)."""
    return getattr(config, "text_config", None) or config


def num_hidden_layers(config) -> int | None:
    """Decoder blocks of a ``transformers`` config (its text part), or None when it does not say."""
    value = getattr(text_config(config), "num_hidden_layers", None)
    return int(value) if value is not None else None


@dataclass
class _Row:
    """State of one sequence in the decode loop."""

    prefix: list[int]
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[GeneratedTokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class HFEngine(Engine):
    kind = "hf"
    applies_stop_strings = False  # stream() yields token ids; alignd.decoding assembles text

    def __init__(self, model, tokenizer, *, model_path: str = "", max_model_len: int | None = None) -> None:
        self.model = model.eval()
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._in_flight = 0  # engine calls started and not finished (threads included)
        config = model.config
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        if eos is None:
            eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.info = EngineInfo(
            model_path=model_path,
            max_model_len=min(max_model_len or limit, limit),
            vocab_size=int(config.vocab_size),
            eos_token_ids=eos_ids,
            num_layers=num_hidden_layers(config),
        )
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        max_model_len: int | None = None,
    ) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return cls(model, tokenizer, model_path=str(path), max_model_len=max_model_len)

    def with_adapter(self, name: str, path: str) -> HFEngine:
        """A copy of this model with the LoRA adapter merged into its weights (PEFT's merge): the
        reference path for adapters, and the engine of tiny-model tests."""
        import copy

        from peft import PeftModel

        merged = PeftModel.from_pretrained(copy.deepcopy(self.model), str(path)).merge_and_unload()
        return HFEngine(merged, self._tokenizer, model_path=str(path), max_model_len=self.info.max_model_len)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ the model itself (probes)
    @property
    def supports_hidden_states(self) -> bool:
        return True

    async def run_on_model(self, fn: Callable[[Any], T]) -> T:
        """``fn(self.model)`` in a worker thread under the engine's lock, so it never runs at the same
        time as generation or another model call. Not counted in :meth:`unfinished_requests` (it is
        not an engine request); a cancelled caller does not stop ``fn`` once it has started."""

        def locked() -> T:
            with self._lock:
                return fn(self.model)

        return await asyncio.to_thread(locked)

    # ------------------------------------------------------------------ model calls (worker thread)
    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
                mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, past=None):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if past is not None:
            position_ids = position_ids[:, -ids.shape[1] :]
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=past, use_cache=True
        )

    @torch.inference_mode()
    def _top_k_sync(self, prefixes: Sequence[Sequence[int]], k: int) -> list[list[TokenLogprob]]:
        out: list[list[TokenLogprob]] = []
        for start in range(0, len(prefixes), _SCORING_CHUNK):
            chunk = prefixes[start : start + _SCORING_CHUNK]
            ids, mask = self._left_pad(chunk)
            logits = self._forward(ids, mask).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=False):
                out.append([TokenLogprob(int(t), float(v)) for t, v in zip(row_i, row_v, strict=False)])
        return out

    @torch.inference_mode()
    def _next_token_sync(
        self, prefixes: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(prefixes), _SCORING_CHUNK):
            ids, mask = self._left_pad(prefixes[start : start + _SCORING_CHUNK])
            logprobs = torch.log_softmax(self._forward(ids, mask).logits[:, -1, :].float(), dim=-1)
            for row, wanted in zip(logprobs, token_ids[start : start + _SCORING_CHUNK], strict=False):
                out.append([float(row[z]) for z in wanted])
        return out

    @torch.inference_mode()
    def _continuation_sync(
        self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(prefixes), _SCORING_CHUNK):
            pairs = list(
                zip(
                    prefixes[start : start + _SCORING_CHUNK],
                    continuations[start : start + _SCORING_CHUNK],
                    strict=False,
                )
            )
            seqs = [list(p) + list(c) for p, c in pairs]
            ids, mask = self._left_pad(seqs)
            logprobs = torch.log_softmax(self._forward(ids, mask).logits.float(), dim=-1)
            width = ids.shape[1]
            for row, (_prefix, c) in enumerate(pairs):
                if not c:
                    out.append([])
                    continue
                # position j predicts token j+1; the continuation starts at column width - len(c)
                first = width - len(c)
                positions = torch.arange(first - 1, width - 1, device=ids.device)
                targets = ids[row, first:width]
                out.append(logprobs[row, positions, targets].tolist())
        return out

    def _sample_next(
        self, logits: torch.Tensor, rows: list[_Row], params: GenerationParams
    ) -> tuple[list[int], torch.Tensor]:
        """Pick the next token of every row from raw ``logits`` [rows, vocab]; returns the tokens and
        the raw log-probabilities (before temperature / top-p / penalties, as vLLM reports them)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        scores = logits.clone()
        if params.presence_penalty or params.frequency_penalty:
            for i, row in enumerate(rows):
                if row.tokens:
                    counts = torch.bincount(torch.tensor(row.tokens), minlength=scores.shape[-1]).to(scores)
                    scores[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(scores)
        if params.greedy:
            return scores.argmax(dim=-1).tolist(), raw_logprobs
        probs = torch.softmax(scores / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        tokens = [int(torch.multinomial(probs[i], 1, generator=row.generator)) for i, row in enumerate(rows)]
        return tokens, raw_logprobs

    @torch.inference_mode()
    def _decode_loop(
        self,
        rows: list[_Row],
        params: GenerationParams,
        on_step: Callable[[list[_Row]], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> list[_Row]:
        eos = set(self.info.eos_token_ids)
        ids, mask = self._left_pad([r.prefix for r in rows])
        out = self._forward(ids, mask)
        for _ in range(params.max_tokens):
            if cancelled is not None and cancelled.is_set():
                for r in rows:
                    r.finish_reason = r.finish_reason or "abort"
                break
            logits = out.logits[:, -1, :].float()
            tokens, raw = self._sample_next(logits, rows, params)
            for i, (row, tok) in enumerate(zip(rows, tokens, strict=False)):
                if row.finish_reason is not None:
                    continue
                row.tokens.append(tok)
                if params.logprobs is not None:
                    top = ()
                    if params.logprobs > 0:
                        v, ix = raw[i].topk(params.logprobs)
                        top = tuple(
                            TokenLogprob(int(t), float(x)) for t, x in zip(ix.tolist(), v.tolist(), strict=False)
                        )
                    row.logprobs.append(GeneratedTokenLogprobs(tok, float(raw[i, tok]), top))
                if tok in eos and not params.ignore_eos:
                    row.finish_reason = "stop"
                elif len(row.tokens) >= params.max_tokens:
                    row.finish_reason = "length"
            if on_step is not None:
                on_step(rows)
            if all(r.finish_reason is not None for r in rows):
                break
            step = torch.tensor(tokens, dtype=torch.long, device=ids.device).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
            out = self._forward(step, mask, past=out.past_key_values)
        for r in rows:
            r.finish_reason = r.finish_reason or "length"
        return rows

    def _make_generator(self, seed: int | None, offset: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(seed + offset)

    def unfinished_requests(self) -> int:
        return self._in_flight

    def _end_call(self) -> None:
        self._in_flight -= 1

    async def _run(self, fn, *args, **kwargs):
        # A cancelled caller cannot stop a forward pass already running in its thread; the call is
        # counted until the thread is done, so the gauge shows the work that really remains.
        def locked():
            with self._lock:
                return fn(*args, **kwargs)

        self._in_flight += 1
        work = asyncio.get_running_loop().run_in_executor(None, locked)
        work.add_done_callback(lambda _: self._end_call())  # runs on the loop's thread
        return await work

    # ------------------------------------------------------------------ primitives
    async def top_k_next(self, prefixes, k):
        if not prefixes:
            return []
        return await self._run(self._top_k_sync, prefixes, k)

    async def next_token_logprobs(self, prefixes, token_ids):
        if len(prefixes) != len(token_ids):
            raise ValueError("prefixes and token_ids must have the same length")
        if not prefixes:
            return []
        return await self._run(self._next_token_sync, prefixes, token_ids)

    async def continuation_logprobs(self, prefixes, continuations):
        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        if not prefixes:
            return []
        return await self._run(self._continuation_sync, prefixes, continuations)

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
        if not prefixes:
            return []
        rows = [_Row(list(p), self._make_generator(seed, i * n + j)) for i, p in enumerate(prefixes) for j in range(n)]
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        rows = await self._run(self._decode_loop, rows, params)
        out: list[list[Rollout]] = []
        for i in range(len(prefixes)):
            group = rows[i * n : (i + 1) * n]
            out.append([Rollout(r.tokens, r.finish_reason, self.decode(r.tokens)) for r in group])
        return out

    def check_params(self, params: GenerationParams) -> None:
        if params.value_guidance is not None:
            from alignd.errors import InvalidRequestError

            raise InvalidRequestError(
                "decoding.value='head' runs inside the vLLM engine's decode step (alignd.vllm_plugin); this server "
                "runs the transformers reference engine (ALIGND_ENGINE=hf): use decoding.value='rollouts'",
                param="decoding.value",
            )

    async def stream(self, prompt_token_ids, params, request_id) -> AsyncIterator[StreamDelta]:
        """Token ids only (``applies_stop_strings`` is False): text and stop strings are assembled by
        the caller (:mod:`alignd.decoding`), which closes this stream when every choice has stopped."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        rows = [_Row(list(prompt_token_ids), self._make_generator(params.seed, j)) for j in range(params.n)]
        emitted = [0] * len(rows)  # tokens already sent per row
        done = [False] * len(rows)
        prompt_count = len(prompt_token_ids)

        def deltas_for(current: list[_Row]) -> list[StreamDelta]:
            out = []
            for j, row in enumerate(current):
                if done[j] or (len(row.tokens) == emitted[j] and row.finish_reason is None):
                    continue
                new_lp = row.logprobs[emitted[j] :] if params.logprobs is not None else None
                out.append(StreamDelta(j, row.tokens[emitted[j] :], "", row.finish_reason, new_lp, prompt_count))
                emitted[j] = len(row.tokens)
                done[j] = row.finish_reason is not None
            return out

        def on_step(current: list[_Row]) -> None:
            for delta in deltas_for(current):
                loop.call_soon_threadsafe(queue.put_nowait, delta)

        def work():
            try:
                with self._lock:
                    self._decode_loop(rows, params, on_step, cancelled)
                for delta in deltas_for(rows):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except BaseException as exc:  # surfaced to the consumer below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        self._in_flight += 1
        worker = loop.run_in_executor(None, work)
        worker.add_done_callback(lambda _: self._end_call())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(worker)
