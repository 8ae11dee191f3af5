"""The head's data as tensors (:class:`HeadData`), its split by prompt, and the scale of its targets."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignd.train.data import TrainingError

if TYPE_CHECKING:
    import torch

    from alignd.train.value_head.features import Features


@dataclass
class HeadData:
    """States as tensors: ``hidden`` [N, d], ``candidates`` [N, k] (rows of ``table``, the candidates'
    input embeddings [U, d]), ``targets`` and ``sft_logprobs`` [N, k], and each state's prompt id."""

    hidden: torch.Tensor
    candidates: torch.Tensor
    table: torch.Tensor
    targets: torch.Tensor
    sft_logprobs: torch.Tensor
    prompt_ids: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def candidate_embeddings(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        index = self.candidates if rows is None else self.candidates[rows]
        return self.table[index]

    def subset(self, rows: Sequence[int]) -> HeadData:
        import torch

        index = torch.tensor(list(rows), dtype=torch.long)
        return HeadData(
            self.hidden[index],
            self.candidates[index],
            self.table,
            self.targets[index],
            self.sft_logprobs[index],
            [self.prompt_ids[i] for i in rows],
        )


def head_data(records: list[dict], features: Features) -> HeadData:
    import torch

    row_of = {slot: i for i, slot in enumerate(features.slots)}
    column_of = {token: i for i, token in enumerate(features.token_ids)}
    k = min(len(r["candidates"]) for r in records)
    return HeadData(
        hidden=features.hidden[torch.tensor([row_of[r["slot"]] for r in records])],
        candidates=torch.tensor([[column_of[z] for z in r["candidates"][:k]] for r in records], dtype=torch.long),
        table=features.token_embeddings,
        targets=torch.tensor([r["values"][:k] for r in records], dtype=torch.float32),
        sft_logprobs=torch.tensor([r["sft_logprobs"][:k] for r in records], dtype=torch.float32),
        prompt_ids=[r["prompt_id"] for r in records],
    )


def split_by_prompt(prompt_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a seeded ``fraction`` of the prompts (at least one, never all) and
    all their states are held out, so no prompt is on both sides."""
    unique = sorted(set(prompt_ids))
    if len(unique) < 2:
        raise TrainingError(f"the states come from {len(unique)} prompt(s): at least 2 are needed to hold some out")
    n_held = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held = set(random.Random(seed).sample(unique, n_held))
    train = [i for i, p in enumerate(prompt_ids) if p not in held]
    heldout = [i for i, p in enumerate(prompt_ids) if p in held]
    return train, heldout


def target_scale(targets: torch.Tensor) -> float:
    """The spread of the within-state centred targets (the loss's unit)."""
    centred = targets - targets.mean(dim=-1, keepdim=True)
    return float(centred.pow(2).mean().sqrt())
