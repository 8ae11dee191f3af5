"""The alignment-quality harness (eval/quality.py): its metric functions on hand-made inputs, and its
smoke mode in-process on the session's vLLM engine (shape and sanity of the output, not the numbers)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_value_guidance_by_hand():
    def cand(token, logprob, value):
        return {"token_id": token, "sft_logprob": logprob, "value": value}

    steps = [
        {"chosen": [1], "candidates": [cand(1, -0.1, 0.2), cand(2, -2.0, 0.5)]},  # SFT's top kept; spread 0.3
        {"chosen": [4], "candidates": [cand(3, -0.5, 0.0), cand(4, -1.0, 0.9)]},  # flipped; spread 0.9
        {"chosen": [5], "gated": True, "candidates": [cand(5, -0.01, None)]},  # gated: not counted
        {"chosen": [6], "candidates": [cand(6, -0.3, 0.1), cand(7, -1.3, None)]},  # no value: not counted
        {"chosen": [8], "cost": {"pruned": 1}, "candidates": [cand(8, -0.2, 0.4), cand(9, -1.2, -1.0)]},  # pruned
    ]
    g = quality.value_guidance(steps)
    assert g == {"value_spread": pytest.approx(0.6), "flip_share": 0.5, "valued_decisions": 2}
    assert quality.value_guidance([{"chosen": [1], "candidates": [{"text": "x", "value": 1.0}]}]) is None  # best-of-n


def test_best_of_n_kl_and_truncation_kl_by_hand():
    assert quality.best_of_n_kl(1) == 0.0
    assert quality.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    steps = [
        {"gated": False, "candidates": [{"sft_logprob": math.log(0.5)}, {"sft_logprob": math.log(0.25)}]},
        {"gated": True, "candidates": [{"sft_logprob": math.log(0.1)}]},
        {"gated": False, "candidates": [{"sft_logprob": 0.0}]},
    ]
    assert quality.truncation_kl(steps) == pytest.approx(-math.log(0.75))


def test_repetition_and_loops_by_hand():
    # "a b c a b c": 3-grams abc bca cab abc -> 3 unique of 4 -> rep_3 = 1/4
    assert quality.repetition("a b c a b c") == pytest.approx(0.25)
    # "x x x x x": xxx three times -> 1 unique of 3 -> rep_3 = 2/3
    assert quality.repetition("x x x x x") == pytest.approx(2 / 3)
    # no repeated 3-gram; too short for one: 0
    assert quality.repetition("the quick brown fox") == 0.0
    assert quality.repetition("a b") == 0.0 and quality.repetition("") == 0.0
    # a loop is repetition strictly above 0.5: 0.6 and 0.9 of these four
    records = [{"repetition": v} for v in (0.0, 0.6, 0.5, 0.9)]
    assert quality.loop_share(records) == pytest.approx(0.5)


def test_afinn_judge_normalisation_by_hand():
    # good (+3) + thank (+2) = 5, over 6 words, / 5 (the largest valence) -> 1/6
    assert quality.afinn_score("What a good day, thank you!") == pytest.approx(5 / 30)
    # hate (-3) + terrible (-3) twice = -9, over 6 words, / 5 -> -0.3
    assert quality.afinn_score("I hate this terrible, terrible weather.") == pytest.approx(-9 / 30)
    assert quality.afinn_score("The train leaves at noon.") == 0.0
    assert quality.afinn_score("") == 0.0 and quality.afinn_score("   ") == 0.0
    # one whitespace word, three matches (+9 / 5): clipped to the scale's end
    assert quality.afinn_score("good,great,love") == 1.0


def _record(prompt_id: str, reward: float, afinn: float = 0.0, **extra) -> dict:
    return {"prompt_id": prompt_id, "reward": reward, "afinn": afinn, **extra}


def test_win_tie_vs_cd_by_hand():
    tq = [
        _record("p1", 0.5, afinn=0.1),
        _record("p2", 0.3, afinn=0.0),
        _record("p3", 0.1, afinn=0.2),
        _record("only-tq", 1.0),
    ]
    cd = [
        _record("p1", 0.4, afinn=0.3),
        _record("p2", 0.3 + 1e-12, afinn=0.0),
        _record("p3", 0.2, afinn=0.1),
        _record("only-cd", -1.0),
    ]
    # prompts both ran: p1 win, p2 tie within 1e-9 (a win-tie), p3 loss -> 2/3
    assert quality.win_tie_rate(tq, cd) == pytest.approx(2 / 3)
    # by AFINN: p1 loss, p2 tie, p3 win -> 2/3; a clear loss on the only prompt -> 0
    assert quality.win_tie_rate(tq, cd, "afinn") == pytest.approx(2 / 3)
    assert quality.win_tie_rate([_record("p1", 0.1)], [_record("p1", 0.2)]) == 0.0
    assert quality.win_tie_rate([_record("a", 1.0)], [_record("b", 0.0)]) is None  # no prompt in common


def test_summarize_reports_the_new_metrics():
    text = {"kl": 1.0, "kl_truncation": 0.5, "diversity": 1.0, "coherence": 0.5, "output_tokens": 4}
    sft = [_record("p1", 0.0, afinn=0.0, repetition=0.0, **text), _record("p2", 0.5, afinn=0.2, repetition=0.0, **text)]
    tq = [_record("p1", 0.4, afinn=-0.1, repetition=0.8, **text), _record("p2", 0.5, afinn=0.4, repetition=0.2, **text)]
    cd = [_record("p1", 0.6, afinn=-0.2), _record("p2", 0.1, afinn=0.4)]
    s = quality.summarize(tq, sft, cd)
    assert s["repetition"] == pytest.approx(0.5) and s["loops"] == pytest.approx(0.5)
    assert s["afinn"] == pytest.approx(0.15)
    assert s["afinn_win_rate"] == pytest.approx(0.5)  # p1 loss (-0.1 < 0), p2 win (0.4 > 0.2)
    assert s["win_rate"] == pytest.approx(0.75)  # p1 win, p2 tie
    assert s["win_tie_vs_cd"] == pytest.approx(0.5)  # p1 loss, p2 win
    assert s["win_tie_vs_cd_afinn"] == pytest.approx(1.0)  # p1 win, p2 tie
    plain = quality.summarize(sft, sft)  # not a TQ* row: no CD to compare with
    assert plain["win_tie_vs_cd"] is None and plain["win_tie_vs_cd_afinn"] is None
    # the table shows both, and "-" where a metric does not apply
    row = {"label": "TQ* direct", "settings": "-", "decoding": {"method": "transfer_q"}, **s}
    table = quality.markdown_table({"subset_summary": {"tq": row, "sft": {**row, **plain}}}, subset=True)
    head, _, tq_line, sft_line = table.splitlines()
    assert "win-tie vs CD" in head and "AFINN" in head and "repetition (loops)" in head
    assert "| 0.500 | 1.0" in tq_line and "0.500 (0.50)" in tq_line
    assert "| - |" in sft_line


# ---------------------------------------------------------------------------- what runs
def test_main_runs_include_the_baseline_rows_and_both_tq_baselines():
    from alignd.decoding.config import DecodingConfig

    runs = {r.key: r for r in quality.Plan().main_runs()}
    assert {
        "sft_greedy",
        "sft_sample",
        "baseline_greedy",
        "baseline_sample",
        "best_of_4",
        "best_of_16",
        "args@1",
        "cd@1",
        "tq_direct@1",
        "tq_prompted@1",
        "tq_indirect@1",
    } == set(runs)
    assert runs["baseline_greedy"].decoding == {"method": "baseline"} and runs["baseline_greedy"].temperature == 0.0
    assert runs["baseline_sample"].decoding == {"method": "baseline"} and runs["baseline_sample"].temperature == 1.0
    direct, prompted, indirect = runs["tq_direct@1"], runs["tq_prompted@1"], runs["tq_indirect@1"]
    assert "baseline" not in direct.decoding and direct.decoding["transfer"] == "direct"  # the server's default
    assert prompted.decoding == {**direct.decoding, "baseline": "prompted"}
    assert indirect.decoding["transfer"] == "indirect" and indirect.decoding["baseline"] == "prompted"
    assert indirect.decoding["num_rollouts"] == 2
    for run in runs.values():
        DecodingConfig(**run.decoding, diagnostics=True)  # every row is a valid request
    # settings name the baseline the rollouts come from
    assert "trained-adapter rollouts" in direct.settings_text()
    assert "prompted-baseline rollouts" in prompted.settings_text()
    assert "prompted-baseline rollouts" in direct.settings_text({"default": "prompted", "prompted": "prompted"})
    assert "r_BL=prompted_implicit" in indirect.settings_text()
    assert runs["baseline_greedy"].settings_text() == "trained-adapter, greedy"
    # win-tie partners: CD at the same alpha, for TQ* rows only
    main = list(runs.values())
    for key in ("tq_direct@1", "tq_prompted@1", "tq_indirect@1"):
        assert quality.cd_partner(runs[key], main) == "cd@1", key
    for key in ("args@1", "cd@1", "baseline_greedy", "sft_greedy"):
        assert quality.cd_partner(runs[key], main) is None, key
    # --methods picks rows by these keys (SFT greedy always), and the prompted row can be left out
    chosen = quality.Plan(methods=("baseline_greedy", "tq_prompted@1")).main_runs()
    assert [r.key for r in chosen] == ["sft_greedy", "baseline_greedy", "tq_prompted@1"]
    assert "tq_prompted@1" not in {r.key for r in quality.Plan(tq_prompted=False).main_runs()}
    assert not any(r.key.startswith("tq_prompted") for r, _, _ in quality.Plan().sweep_runs())
    assert any(r.key.startswith("tq_prompted") for r, _, _ in quality.Plan(sweep_tq_prompted=True).sweep_runs())


def test_head_rows_run_where_the_engine_has_a_head_in_the_table_and_the_sweep():
    from alignd.decoding.config import DecodingConfig

    assert not any(r.key.startswith("tq_head") for r in quality.Plan().main_runs())  # no head: no rows
    plan = quality.Plan(head_top_k=10)
    head = {r.key: r for r in plan.main_runs()}["tq_head@1"]
    assert head.decoding == {"method": "transfer_q", "value": "head", "alpha": 1.0, "top_k": 10}
    assert DecodingConfig(**head.decoding, diagnostics=True).values_in_engine
    assert "learned value head (distilled from trained-adapter: rollout or implicit targets" in head.settings_text()
    assert quality.cd_partner(head, plan.main_runs()) == "cd@1"
    swept = [(r.decoding["alpha"], r.prompt_limit) for r, _, _ in plan.sweep_runs() if r.key.startswith("tq_head")]
    assert swept == [(a, plan.sweep_prompts) for a in sorted(plan.sweep_alphas)]


def test_sweep_methods_keep_only_the_named_lines():
    plan = quality.Plan(head_top_k=4, sweep_methods=("tq_head", "best_of_n"))
    families = {quality.method_family(r.key) for r, _, _ in plan.sweep_runs()}
    assert families == {"tq_head", "best_of_n"}
    assert len(plan.sweep_runs()) == len(plan.sweep_alphas) + len(plan.sweep_ns)
    assert {quality.method_family(r.key) for r, _, _ in quality.Plan(head_top_k=4).sweep_runs()} > families
    with pytest.raises(ValueError, match="unknown sweep methods.*tq_hed"):
        quality.Plan(sweep_methods=("tq_hed",)).sweep_runs()


def _results(rows: dict[str, float], sweep: list[tuple[str, float]], prompts: int = 112, max_tokens: int = 48) -> dict:
    return {
        "plan": {"max_tokens": max_tokens},
        "prompts": prompts,
        "sweep_prompt_ids": ["a", "b"] if sweep else [],
        "summary": {k: {"label": k, "mean_reward": r} for k, r in rows.items()},
        "methods": [{"key": k} for k in rows],
        "subset_summary": {},
        "subset_prompts": None,
        "sweep": [{"key": k, "mean_reward": r} for k, r in sweep],
        "command": "earlier",
        "environment": {"date": "then"},
    }


def test_combine_keeps_the_earlier_rows_this_run_did_not_make():
    earlier = _results(
        {"sft_greedy": 0.4, "tq_direct@1": 0.7, "best_of_4": 0.8},
        [("sft_greedy", 0.4), ("best_of_1", 0.45), ("tq_direct@1", 0.6)],
    )
    now = _results({"sft_greedy": 0.4, "tq_head@1": 0.65}, [("tq_head@1", 0.55)])
    combined = quality.combine_results(now, earlier)
    assert list(combined["summary"]) == ["sft_greedy", "tq_direct@1", "best_of_4", "tq_head@1"]
    assert combined["summary"]["tq_head@1"]["mean_reward"] == 0.65
    assert [p["key"] for p in combined["sweep"]] == ["sft_greedy", "best_of_1", "tq_direct@1", "tq_head@1"]
    assert [m["key"] for m in combined["methods"]] == ["sft_greedy", "tq_direct@1", "best_of_4", "tq_head@1"]
    (record,) = combined["combined_with"]
    assert record["rows"] == ["tq_direct@1", "best_of_4"] and record["command"] == "earlier"
    assert record["sft_greedy_mean_reward"] == {"this_run": 0.4, "earlier": 0.4}
    # a row this run made again replaces the earlier one
    again = quality.combine_results(_results({"sft_greedy": 0.4, "tq_direct@1": 0.9}, []), earlier)
    assert again["summary"]["tq_direct@1"]["mean_reward"] == 0.9 and again["combined_with"][0]["rows"] == ["best_of_4"]


def test_combine_refuses_runs_of_other_prompts_or_lengths():
    earlier = _results({"sft_greedy": 0.4}, [])
    with pytest.raises(ValueError, match="max_tokens: this run 16, earlier 48"):
        quality.combine_results(_results({"sft_greedy": 0.4}, [], max_tokens=16), earlier)
    with pytest.raises(ValueError, match="prompts: this run 10, earlier 112"):
        quality.combine_results(_results({"sft_greedy": 0.4}, [], prompts=10), earlier)


def test_head_replay_reproduces_a_greedy_decode_by_the_head_step_by_step(tiny_llama_dir, tmp_path):
    """The replay reads every answer position from one forward pass; here the same decode is made one
    token at a time, with the scalar rule (reweight): the replay must pick every token and give the sum
    of the steps' KL (an off-by-one position would fail both)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignd.decoding.rule import reweight
    from alignd.models.value_head import ValueHead, ValueHeadConfig, save_value_head

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = model.config
    torch.manual_seed(3)
    head = ValueHead(ValueHeadConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size, rank=8)).eval()
    with torch.no_grad():
        head.out.weight.mul_(20.0)  # values large enough to overrule the SFT model at alpha 0.5
    save_value_head(head, tmp_path / "head", {"note": "random, for this test"})
    alpha, top_k, prompt = 0.5, 4, [1, 5, 9, 13, 17]

    answer, kl, overruled = [], 0.0, 0
    with torch.inference_mode():
        for _ in range(8):
            h = model.base_model(input_ids=torch.tensor([prompt + answer])).last_hidden_state[0, -1]
            logprobs = torch.log_softmax(model.lm_head(h), dim=-1)
            top = logprobs.topk(top_k)
            q = head(h[None], model.get_input_embeddings().weight[top.indices][None])[0]
            rule = reweight(top.indices.tolist(), top.values.tolist(), q.tolist(), alpha)
            answer.append(rule.token_ids[rule.greedy_index()])
            kl += rule.kl_from_sft
            overruled += rule.greedy_index() != 0
    assert overruled > 0, "the head never changed a decision: the test would not see a wrong position"

    replay = quality.HeadReplay(tiny_llama_dir, tmp_path / "head")(prompt, answer, alpha, top_k)
    assert replay["agreement"] == 1.0
    assert replay["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)
    assert replay["kl_truncation"] > 0.0
    # the plain SFT greedy answer of the same length is not what the head decodes
    sft = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt) :]
    assert quality.HeadReplay(tiny_llama_dir, tmp_path / "head")(prompt, sft.tolist(), alpha, top_k)["agreement"] < 1.0


