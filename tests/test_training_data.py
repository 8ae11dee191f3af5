"""The hand-written training data in train/data/: well-formed JSON lines, enough of them, demonstration
responses of the agreed length, and no training prompt that is, or nearly is, an evaluation prompt
(eval/prompts.jsonl). Fast: plain text checks, no model."""

from __future__ import annotations

import json
import re
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "train" / "data"
PROMPTS = DATA_DIR / "prompts.jsonl"
DEMONSTRATIONS = DATA_DIR / "demonstrations.jsonl"
EVAL_PROMPTS = ROOT / "eval" / "prompts.jsonl"

MIN_PROMPTS = 400
MIN_DEMONSTRATIONS = 250
MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS = 25, 70

# Near-duplicate rule, on normalised text (see normalise): a training prompt is too close to an
# evaluation prompt when ANY of these holds.
#  - token-set Jaccard >= 0.6: a 4-word prompt with one word swapped scores 3/5 = 0.6, longer ones more;
#  - word-level edit distance <= 1: "the same sentence with one word changed" (or added, or dropped),
#    whatever its length;
#  - character similarity (difflib ratio) >= 0.85: small edits spread over several words that the token
#    views miss ("What causes thunder?" / "What caused the thunder?": Jaccard 0.4, two word edits).
JACCARD_MAX = 0.6
WORD_EDIT_MIN = 2
CHAR_RATIO_MAX = 0.85
# Character ratios are computed exactly only where difflib's cheap upper bounds reach this.
REPORT_CHAR_RATIO_FROM = 0.75
# No opening (first two words of a demonstration response) may start more than this share of them.
MAX_OPENING_SHARE = 0.10


