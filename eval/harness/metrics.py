"""The evaluation's metrics: per response (diversity, repetition, AFINN, the KL's top-k truncation part, how
much the values steered), per method (win rates, loop share, the summary of a method's responses) and the
prompt-response coherence from sentence embeddings."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from functools import lru_cache

from tqdm import tqdm


def ngram_repetition(words: Sequence[str], n: int) -> float:
    """rep_n = 1 - unique n-grams / n-grams (0 when there are no n-grams: nothing repeats)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def diversity(text: str, orders: Sequence[int] = (2, 3, 4)) -> float:
    """The paper's diversity of one response: prod_n (1 - rep_n) over whitespace-split words."""
    words = text.split()
    score = 1.0
    for n in orders:
        score *= 1.0 - ngram_repetition(words, n)
    return score


def repetition(text: str) -> float:
    """rep_3 of one response: the share of its word 3-grams that repeat an earlier one."""
    return ngram_repetition(text.split(), 3)


# A response whose 3-grams mostly repeat is stuck in a loop ("I am happy. I am happy. I am ...").
LOOP_REPETITION = 0.5


def loop_share(records: Sequence[dict]) -> float:
    """The share of responses stuck in a loop (repetition above LOOP_REPETITION)."""
    if not records:
        return float("nan")
    return sum(1 for r in records if r["repetition"] > LOOP_REPETITION) / len(records)


AFINN_MAX_VALENCE = 5.0  # the lexicon's valences are integers in -5..5


@lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn  # the `test` extra; only the evaluation needs it

    return Afinn()


def afinn_score(text: str) -> float:
    """The second judge: AFINN valence per whitespace-split word / 5, in [-1, 1] (0 without words).

    Per word, so that a long answer does not out-score a short one by length alone; divided by the
    largest valence, so that it reads on the target reward's [-1, 1] scale. Clipped because AFINN finds
    words inside punctuation-joined ones ("good,great" is one whitespace word and two matches)."""
    words = len(text.split())
    if words == 0:
        return 0.0
    per_word = _afinn().score(text) / (AFINN_MAX_VALENCE * words)
    return max(-1.0, min(1.0, per_word))


def win_rate(rewards: Sequence[float], reference: Sequence[float], tol: float = 1e-9) -> float:
    """Share of prompts where ``rewards`` beats ``reference`` (paired by prompt); a tie counts 1/2."""
    if len(rewards) != len(reference):
        raise ValueError("win_rate needs one reference reward per reward")
    if not rewards:
        return float("nan")
    score = 0.0
    for r, ref in zip(rewards, reference, strict=False):
        score += 1.0 if r > ref + tol else (0.5 if abs(r - ref) <= tol else 0.0)
    return score / len(rewards)


def win_tie_rate(
    records: Sequence[dict], reference: Sequence[dict], key: str = "reward", tol: float = 1e-9
) -> float | None:
    """The share of the prompts both answered where a record's ``key`` is at least the reference's on
    the same prompt, a tie within ``tol`` counting as a win (TQ*'s win-tie rate against CD). None when
    they share no prompt."""
    theirs = {r["prompt_id"]: r[key] for r in reference}
    pairs = [(r[key], theirs[r["prompt_id"]]) for r in records if r["prompt_id"] in theirs]
    if not pairs:
        return None
    return sum(1 for ours, ref in pairs if ours >= ref - tol) / len(pairs)


def best_of_n_kl(n: int) -> float:
    from alignd.decoding.methods import kl_bound_best_of_n  # the one statement of the bound

    return kl_bound_best_of_n(n)


def truncation_kl(steps: Sequence[dict]) -> float:
    """The part of a value-guided response's KL that comes from keeping only the top-k tokens: per
    decision -log(SFT probability mass of the candidates), which KL(pi || pi_sft) includes at any alpha
    (KL(pi || pi_sft) = KL(pi || pi_sft restricted to the candidates) - log mass)."""
    total = 0.0
    for step in steps:
        candidates = step.get("candidates")
        if step.get("gated") or not candidates or "sft_logprob" not in candidates[0]:
            continue
        total -= math.log(min(1.0, sum(math.exp(c["sft_logprob"]) for c in candidates)))
    return total