def test_default_baseline_is_named_from_the_registry_or_the_settings(tmp_path):
    from alignd.decoding.baselines import prompted_only
    from alignd.settings import Settings

    settings = Settings(baseline_adapter="none")
    assert quality.default_baseline_text(settings) == quality.PROMPTED_BASELINE_TEXT
    missing = Settings(baseline_adapter=str(tmp_path / "adapter"))
    assert quality.default_baseline_text(missing).endswith("(folder missing)")
    (tmp_path / "adapter").mkdir()
    assert quality.default_baseline_text(missing) == f"trained LoRA adapter {tmp_path / 'adapter'}"
    registry = prompted_only(None, settings)  # no adapter: "default" is the prompted baseline
    assert quality.default_baseline_text(missing, registry) == quality.PROMPTED_BASELINE_TEXT
    # ...and then TQ* from "default" and from "prompted" are one run (their responses are shared)
    runner = quality._Runner(None, settings, quality.Plan(), progress=False)
    runner.baselines = registry
    runs = {r.key: r for r in quality.Plan().main_runs()}
    assert runner.signature(runs["tq_direct@1"]) == runner.signature(runs["tq_prompted@1"])
    assert runner.signature(runs["tq_direct@1"]) != runner.signature(runs["cd@1"])
    assert runner.baseline_kinds() == {"default": "prompted", "prompted": "prompted"}


