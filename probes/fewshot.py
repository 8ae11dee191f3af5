"""Few-shot multiple-choice prompts in the style of MMLU (Hendrycks et al.), as the probe paper uses.

One prompt, ``style="mmlu"``::

    The following are multiple choice questions (with answers) about high school physics.

    <shot question>
    A. <choice>
    B. <choice>
    Answer: B

    ...(more shots)...

    <question>
    A. <choice>
    B. <choice>
    Answer:

The prompt ends with ``"Answer:"``, so its last token is where the paper reads the representation.
``style="bare"`` drops the header line (a second prompt format for the same items).

Shots are drawn deterministically: for item ``i`` a random permutation of the candidate shots,
seeded by ``(seed, i)``, is taken and its first ``n`` entries are used, so the shots of an n-shot
prompt are the first shots of the (n+1)-shot prompt and one job can compare shot counts on the same
items. Candidates are the other items of the dataset (or a separate ``pool``, like MMLU's dev set),
never the item itself, and those of the item's subject when there are enough of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LETTERS = "ABCDEFGHIJ"
MAX_SHOTS = 5
Style = Literal["mmlu", "bare"]
STYLES = ("mmlu", "bare")


class FewShotItem(BaseModel):
    """One multiple-choice question. ``answer`` is a letter ("B") or a 0-based index (1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2, max_length=len(LETTERS))
    answer: str | int
    subject: str | None = None

    @model_validator(mode="after")
    def _answer_in_range(self) -> FewShotItem:
        n = len(self.choices)
        if isinstance(self.answer, bool):
            raise ValueError("answer must be a letter or a 0-based index, not a boolean")
        if isinstance(self.answer, int):
            if not 0 <= self.answer < n:
                raise ValueError(f"answer index {self.answer} is out of range for {n} choices (0..{n - 1})")
        else:
            letter = self.answer.strip().upper()
            if len(letter) != 1 or letter not in LETTERS[:n]:
                raise ValueError(f"answer {self.answer!r} is not one of the letters {', '.join(LETTERS[:n])}")
        return self

    @property
    def answer_index(self) -> int:
        return self.answer if isinstance(self.answer, int) else LETTERS.index(self.answer.strip().upper())

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]


def format_subject(subject: str | None) -> str:
    """``"high_school_physics"`` -> ``"high school physics"`` (MMLU's own formatting)."""
    return " ".join(subject.replace("_", " ").split()) if subject else ""


def format_example(item: FewShotItem, include_answer: bool = True) -> str:
    """The question, lettered choices and ``Answer:`` (followed by `` X\\n\\n`` for a shot)."""
    lines = [item.question.strip()]
    lines += [f"{LETTERS[j]}. {choice.strip()}" for j, choice in enumerate(item.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {item.answer_letter}\n\n" if include_answer else text


def header(subject: str | None) -> str:
    about = format_subject(subject)
    if about:
        return f"The following are multiple choice questions (with answers) about {about}.\n\n"
    return "The following are multiple choice questions (with answers).\n\n"


def build_prompt(item: FewShotItem, shots: Sequence[FewShotItem] = (), style: Style = "mmlu") -> str:
    """The prompt for ``item`` after ``shots`` (answered examples), ending with ``"Answer:"``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}; got {style!r}")
    body = "".join(format_example(s, include_answer=True) for s in shots) + format_example(item, include_answer=False)
    return (header(item.subject) if style == "mmlu" else "") + body


def select_shots(
    items: Sequence[FewShotItem],
    index: int,
    n_shots: int,
    *,
    seed: int = 0,
    pool: Sequence[FewShotItem] | None = None,
    same_subject: bool = True,
) -> list[FewShotItem]:
    """``n_shots`` shots for ``items[index]``, deterministic in ``(seed, index)``.

    Candidates: ``pool`` if given, else the other items (never ``items[index]``, nor any item with
    the same question). With ``same_subject`` and enough candidates of the item's subject, only
    those; otherwise any candidate. Shots are nested: the n-shot list is a prefix of the (n+1)-shot one.
    """
    if n_shots < 0:
        raise ValueError(f"n_shots must be >= 0; got {n_shots}")
    if n_shots == 0:
        return []
    item = items[index]
    source = list(pool) if pool is not None else [c for j, c in enumerate(items) if j != index]
    candidates = [c for c in source if c.question.strip() != item.question.strip()]
    if same_subject and item.subject is not None:
        same = [c for c in candidates if c.subject == item.subject]
        if len(same) >= n_shots:
            candidates = same
    if len(candidates) < n_shots:
        raise ValueError(
            f"item {index} needs {n_shots} shots but only {len(candidates)} other items can serve as shots; "
            "add items (or a shot pool) or use fewer shots"
        )
    rng = random.Random(f"alignd-fewshot:{seed}:{index}")  # str seeds are stable across runs
    order = list(range(len(candidates)))
    rng.shuffle(order)
    return [candidates[j] for j in order[:n_shots]]


def build_prompts(
    items: Sequence[FewShotItem],
    n_shots: int,
    *,
    seed: int = 0,
    style: Style = "mmlu",
    pool: Sequence[FewShotItem] | None = None,
    same_subject: bool = True,
) -> list[str]:
    """One ``n_shots``-shot prompt per item, in item order."""
    return [
        build_prompt(item, select_shots(items, i, n_shots, seed=seed, pool=pool, same_subject=same_subject), style)
        for i, item in enumerate(items)
    ]


def dataset_labels(items: Sequence[FewShotItem]) -> dict[str, list[str]]:
    """Label sets a dataset brings: ``answer`` (the letter) always, ``subject`` when every item has one."""
    labels = {"answer": [it.answer_letter for it in items]}
    if items and all(it.subject for it in items):
        labels = {"subject": [str(it.subject) for it in items], **labels}
    return labels


def load_jsonl(path) -> list[FewShotItem]:
    """Items from a JSON-lines file (one object per line, blank lines skipped)."""
    import json
    from pathlib import Path

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(FewShotItem.model_validate(json.loads(line)))
            except Exception as exc:  # say which line
                raise ValueError(f"{path}:{n}: {exc}") from exc
    return out
