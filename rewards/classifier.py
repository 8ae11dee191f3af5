"""A classifier reward model: any Hugging Face ``*ForSequenceClassification`` checkpoint.

The (chat, response) pair is rendered with the reward model's own chat template when it has one
(reward models are trained on that format), else as ``prompt + "\\n" + response``. The score is the
logit of ``label_index`` (the single logit of a ``num_labels=1`` reward head).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from alignd.errors import ConfigurationError, ContextLengthError
from alignd.rewards.base import Reward, RewardItem, RewardScore

_BATCH = 16


class ClassifierReward(Reward):
    kind = "classifier"

    def __init__(self, name: str, model, tokenizer, *, label_index: int = 0, max_length: int | None = None) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label_index < num_labels:
            raise ConfigurationError(f"reward '{name}': label_index {label_index} outside the model's {num_labels} labels")
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
        if getattr(self.tokenizer, "chat_template", None):
            chat = item.chat() + [{"role": "assistant", "content": item.response}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return f"{item.prompt_text()}\n{item.response}"

    @torch.inference_mode()
    def _score_sync(self, texts: list[str], truncate: bool) -> list[tuple[float, bool]]:
        out = []
        for start in range(0, len(texts), _BATCH):
            chunk = texts[start : start + _BATCH]
            lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chunk]
            too_long = [n for n in lengths if n > self.max_length]
            if too_long and not truncate:
                raise ContextLengthError(
                    f"reward '{self.name}': a text has {too_long[0]} tokens, above the reward model's limit of "
                    f"{self.max_length}; shorten it or send \"truncate\": true",
                    param="items",
                )
            batch = self.tokenizer(
                chunk, add_special_tokens=False, padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(**batch).logits.float()
            out.extend((float(v), n > self.max_length) for v, n in zip(logits[:, self.label_index].tolist(), lengths))
        return out

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        texts = [self.render(i) for i in items]

        def locked():
            with self._lock:
                return self._score_sync(texts, truncate)

        return [RewardScore(v, truncated=cut) for v, cut in await asyncio.to_thread(locked)]