# ---------------------------------------------------------------------------- resume
def _log_line(runner, signature: str, prompt_id: str, **overrides) -> str:
    record = {"prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "response": "hi", "output_tokens": 3}
    entry = {
        "kind": "record",
        "signature": signature,
        **runner.plan_fields(),
        "prompt_id": prompt_id,
        "record": record,
        **overrides,
    }
    return json.dumps(entry)


def test_resume_loads_exactly_the_matching_logged_records(tmp_path):
    log = tmp_path / "partial.jsonl"
    plan = quality.Plan()
    settings = SimpleNamespace(model_name="SmolLM2", target_reward="positivity")
    runner = quality._Runner(None, settings, plan, progress=False, partial_path=log)
    runs = {r.key: r for r in plan.main_runs()}
    tq, other = runner.signature(runs["tq_direct@1"]), runner.signature(runs["cd@1"])
    timing = {
        "kind": "timing",
        "signature": tq,
        **runner.plan_fields(),
        "seconds": 2.0,
        "output_tokens": 6,
        "prompts": 2,
    }
    log.write_text(
        "\n".join(
            [
                _log_line(runner, tq, "p1"),
                _log_line(runner, other, "p1"),  # another signature: a run not asked for
                _log_line(runner, tq, "p3", max_tokens=plan.max_tokens + 1),  # another plan
                json.dumps(timing),
                _log_line(runner, tq, "p2"),
                _log_line(runner, tq, "p4")[:40],  # a killed run's half-written last line, no newline
            ]
        )
    )

    assert runner.resume([runs["tq_direct@1"]]) == 2
    assert set(runner.cache) == {(tq, "p1"), (tq, "p2")}
    assert runner.cache[(tq, "p2")]["prompt_id"] == "p2"
    assert runner.timing(runs["tq_direct@1"]) == {"tokens_per_s": pytest.approx(3.0), "seconds": 2.0}
    # a logged response is reused only for the same prompt text
    assert runner._cached(tq, {"id": "p1", "prompt": "prompt p1"}) is not None
    assert runner._cached(tq, {"id": "p1", "prompt": "an edited prompt"}) is None

    # logging goes on after the broken line, on a line of its own
    runner._log("record", tq, prompt_id="p5", record={"prompt_id": "p5", "prompt": "prompt p5"})
    asyncio.run(runner.close())
    again = quality.load_partial(log, runner.plan_fields(), {tq})
    assert set(again.records) == {(tq, "p1"), (tq, "p2"), (tq, "p5")} and again.skipped == 1

    fresh = quality._Runner(None, settings, plan, progress=False, partial_path=log)
    assert fresh.resume([runs["tq_direct@1"]], fresh=True) == 0 and fresh.cache == {}
    asyncio.run(fresh.close())
    assert log.read_text() == ""


def test_prompts_file_is_well_formed():
    prompts = quality.load_prompts()
    assert len(prompts) >= 100
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert all(p["prompt"].strip() and p["category"] for p in prompts)


# ---------------------------------------------------------------------------- smoke run on vLLM
@pytest.mark.vllm
def test_smoke_evaluation_in_process(vllm_engine, embedded_settings, loop_thread, tmp_path):
    # the session engine carries the test value head: no head rows here (the harness would add them; their
    # replay has its own tests above), so the rows are the plan's own
    plan = dataclasses.replace(quality.Plan.smoke(), head_top_k=0)
    prompts = quality.load_prompts(limit=2)
    results = loop_thread.run(quality.evaluate(vllm_engine, embedded_settings, prompts, plan, progress=False))
    paths = quality.write_outputs(results, tmp_path / "out", tmp_path / "frontier.png")

    keys = [r.key for r in plan.main_runs()]
    assert keys == list(results["summary"])
    labels = {s["label"] for s in results["summary"].values()}
    assert {
        "SFT greedy",
        "SFT sampling",
        "Baseline greedy",
        "Baseline sampling",
        "Best-of-4",
        "Best-of-16",
        "ARGS",
        "CD (token-wise)",
        "TQ* direct",
        "TQ* prompted",
        "TQ* indirect",
    } <= labels
    assert len(results["responses"]) == len(keys) * len(prompts)
    for key, s in results["summary"].items():
        assert s["n"] == len(prompts), key
        assert math.isfinite(s["mean_reward"]) and -1.0 <= s["mean_reward"] <= 1.0, key
        assert 0.0 <= s["win_rate"] <= 1.0, key
        if s["decoding"]["method"] != "baseline":  # the baseline's KL is a log-ratio estimate: may be < 0
            assert s["kl"] >= 0.0, key
        assert 0.0 <= s["diversity"] <= 1.0, key
        assert 0.0 <= s["repetition"] <= 1.0 and 0.0 <= s["loops"] <= 1.0, key
        assert -1.0 <= s["afinn"] <= 1.0 and 0.0 <= s["afinn_win_rate"] <= 1.0, key
        if s["decoding"]["method"] == "transfer_q":
            assert 0.0 <= s["win_tie_vs_cd"] <= 1.0 and 0.0 <= s["win_tie_vs_cd_afinn"] <= 1.0, key
        else:
            assert s["win_tie_vs_cd"] is None, key
        assert -1.0 - 1e-6 <= s["coherence"] <= 1.0 + 1e-6, key
        assert s["tokens_per_s"] > 0.0, key
        assert s["settings"], key
    assert results["summary"]["sft_greedy"]["kl"] == 0.0 and results["summary"]["sft_sample"]["kl"] == 0.0
    assert results["summary"]["sft_greedy"]["win_rate"] == 0.5
    assert results["summary"]["best_of_4"]["kl"] == pytest.approx(quality.best_of_n_kl(4))
    assert results["summary"]["sft_greedy"]["afinn_win_rate"] == 0.5
    assert results["server_settings"]["baseline"] and "default" in results["server_settings"]["baselines"]
    for r in results["responses"]:
        assert 0 < r["output_tokens"] <= plan.max_tokens
        assert r["kl"] >= 0.0 or r["method"].startswith("baseline_")

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


def test_main_rows_of_several_runs_are_drawn_apart_where_a_family_repeats(tmp_path, monkeypatch):
    """--plot-main: rows of two summaries in one reward-vs-KL picture; a family in both (another head) is two
    lines named by their runs, SFT greedy once."""

    def summary(folder: str, rows: dict) -> Path:
        path = tmp_path / folder / "summary.json"
        path.parent.mkdir()
        path.write_text(
            json.dumps(
                {"summary": {k: {"mean_reward": r, "kl": kl, "kl_truncation": kl / 2} for k, (r, kl) in rows.items()}}
            )
        )
        return path

    earlier = summary("main", {"sft_greedy": (0.4, 0.0), "tq_head@1": (0.5, 15.0), "cd@1": (0.7, 15.0)})
    later = summary("implicit", {"sft_greedy": (0.4, 0.0), "tq_head@0.1": (0.8, 13.0), "tq_head@0.05": (0.9, 24.0)})
    import matplotlib.pyplot as plt

    drawn: list = []
    real_savefig = plt.Figure.savefig

    def keep_labels(figure, *args, **kwargs):
        drawn.extend(line.get_label() for line in figure.axes[1].get_lines())
        return real_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep_labels)
    path = quality.plot_main_rows([earlier, later], tmp_path / "rows.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(drawn) == ["cd", "sft_greedy", "tq_head (implicit)", "tq_head (main)"]
