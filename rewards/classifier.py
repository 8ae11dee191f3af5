"""A classifier reward model: any Hugging Face ``*ForSequenceClassification`` checkpoint.

The (chat, response) pair is rendered with the reward model's own chat template when it has one
(reward models are trained on that format), else as ``prompt + "\\n" + response``. The score is the
raw logit of ``label_index`` (the single logit of a ``num_labels=1`` reward head).

Two backends: :class:`VLLMClassifierReward` runs the checkpoint on vLLM's pooling runner (batched
with continuous batching, where vLLM supports the architecture); :class:`ClassifierReward` runs it
with ``transformers`` (any architecture). :func:`load_classifier` picks one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from alignd.errors import ConfigurationError, ContextLengthError
from alignd.models.platform import engine_dtype
from alignd.rewards.base import Reward, RewardItem, RewardScore

_BATCH = 16
logger = logging.getLogger(__name__)


def render_pair(tokenizer, item: RewardItem) -> str:
    if getattr(tokenizer, "chat_template", None):
        chat = item.chat() + [{"role": "assistant", "content": item.response}]
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return f"{item.prompt_text()}\n{item.response}"


def too_long_error(name: str, tokens: int, limit: int) -> ContextLengthError:
    return ContextLengthError(
        f"reward '{name}': a text has {tokens} tokens, above the reward model's limit of {limit}; "
        'shorten it or send "truncate": true',
        param="items",
    )


class ClassifierReward(Reward):
    kind = "classifier"

    def __init__(self, name: str, model, tokenizer, *, label_index: int = 0, max_length: int | None = None) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label_index < num_labels:
            raise ConfigurationError(
                f"reward '{name}': label_index {label_index} outside the model's {num_labels} labels"
            )
        self.label_index = label_index
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # the classification head reads the last non-padding token; it must know the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length or limit, limit)
        self._lock = threading.Lock()
        self.description = f"classifier {getattr(model.config, '_name_or_path', '')}, label {label_index}"

    @classmethod
    def from_pretrained(cls, name: str, path: str | Path, *, dtype=torch.float32, **kwargs) -> ClassifierReward:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"reward '{name}': cannot load a sequence classifier from {path}: {exc}") from exc
        return cls(name, model, tokenizer, **kwargs)

    def render(self, item: RewardItem) -> str:
        return render_pair(self.tokenizer, item)

    @torch.inference_mode()
    def _score_sync(self, texts: list[str], truncate: bool) -> list[tuple[float, bool]]:
        out = []
        for start in range(0, len(texts), _BATCH):
            chunk = texts[start : start + _BATCH]
            lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chunk]
            too_long = [n for n in lengths if n > self.max_length]
            if too_long and not truncate:
                raise too_long_error(self.name, too_long[0], self.max_length)
            batch = self.tokenizer(
                chunk,
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(**batch).logits.float()
            out.extend(
                (float(v), n > self.max_length)
                for v, n in zip(logits[:, self.label_index].tolist(), lengths, strict=False)
            )
        return out

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        texts = [self.render(i) for i in items]

        def locked():
            with self._lock:
                return self._score_sync(texts, truncate)

        return [RewardScore(v, truncated=cut) for v, cut in await asyncio.to_thread(locked)]


class VLLMClassifierReward(Reward):
    """The classifier on vLLM's pooling runner: every item is one pooling request, all submitted at
    once, so a batch is one continuous batch in the engine."""

    kind = "classifier"

    def __init__(self, name: str, llm, tokenizer, *, label_index: int = 0, max_length: int) -> None:
        self.name = name
        self._llm = llm
        self.tokenizer = tokenizer
        self.label_index = label_index
        self.max_length = max_length
        self.description = f"classifier on vLLM's pooling runner, label {label_index}"

    @classmethod
    def start(cls, name: str, path: str, settings, *, label_index: int = 0, max_length: int | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=path,
            runner="pooling",
            dtype=engine_dtype(settings.dtype),
            enforce_eager=settings.enforce_eager,
            max_model_len=max_length or settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            seed=settings.seed,
        )
        llm = AsyncLLM.from_engine_args(args)
        num_labels = int(getattr(llm.model_config.hf_config, "num_labels", 1))
        if not 0 <= label_index < num_labels:
            llm.shutdown()
            raise ConfigurationError(
                f"reward '{name}': label_index {label_index} outside the model's {num_labels} labels"
            )
        return cls(name, llm, llm.get_tokenizer(), label_index=label_index, max_length=llm.model_config.max_model_len)

    async def _one(self, ids: list[int]) -> float:
        from vllm import PoolingParams

        params = PoolingParams(task="classify", use_activation=False)  # the raw logit, like the HF path
        final = None
        async for out in self._llm.encode({"prompt_token_ids": ids}, params, request_id=f"rm-{uuid.uuid4().hex}"):
            final = out
        return float(final.outputs.data.flatten()[self.label_index])

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        encoded = [self.tokenizer(render_pair(self.tokenizer, i), add_special_tokens=False)["input_ids"] for i in items]
        too_long = [len(ids) for ids in encoded if len(ids) > self.max_length]
        if too_long and not truncate:
            raise too_long_error(self.name, too_long[0], self.max_length)
        values = await asyncio.gather(*(self._one(ids[: self.max_length]) for ids in encoded))
        return [RewardScore(v, truncated=len(ids) > self.max_length) for v, ids in zip(values, encoded, strict=False)]

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


class RemoteClassifierReward(Reward):
    """The classifier on a remote ``vllm serve --runner pooling`` (the spec's ``url``): rendered and
    tokenized by the remote, all items of a request scored in one ``/classify`` call. While the remote is
    down, scoring is a 503 ``engine_unavailable``."""

    kind = "classifier"

    def __init__(self, name: str, remote, *, label_index: int = 0) -> None:
        self.name = name
        self.remote = remote  # alignd.models.remote_engine.RemoteVLLMClassifier (closed by the registry)
        self.label_index = label_index
        self.description = f"classifier '{remote.model or 'its only model'}' at {remote.base_url}, label {label_index}"
        self._check_label()

    def _check_label(self) -> None:
        labels = self.remote.num_labels
        if labels is not None and not 0 <= self.label_index < labels:
            raise ConfigurationError(
                f"reward '{self.name}': label_index {self.label_index} outside the model's {labels} labels"
            )

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        conversations = [[*item.chat(), {"role": "assistant", "content": item.response}] for item in items]
        texts = [f"{item.prompt_text()}\n{item.response}" for item in items]
        encoded = await asyncio.gather(
            *(self.remote.token_ids(c, t) for c, t in zip(conversations, texts, strict=False))
        )
        self._check_label()  # a remote that was down at start is known only now
        limit = self.remote.max_model_len
        too_long = [len(ids) for ids in encoded if len(ids) > limit]
        if too_long and not truncate:
            raise too_long_error(self.name, too_long[0], limit)
        logits = await self.remote.classify([ids[:limit] for ids in encoded])
        return [
            RewardScore(float(row[self.label_index]), truncated=len(ids) > limit)
            for row, ids in zip(logits, encoded, strict=False)
        ]


def load_classifier(
    name: str, path: str, settings, *, backend: str = "auto", label_index: int = 0, max_length: int | None = None
) -> Reward:
    """``backend``: "vllm" (pooling runner, fails if vLLM cannot run the architecture), "hf"
    (transformers), or "auto" (vLLM when the server runs on vLLM and vLLM accepts the model, else
    transformers, with the reason logged)."""
    if backend not in ("auto", "vllm", "hf"):
        raise ConfigurationError(f"reward '{name}': backend must be auto, vllm or hf, not {backend!r}")
    if backend == "vllm" or (backend == "auto" and settings.engine == "vllm"):
        try:
            return VLLMClassifierReward.start(name, path, settings, label_index=label_index, max_length=max_length)
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM signals unsupported models in many ways
            if backend == "vllm":
                raise ConfigurationError(f"reward '{name}': vLLM's pooling runner cannot run {path}: {exc}") from exc
            logger.warning("reward %s: vLLM's pooling runner cannot run %s (%s); using transformers", name, path, exc)
    return ClassifierReward.from_pretrained(name, path, label_index=label_index, max_length=max_length)
