"""``--shard K/N``: several processes make one run's states together, each in a file of its own, and the
command without ``--shard`` merges their files; ``flock`` locks tell a running shard from a finished one."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignd.train.data import TrainingInputError, append_work_records, read_work_file, require
from alignd.train.value_head.options import STATES_FILE

if TYPE_CHECKING:
    from alignd.train.value_head.slots import StateSlot


@dataclass(frozen=True)
class Shard:
    """``--shard K/N``: the states of the slots whose index is K modulo N, written to a file of their own,
    so that N processes (one per core: every vLLM engine of a process computes on one core here) make a
    run's states together; the command without ``--shard`` then merges the shards and trains."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise TrainingInputError(f"--shard {text!r} is not K/N (for example 0/2)") from None
        require([(count >= 2 and 0 <= index < count, f"--shard {text}: N must be >= 2 and K in 0..N-1")])
        return cls(index, count)

    @property
    def file(self) -> str:
        return f"states.shard-{self.index}-of-{self.count}.jsonl"

    def owns(self, slot: StateSlot) -> bool:
        return slot.index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


SHARD_GLOB = "states.shard-*-of-*.jsonl"


@contextmanager
def locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block; yields whether it was taken
    (always, when ``wait``). A lock dies with its process, so a killed shard never blocks the merge."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_shards(partial: Path) -> int:
    """Append the states of finished ``--shard`` runs to the run's states file and remove their files;
    returns the number of states added. A shard still being made (its process holds the lock on its
    file) is an error that names it, and nothing is merged: merging it now would lose what it adds later."""
    shard_files = sorted(partial.glob(SHARD_GLOB))
    with ExitStack() as locks:
        for shard_file in shard_files:
            if not locks.enter_context(locked(shard_file, wait=False)):
                raise TrainingInputError(
                    f"{shard_file.name} is still being made by a running --shard process: wait "
                    "for it to finish (or stop it) before training"
                )
        have = {r["slot"] for r in read_work_file(partial / STATES_FILE)}
        added = 0
        for shard_file in shard_files:
            new = [r for r in read_work_file(shard_file) if r["slot"] not in have]
            if new:
                append_work_records(partial / STATES_FILE, new)
            have.update(r["slot"] for r in new)
            added += len(new)
            shard_file.unlink()
    return added