def normalise(text: str) -> str:
    """Lower-case, punctuation dropped (apostrophes too, so "what's" -> "whats"), whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


class Text:
    """A prompt normalised once: its text, word list and word set (the pair loop runs ~80k times)."""

    __slots__ = ("norm", "words", "wordset", "matcher")

    def __init__(self, raw: str) -> None:
        self.norm = normalise(raw)
        self.words = self.norm.split()
        self.wordset = frozenset(self.words)
        # difflib caches its index of the second sequence: one matcher per text, compared as "b"
        self.matcher = SequenceMatcher(None, autojunk=False)
        self.matcher.set_seq2(self.norm)


def _jaccard(a: Text, b: Text) -> float:
    union = a.wordset | b.wordset
    return len(a.wordset & b.wordset) / len(union) if union else 1.0


def _word_edit_distance(a: Text, b: Text) -> int:
    """Levenshtein distance over words. Word counts 2+ apart already put it at 2 or more, which is all the
    rule needs, so those pairs return that bound instead of the exact distance."""
    wa, wb = a.words, b.words
    if abs(len(wa) - len(wb)) >= WORD_EDIT_MIN:
        return abs(len(wa) - len(wb))
    row = list(range(len(wb) + 1))
    for i, x in enumerate(wa, 1):
        diag, row[0] = row[0], i
        for j, y in enumerate(wb, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return row[len(wb)]


def _char_ratio(a: Text, b: Text) -> float | None:
    """difflib's ratio of the normalised texts, or None where its cheap upper bounds are already under
    REPORT_CHAR_RATIO_FROM, well below the limit (computing every pair exactly takes ~10 s)."""
    matcher = b.matcher
    matcher.set_seq1(a.norm)
    if matcher.real_quick_ratio() < REPORT_CHAR_RATIO_FROM or matcher.quick_ratio() < REPORT_CHAR_RATIO_FROM:
        return None
    return matcher.ratio()


def jaccard(a: str, b: str) -> float:
    return _jaccard(Text(a), Text(b))


def word_edit_distance(a: str, b: str) -> int:
    return _word_edit_distance(Text(a), Text(b))


def char_ratio(a: str, b: str) -> float:
    return SequenceMatcher(None, normalise(a), normalise(b), autojunk=False).ratio()


def is_near_duplicate(a: str, b: str) -> bool:
    return (
        jaccard(a, b) >= JACCARD_MAX or word_edit_distance(a, b) < WORD_EDIT_MIN or char_ratio(a, b) >= CHAR_RATIO_MAX
    )


def load_jsonl(path: Path) -> list[dict]:
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{lineno}: blank line"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{path.name}:{lineno}: not valid JSON ({exc})")
        assert isinstance(row, dict), f"{path.name}:{lineno}: not a JSON object"
        rows.append(row)
    return rows


def check_fields(rows: list[dict], path: Path, fields: tuple[str, ...]) -> None:
    for lineno, row in enumerate(rows, 1):
        for field in fields:
            value = row.get(field)
            assert isinstance(value, str) and value.strip(), (
                f"{path.name}:{lineno}: field {field!r} missing or not a non-empty string: {row!r}"
            )


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return load_jsonl(PROMPTS)


@pytest.fixture(scope="module")
def demonstrations() -> list[dict]:
    return load_jsonl(DEMONSTRATIONS)


@pytest.fixture(scope="module")
def eval_prompts() -> list[dict]:
    return load_jsonl(EVAL_PROMPTS)


def training_texts(prompts, demonstrations) -> list[tuple[str, str]]:
    """(where, prompt text) for every training prompt and every demonstration prompt."""
    return [(f"prompts.jsonl {r['id']}", r["prompt"]) for r in prompts] + [
        (f"demonstrations.jsonl {r['id']}", r["prompt"]) for r in demonstrations
    ]


# ---------------------------------------------------------------------------- the detector itself
def test_near_duplicate_rule_by_hand():
    assert normalise("  What's   the PLAN, today?! ") == "whats the plan today"
    # one word changed, added or dropped: caught at any length
    assert is_near_duplicate("How do you feel about foggy mornings?", "How do you feel about Monday mornings?")
    assert is_near_duplicate("What is gravity?", "What is magnetism?")
    assert word_edit_distance("Why do cats purr?", "Why do cats purr loudly?") == 1
    # two words added to a short prompt: most of its words are shared
    assert jaccard("Why do cats purr?", "Why do cats purr so loudly?") == pytest.approx(4 / 6)
    # small edits the token views miss (jaccard 0.4, two word edits): the character ratio catches them
    assert char_ratio("What causes thunder?", "What caused the thunder?") >= CHAR_RATIO_MAX
    assert is_near_duplicate("What causes thunder?", "What caused the thunder?")
    # same template, different subject: allowed
    assert not is_near_duplicate("What do you think of open-plan offices?", "What do you think of alarm clocks?")
    assert jaccard("a b c d", "a b c e") == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------- prompts.jsonl
def test_prompts_well_formed(prompts):
    check_fields(prompts, PROMPTS, ("id", "category", "prompt"))
    assert len(prompts) >= MIN_PROMPTS, f"{len(prompts)} prompts, want at least {MIN_PROMPTS}"
    ids = Counter(r["id"] for r in prompts)
    assert not [i for i, n in ids.items() if n > 1], f"duplicate ids: {[i for i, n in ids.items() if n > 1]}"
    for r in prompts:
        assert re.fullmatch(r"[a-z]+-\d{3}", r["id"]) and r["id"].rsplit("-", 1)[0] == r["category"], (
            f"id {r['id']!r} is not '<category>-<nnn>' for category {r['category']!r}"
        )
    texts = Counter(normalise(r["prompt"]) for r in prompts)
    assert not [t for t, n in texts.items() if n > 1], f"repeated prompts: {[t for t, n in texts.items() if n > 1]}"


def test_prompts_cover_the_eval_categories(prompts, eval_prompts):
    train_categories = {r["category"] for r in prompts}
    missing = {r["category"] for r in eval_prompts} - train_categories
    assert not missing, f"evaluation categories with no training prompts: {sorted(missing)}"


# ---------------------------------------------------------------------------- demonstrations.jsonl
def test_demonstrations_well_formed(demonstrations):
    check_fields(demonstrations, DEMONSTRATIONS, ("id", "prompt", "response"))
    assert len(demonstrations) >= MIN_DEMONSTRATIONS, (
        f"{len(demonstrations)} demonstrations, want at least {MIN_DEMONSTRATIONS}"
    )
    ids = Counter(r["id"] for r in demonstrations)
    assert not [i for i, n in ids.items() if n > 1], f"duplicate ids: {[i for i, n in ids.items() if n > 1]}"
    assert all(re.fullmatch(r"demo-\d{3,}", r["id"]) for r in demonstrations)
    texts = Counter(normalise(r["prompt"]) for r in demonstrations)
    assert not [t for t, n in texts.items() if n > 1], f"repeated prompts: {[t for t, n in texts.items() if n > 1]}"


def test_demonstration_responses_are_25_to_70_words(demonstrations):
    bad = [
        (r["id"], len(r["response"].split()))
        for r in demonstrations
        if not MIN_RESPONSE_WORDS <= len(r["response"].split()) <= MAX_RESPONSE_WORDS
    ]
    assert not bad, f"responses outside {MIN_RESPONSE_WORDS}-{MAX_RESPONSE_WORDS} words: {bad}"


def test_demonstration_openings_vary(demonstrations):
    openings = Counter(" ".join(normalise(r["response"]).split()[:2]) for r in demonstrations)
    opening, count = openings.most_common(1)[0]
    assert count <= MAX_OPENING_SHARE * len(demonstrations), (
        f"{count} of {len(demonstrations)} responses open with {opening!r}"
    )


def test_demonstration_prompts_are_training_prompts(prompts, demonstrations):
    # train/data/README.md: every demonstration prompt is also a line of prompts.jsonl
    train = {normalise(r["prompt"]) for r in prompts}
    missing = [r["id"] for r in demonstrations if normalise(r["prompt"]) not in train]
    assert not missing, f"demonstration prompts not in prompts.jsonl: {missing}"


# ---------------------------------------------------------------------------- disjoint from the evaluation set
def test_no_training_prompt_is_an_eval_prompt(prompts, demonstrations, eval_prompts):
    eval_by_text = {normalise(r["prompt"]): r["id"] for r in eval_prompts}
    clashes = [
        (where, eval_by_text[normalise(text)])
        for where, text in training_texts(prompts, demonstrations)
        if normalise(text) in eval_by_text
    ]
    assert not clashes, f"training prompts identical to evaluation prompts: {clashes}"


def test_no_training_prompt_nearly_duplicates_an_eval_prompt(prompts, demonstrations, eval_prompts):
    evals = [(r["id"], r["prompt"], Text(r["prompt"])) for r in eval_prompts]
    offending = []
    closest = {"jaccard": (-1.0, None), "word edit distance": (10**9, None), "char ratio": (-1.0, None)}
    train = [(where, text, Text(text)) for where, text in training_texts(prompts, demonstrations)]
    for eval_id, eval_text, e in evals:
        for where, text, t in train:
            pair = (where, text, eval_id, eval_text)
            j, d, c = _jaccard(t, e), _word_edit_distance(t, e), _char_ratio(t, e)
            if j > closest["jaccard"][0]:
                closest["jaccard"] = (j, pair)
            if d < closest["word edit distance"][0] and abs(len(t.words) - len(e.words)) < WORD_EDIT_MIN:
                closest["word edit distance"] = (d, pair)
            if c is not None and c > closest["char ratio"][0]:
                closest["char ratio"] = (c, pair)
            if j >= JACCARD_MAX or d < WORD_EDIT_MIN or (c is not None and c >= CHAR_RATIO_MAX):
                offending.append((round(j, 3), d, c and round(c, 3), *pair))
    report = "\n".join(
        f"  closest by {name}: "
        + (
            f"under {REPORT_CHAR_RATIO_FROM} for every pair"
            if name == "char ratio" and value < REPORT_CHAR_RATIO_FROM  # only pairs above it are computed exactly
            else f"{round(value, 3)}  {pair}"
        )
        for name, (value, pair) in closest.items()
    )
    print(report)  # shown with -s, and on failure
    assert not offending, (
        f"{len(offending)} near-duplicate(s) of evaluation prompts "
        f"(jaccard >= {JACCARD_MAX}, word edit distance < {WORD_EDIT_MIN}, or char ratio >= {CHAR_RATIO_MAX}):\n"
        + "\n".join(f"  {o}" for o in offending[:20])
        + f"\n{report}"
    )