def value_guidance(steps: Sequence[dict]) -> dict | None:
    """How much the values steered a value-guided answer, from its diagnostics: over the decisions whose
    candidates all have an estimated value (not gated, none pruned), ``value_spread`` is the mean of max - min of
    Q over the top-k, and ``flip_share`` the share of decisions whose chosen token is not the SFT
    model's own top candidate. A baseline whose rollouts end well whatever the candidate gives flat Q
    (small spread): then the values cannot tell the candidates apart, and the answer stays SFT greedy's.
    None for other methods."""
    spreads, flips = [], []
    for step in steps:
        candidates = step.get("candidates") or []
        if step.get("gated") or not candidates or "sft_logprob" not in candidates[0]:
            continue
        values = [c.get("value") for c in candidates]
        # a pruned candidate carries the reward's lower bound, not an estimate (decoding.methods)
        if any(v is None for v in values) or (step.get("cost") or {}).get("pruned"):
            continue
        spreads.append(max(values) - min(values))
        top = max(candidates, key=lambda c: c["sft_logprob"])["token_id"]
        flips.append(float(step["chosen"][0] != top))
    if not spreads:
        return None
    return {
        "value_spread": sum(spreads) / len(spreads),
        "flip_share": sum(flips) / len(flips),
        "valued_decisions": len(spreads),
    }


def add_text_metrics(records: list[dict], cosines: dict[tuple[str, str], float]) -> None:
    """Each response's text metrics, in place; AFINN once per distinct response."""
    afinn = {text: afinn_score(text) for text in {r["response"] for r in records}}
    for r in records:
        r["diversity"] = diversity(r["response"])
        r["repetition"] = repetition(r["response"])
        r["coherence"] = cosines[(r["prompt"], r["response"])]
        r["afinn"] = afinn[r["response"]]


def summarize(records: list[dict], reference: list[dict], cd: list[dict] | None = None) -> dict:
    """Means over one method's responses. ``reference``: SFT greedy's responses (win rates, paired by
    prompt); ``cd``: CD's at the same alpha, for a TQ* method's win-tie rates (None: not TQ*)."""
    sft = {r["prompt_id"]: r for r in reference}
    rewards = [r["reward"] for r in records]
    afinn = [r["afinn"] for r in records]
    return {
        "n": len(records),
        "mean_reward": statistics.fmean(rewards),
        "win_rate": win_rate(rewards, [sft[r["prompt_id"]]["reward"] for r in records]),
        "win_tie_vs_cd": None if cd is None else win_tie_rate(records, cd, "reward"),
        "kl": statistics.fmean(r["kl"] for r in records),
        "kl_truncation": statistics.fmean(r["kl_truncation"] for r in records),
        "diversity": statistics.fmean(r["diversity"] for r in records),
        "repetition": statistics.fmean(r["repetition"] for r in records),
        "loops": loop_share(records),
        "coherence": statistics.fmean(r["coherence"] for r in records),
        "afinn": statistics.fmean(afinn),
        "afinn_win_rate": win_rate(afinn, [sft[r["prompt_id"]]["afinn"] for r in records]),
        "win_tie_vs_cd_afinn": None if cd is None else win_tie_rate(records, cd, "afinn"),
        "mean_output_tokens": statistics.fmean(r["output_tokens"] for r in records),
        # value-head rows: the share of decisions the transformers replay makes as the engine did
        "replay_agreement": (
            statistics.fmean(r["replay_agreement"] for r in records)
            if all(r.get("replay_agreement") is not None for r in records)
            else None
        ),
    }


async def coherences(records: list[dict], embedder, progress: bool) -> dict[tuple[str, str], float]:
    """Prompt-response cosine of every distinct (prompt, response), once."""
    if embedder is None:
        from sentence_embeddings import SentenceEmbedder

        embedder = await asyncio.to_thread(SentenceEmbedder)
    pairs = sorted({(r["prompt"], r["response"]) for r in records})
    cosines: dict[tuple[str, str], float] = {}
    chunk = 64
    for start in tqdm(range(0, len(pairs), chunk), desc="coherence embeddings", disable=not progress, unit="batch"):
        part = pairs[start : start + chunk]
        values = await asyncio.to_thread(embedder.cosine, [p for p, _ in part], [r for _, r in part])
        cosines.update(zip(part, values, strict=False))
    return cosines
