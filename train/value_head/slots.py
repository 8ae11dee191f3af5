"""State slots: the i-th state of a run, its prompt and its seeds (shared by rollout and implicit targets)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from alignd.train.data import PromptRecord


def _derived_seed(seed: int, slot: int, stream: int) -> int:
    # Distinct, reproducible seeds per state slot and per use (answer, cut, rollouts).
    return (seed * 1_000_003 + slot * 7919 + stream * 104_729) % (2**31)


@dataclass(frozen=True)
class StateSlot:
    """The i-th state of a run: its prompt and its seeds. Slots do not depend on the number of states,
    so a resumed run with more ``--states`` keeps the finished ones and adds new slots after them."""

    index: int
    prompt: PromptRecord
    seed: int

    @property
    def answer_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 0)

    @property
    def cut_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 1)

    @property
    def rollout_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 2)


def state_slots(prompts: Sequence[PromptRecord], n: int, seed: int) -> list[StateSlot]:
    """``n`` slots over the prompts, round-robin in a seeded order (every prompt gets n / P states)."""
    order = random.Random(seed).sample(list(prompts), len(prompts))
    return [StateSlot(i, order[i % len(order)], seed) for i in range(n)]
