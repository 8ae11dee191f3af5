"""The alignment-quality harness (eval/quality.py): its metric functions on hand-made inputs, and its
smoke mode in-process on the session's vLLM engine (shape and sanity of the output, not the numbers)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"
sys.path.insert(0, str(EVAL_DIR))

import quality  # noqa: E402  (eval/ is a folder of scripts, not a package)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- metric functions
def test_diversity_by_hand():
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 unique of 5, rep_2 = 3/5; trigrams aba bab aba bab ->
    # 2 of 4, rep_3 = 1/2; 4-grams abab baba abab -> 2 of 3, rep_4 = 1/3.
    assert quality.diversity("a b a b a b") == pytest.approx((2 / 5) * (1 / 2) * (2 / 3))
    # no repeated n-gram at all
    assert quality.diversity("the quick brown fox jumps") == 1.0
    # "x x x x": bigram xx 1 of 3, trigram 1 of 2, 4-gram 1 of 1 -> (1/3) * (1/2) * 1
    assert quality.diversity("x x x x") == pytest.approx(1 / 6)
    # too short for any n-gram of an order: that order repeats nothing
    assert quality.diversity("hello") == 1.0 and quality.diversity("") == 1.0
    assert quality.ngram_repetition("a a".split(), 2) == 0.0
    assert quality.ngram_repetition("a a a".split(), 2) == pytest.approx(0.5)


def test_win_rate_by_hand():
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert quality.win_rate([0.9, 0.2, -0.1, 0.5], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.625)
    assert quality.win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert quality.win_rate([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        quality.win_rate([1.0], [1.0, 2.0])


def test_best_of_n_kl_and_truncation_kl_by_hand():
    assert quality.best_of_n_kl(1) == 0.0
    assert quality.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    steps = [
        {"gated": False, "candidates": [{"sft_logprob": math.log(0.5)}, {"sft_logprob": math.log(0.25)}]},
        {"gated": True, "candidates": [{"sft_logprob": math.log(0.1)}]},
        {"gated": False, "candidates": [{"sft_logprob": 0.0}]},
    ]
    assert quality.truncation_kl(steps) == pytest.approx(-math.log(0.75))


def test_prompts_file_is_well_formed():
    prompts = quality.load_prompts()
    assert len(prompts) >= 100
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert all(p["prompt"].strip() and p["category"] for p in prompts)


# ---------------------------------------------------------------------------- smoke run on vLLM
@pytest.mark.vllm
def test_smoke_evaluation_in_process(vllm_engine, embedded_settings, loop_thread, tmp_path):
    plan = quality.Plan.smoke()
    prompts = quality.load_prompts(limit=4)
    results = loop_thread.run(quality.evaluate(vllm_engine, embedded_settings, prompts, plan, progress=False))
    paths = quality.write_outputs(results, tmp_path / "out", tmp_path / "frontier.png")

    keys = [r.key for r in plan.main_runs()]
    assert keys == list(results["summary"])
    labels = {s["label"] for s in results["summary"].values()}
    assert {"SFT greedy", "SFT sampling", "Best-of-4", "Best-of-16", "ARGS", "CD (token-wise)", "TQ* direct",
            "TQ* indirect"} <= labels
    assert len(results["responses"]) == len(keys) * len(prompts)
    for key, s in results["summary"].items():
        assert s["n"] == len(prompts), key
        assert math.isfinite(s["mean_reward"]) and -1.0 <= s["mean_reward"] <= 1.0, key
        assert 0.0 <= s["win_rate"] <= 1.0, key
        assert s["kl"] >= 0.0, key
        assert 0.0 <= s["diversity"] <= 1.0, key
        assert -1.0 - 1e-6 <= s["coherence"] <= 1.0 + 1e-6, key
        assert s["tokens_per_s"] > 0.0, key
        assert s["settings"], key
    assert results["summary"]["sft_greedy"]["kl"] == 0.0 and results["summary"]["sft_sample"]["kl"] == 0.0
    assert results["summary"]["sft_greedy"]["win_rate"] == 0.5
    assert results["summary"]["best_of_4"]["kl"] == pytest.approx(quality.best_of_n_kl(4))
    for r in results["responses"]:
        assert 0 < r["output_tokens"] <= plan.max_tokens and r["kl"] >= 0.0

    # the sweep: every alpha of every value-guided method, every N, and the SFT reference points
    points = {(p["method"], p["value"]) for p in results["sweep"]}
    for method in ("ARGS", "CD (token-wise)", "TQ* direct"):
        assert {(method, a) for a in plan.sweep_alphas} <= points
    assert {("TQ* indirect", a) for a in plan.sweep_indirect_alphas} <= points
    assert {("Best-of-N", float(n)) for n in plan.sweep_ns} <= points
    assert ("SFT greedy", None) in points
    for p in results["sweep"]:
        assert math.isfinite(p["mean_reward"]) and p["kl"] >= 0.0 and 0.0 <= p["win_rate"] <= 1.0

    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    summary = json.loads(paths["summary"].read_text())
    assert summary["summary"].keys() == results["summary"].keys()
    assert len(paths["responses"].read_text().splitlines()) == len(results["responses"])
