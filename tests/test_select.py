"""``alignd select`` (S2L and random data selection) and ``alignd train ... --select``.

- The parts on synthetic data: K-means recovers trajectories of known groups (adjusted Rand index), the
  sampler spreads the budget as the paper says (smallest cluster first, equal shares of what is left,
  every cluster represented while the budget allows), reproducibly under a seed, and the whole
  selection is a function of the trajectories;
- the losses: the batched per-example loss equals a one-example-at-a-time hand computation;
- the commands end to end on the tiny random Llama of conftest (a proxy trained for a few steps):
  the output folder, resumption between checkpoints, ``alignd train irft/dpo --select`` with the
  selection in the adapter's manifest, and every bad input as a one-line error with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignd.cli import main
from alignd.train.data import TrainingInputError
from alignd.train.select import (
    Budget,
    Example,
    cluster_trajectories,
    example_losses,
    parse_select_option,
    random_sample,
    s2l_sample,
    tokenize_examples,
)

WORDS = [
    "hello world",
    "the cat sat",
    "a happy answer",
    "numbers one two",
    "how are you",
    "the dog sat on",
    "i am fine",
    "on the mat",
    "is kind and warm",
    "three four five",
    "thank you",
    "seven eight nine",
]
CALLABLE_REWARDS = {"chars": {"type": "callable", "path": "train_rewards:distinct_characters"}}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def demos_file(tmp_path) -> Path:
    rows = [
        {
            "id": f"d{i}",
            "prompt": WORDS[i],
            "response": " ".join(WORDS[(i + j) % len(WORDS)] for j in (1, 2, 3)[: 1 + i % 3]),
        }
        for i in range(len(WORDS))
    ]
    return write_jsonl(tmp_path / "demos.jsonl", rows)


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGND_ENGINE", "hf")
    monkeypatch.setenv("ALIGND_REWARDS", json.dumps(CALLABLE_REWARDS))
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGND_LOG_LEVEL", "warning")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def run_cli(argv: list) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


# Small and fast: 12 examples, batch 4, one epoch = 3 steps, a checkpoint at each.
FAST_PROXY = [
    "--checkpoints",
    "3",
    "--proxy-epochs",
    "1",
    "--proxy-batch-size",
    "4",
    "--proxy-learning-rate",
    "5e-3",
    "--loss-batch-size",
    "5",
]


# ---------------------------------------------------------------------------- synthetic trajectories
def synthetic_trajectories(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Groups of loss trajectories of distinct shapes (learned fast, learned late, never learned,
    forgotten ...) plus noise; returns (trajectories, true group of each row)."""
    steps = np.linspace(0, 1, 6)
    shapes = [
        3.0 * np.exp(-6 * steps),
        3.0 - 2.5 * steps**3,
        np.full_like(steps, 2.6),
        0.5 + 1.5 * steps,
        1.5 + np.sin(6 * steps),
    ]
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for g, n in enumerate(sizes):
        rows.append(shapes[g] + rng.normal(0, 0.08, size=(n, len(steps))))
        truth += [g] * n
    return np.vstack(rows), np.array(truth)


def test_kmeans_recovers_known_groups_of_trajectories():
    from sklearn.metrics import adjusted_rand_score

    trajectories, truth = synthetic_trajectories([40, 15, 60, 8, 25])
    labels = cluster_trajectories(trajectories, 5, seed=0)
    assert adjusted_rand_score(truth, labels) > 0.98
    # with fewer clusters than groups the recovery is worse: the score measures something
    assert adjusted_rand_score(truth, cluster_trajectories(trajectories, 2, seed=0)) < 0.8


def test_sampler_spends_the_budget_smallest_cluster_first_in_equal_shares():
    labels = np.array([0] * 75 + [1] * 5 + [2] * 20)
    chosen, spread = s2l_sample(labels, 30, seed=0)
    # smallest first: cluster 1 (5) takes all of its share 10; 25 left over 2 clusters: 12, then 13
    assert [(c["cluster"], c["size"], c["selected"]) for c in spread] == [(1, 5, 5), (2, 20, 12), (0, 75, 13)]
    assert len(chosen) == 30 and len(set(chosen.tolist())) == 30
    assert {c: int((labels[chosen] == c).sum()) for c in (0, 1, 2)} == {0: 13, 1: 5, 2: 12}
    # every cluster is represented while the budget allows: a budget of exactly K gives one each
    chosen, _ = s2l_sample(labels, 3, seed=0)
    assert sorted(labels[chosen].tolist()) == [0, 1, 2]
    # below K the largest clusters get the budget (the smallest cluster's share rounds to 0 first)
    chosen, spread = s2l_sample(labels, 2, seed=0)
    assert [c["selected"] for c in spread] == [0, 1, 1]
    # the whole set
    chosen, _ = s2l_sample(labels, 100, seed=0)
    assert chosen.tolist() == list(range(100))


def test_sampler_and_selection_are_reproducible_under_a_seed():
    trajectories, _ = synthetic_trajectories([40, 15, 60, 8, 25], seed=3)
    runs = [s2l_sample(cluster_trajectories(trajectories, 5, seed=7), 37, seed=7)[0] for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    other = s2l_sample(cluster_trajectories(trajectories, 5, seed=7), 37, seed=8)[0]
    assert other.tolist() != runs[0].tolist()  # the seed matters
    assert random_sample(148, 37, seed=1).tolist() == random_sample(148, 37, seed=1).tolist()
    assert random_sample(148, 37, seed=1).tolist() != random_sample(148, 37, seed=2).tolist()


def test_budget_parsing_and_its_errors():
    assert Budget.parse("30").resolve(100) == 30
    assert Budget.parse("0.3").resolve(100) == 30
    assert Budget.parse("30%").resolve(200) == 60
    assert Budget.parse("1.0").resolve(7) == 7
    for text, size, message in [
        ("0", 10, "selects nothing"),
        ("11", 10, "larger than the set"),
        ("1.5", 10, "out of range"),
        ("0.01", 10, "rounds to 0"),
        ("-3", 10, "selects nothing"),
    ]:
        with pytest.raises(TrainingInputError, match=message):
            Budget.parse(text).resolve(size)
    with pytest.raises(TrainingInputError, match="not a number"):
        Budget.parse("lots")
    assert parse_select_option("s2l:0.3")[0] == "s2l" and parse_select_option("random:5")[1].count == 5
    for bad in ("s2l", "best:0.3", "s2l:"):
        with pytest.raises(TrainingInputError, match="s2l:<budget>"):
            parse_select_option(bad)


def test_more_clusters_than_examples_or_distinct_trajectories_is_an_error():
    trajectories, _ = synthetic_trajectories([3, 3])
    with pytest.raises(TrainingInputError, match="--clusters 7 is out of range"):
        cluster_trajectories(trajectories, 7, seed=0)
    same = np.ones((6, 4))
    with pytest.raises(Exception, match="only 1 distinct loss trajectories"):
        cluster_trajectories(same, 2, seed=0)


# ---------------------------------------------------------------------------- losses
def test_batched_losses_equal_one_example_at_a_time(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    examples = [Example(f"e{i}", WORDS[i], WORDS[-1 - i] * (1 + i % 3), i + 1) for i in range(7)]
    ids, starts, truncated = tokenize_examples(tokenizer, examples, 256)
    assert truncated == 0
    batched = example_losses(model, ids, starts, tokenizer.pad_token_id, batch_size=3)
    for i, (row, start) in enumerate(zip(ids, starts, strict=False)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row])).logits[0]
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(row[1:]).unsqueeze(-1)).squeeze(-1)
        expected = -logp[start - 1 :].mean().item()  # the target's tokens only
        assert batched[i] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # the target starts after the rendered prompt, exactly where the chat template puts the answer
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": WORDS[0]}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(ids[0][: starts[0]]) == prompt_text


def test_a_tokenizer_that_cannot_encode_the_set_is_refused(tiny_llama_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "user", "assistant", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    ok = Example("a", "hello", "hello world", 1)
    bad = Example("b", "hello", "hello mars", 2)
    with pytest.raises(TrainingInputError, match=r"line 2 \(id 'b'\): the proxy's tokenizer cannot encode"):
        tokenize_examples(tokenizer, [ok, bad], 64)
    tokenizer.chat_template = None
    with pytest.raises(TrainingInputError, match="no chat template"):
        tokenize_examples(tokenizer, [ok], 64)


# ---------------------------------------------------------------------------- the commands
def test_select_s2l_end_to_end_and_resumed_between_checkpoints(
    tiny_llama_dir, demos_file, tmp_path, env, monkeypatch, capsys
):
    import alignd.train.s2l_proxy as s2l_proxy  # the module whose proxy_trajectories takes the losses

    out = tmp_path / "sel"
    argv = [
        "select",
        "s2l",
        "--model",
        tiny_llama_dir,
        "--data",
        demos_file,
        "--budget",
        "0.5",
        "--clusters",
        "3",
        *FAST_PROXY,
        "--out",
        out,
    ]
    # interrupted while taking the losses of the second checkpoint
    real, calls = s2l_proxy.example_losses, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(s2l_proxy, "example_losses", interrupted)
    assert run_cli(argv) == 130
    partial = out.with_name("sel.partial")
    assert sorted(p.name for p in (partial / "losses").iterdir()) == ["step-1.json"] and not out.exists()
    monkeypatch.setattr(s2l_proxy, "example_losses", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    assert run_cli(argv) == 0
    assert len(calls) == 2  # the first checkpoint's losses were kept; the proxy was not trained again
    assert f"selection written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "clusters.png",
        "report.md",
        "selection.json",
        "subset.jsonl",
        "trajectories.jsonl",
    ]
    selection = json.loads((out / "selection.json").read_text())
    assert selection["method"] == "s2l" and selection["selected"] == 6 and selection["data"]["examples"] == 12
    assert selection["proxy"]["checkpoint_steps"] == [1, 2, 3]
    spread = selection["clusters"]["spread"]
    assert selection["clusters"]["k"] == 3 and sum(c["size"] for c in spread) == 12
    assert sum(c["selected"] for c in spread) == 6 and [c["size"] for c in spread] == sorted(c["size"] for c in spread)
    trajectories = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 12 and all(len(t["losses"]) == 3 for t in trajectories)
    # the proxy learned: the mean loss falls over its training
    first, last = (np.mean([t["losses"][k] for t in trajectories]) for k in (0, 2))
    assert last < first
    # the subset is the selected lines of the input, in its order
    subset = [json.loads(line)["id"] for line in (out / "subset.jsonl").read_text().splitlines()]
    assert subset == selection["ids"] and len(subset) == 6
    # the selection is the sampler's, given the recorded trajectories and clusters
    labels = np.array([t["cluster"] for t in trajectories])
    chosen, _ = s2l_sample(labels, 6, seed=0)
    assert [f"d{i}" for i in chosen] == sorted(subset, key=lambda s: int(s[1:]))
    assert "| cluster | size | selected |" in (out / "report.md").read_text()


def test_select_random(demos_file, tmp_path, env, capsys):
    out = tmp_path / "rand"
    assert run_cli(["select", "random", "--data", demos_file, "--budget", "5", "--seed", "3", "--out", out]) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["method"] == "random" and selection["ids"] == [f"d{i}" for i in random_sample(12, 5, 3)]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "selection.json", "subset.jsonl"]


def test_select_bad_input_is_a_one_line_error(tiny_llama_dir, demos_file, tmp_path, env, capsys):
    dup = write_jsonl(
        tmp_path / "dup.jsonl",
        [{"id": "a", "prompt": "x", "response": "y"}, {"id": "a", "prompt": "z", "response": "w"}],
    )
    neither = write_jsonl(tmp_path / "neither.jsonl", [{"id": "a", "prompt": "x", "answer": "y"}])
    base = ["select", "s2l", "--model", tiny_llama_dir, *FAST_PROXY]
    cases = [
        ([*base, "--data", demos_file, "--budget", "13"], "larger than the set (12 examples)"),
        ([*base, "--data", demos_file, "--budget", "0"], "selects nothing"),
        ([*base, "--data", demos_file, "--budget", "3", "--clusters", "13"], "--clusters 13 is more than the set's 12"),
        ([*base, "--data", dup, "--budget", "1"], "duplicate id 'a' (first on line 1)"),
        ([*base, "--data", neither, "--budget", "1"], "demonstrations"),
        ([*base, "--data", demos_file, "--budget", "3", "--checkpoints", "5"], "fewer than --checkpoints 5"),
        ([*base, "--data", tmp_path / "none.jsonl", "--budget", "1"], "does not exist"),
    ]
    for argv, message in cases:
        assert run_cli([*argv, "--out", tmp_path / "o"]) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert run_cli(["select", "s2l", "--data", demos_file, "--budget", "lots", "--out", tmp_path / "o"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_irft_on_an_s2l_subset_names_the_selection_in_its_manifest(tiny_llama_dir, demos_file, tmp_path, env):
    out = tmp_path / "irft"
    argv = [
        "train",
        "irft",
        "--model",
        tiny_llama_dir,
        "--demonstrations",
        demos_file,
        "--rounds",
        "1",
        "--max-new-tokens",
        "8",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--select",
        "s2l:0.5",
        "--out",
        out,
    ]
    assert run_cli(argv) == 0
    manifest = json.loads((out / "alignd_adapter.json").read_text())
    selection = manifest["selection"]
    assert selection["method"] == "s2l" and selection["budget"] == "0.5" and selection["selected"] == 6
    assert selection["of"] == 12 and len(selection["ids"]) == 6 and selection["clusters"]["k"] == 1
    assert selection["proxy"]["model"]["weights_digest"] == manifest["base_model"]["weights_digest"]
    assert manifest["data"]["demonstrations"] == 6 and manifest["data"]["demonstrations_in_file"] == 12
    assert manifest["metrics"]["rounds"][0]["pairs"] <= 6
    assert "--select" in manifest["command"]


def test_train_dpo_on_a_random_subset_of_its_pairs(tiny_llama_dir, tmp_path, env):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": w} for i, w in enumerate(WORDS)])
    out = tmp_path / "dpo"
    argv = [
        "train",
        "dpo",
        "--model",
        tiny_llama_dir,
        "--prompts",
        prompts,
        "--reward",
        "chars",
        "--samples-per-prompt",
        "2",
        "--max-new-tokens",
        "8",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--sample-batch-size",
        "6",
        "--select",
        "random:4",
        "--out",
        out,
    ]
    assert run_cli(argv) == 0
    manifest = json.loads((out / "alignd_adapter.json").read_text())
    assert manifest["selection"]["method"] == "random" and manifest["selection"]["selected"] == 4
    assert manifest["data"]["pairs"] == 4 and manifest["data"]["pairs_before_selection"] >= 4
    assert manifest["selection"]["selected_from"]["target"] == "chosen"


# ---------------------------------------------------------------------------- the experiment and the benchmark
def test_s2l_experiment_harness_on_the_tiny_model(tiny_llama_dir, tmp_path, env):
    """eval/s2l_experiment.py --smoke (docs/EVALUATION.md): every arm trained and judged, the second S2L
    seed re-sampling the first one's proxy trajectories (--s2l-proxy shared), a resumed run doing nothing
    again."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import s2l_experiment

    out = tmp_path / "s2l"
    argv = [
        "--smoke",
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(out),
        "--random-seeds",
        "0",
        "1",
        "--s2l-seeds",
        "0",
        "1",
    ]
    assert s2l_experiment.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [a["arm"] for a in summary["arms"]] == ["full", "random-0", "random-1", "s2l-0", "s2l-1"]
    budget = Budget.parse("0.3").resolve(summary["pool"])
    for arm in summary["arms"]:
        assert 0.0 <= arm["accuracy"] <= 1.0 and arm["heldout"] == 6
        assert arm["examples"] == (summary["pool"] if arm["arm"] == "full" else budget)
        margins = np.array(arm["margins"])
        assert len(margins) == 6 and arm["mean_margin"] == pytest.approx(margins.mean(), abs=1e-5)
        assert arm["heldout_loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margins))), abs=1e-5)
    comparison = summary["s2l_vs_random"]
    assert comparison["prompts"] == 6 and 0 <= comparison["prompts_where_s2l_margin_is_larger"] <= 6
    losses = {m: [a["heldout_loss"] for a in summary["arms"] if a["method"] == m] for m in ("s2l", "random")}
    assert comparison["heldout_loss"]["s2l_minus_random"] == pytest.approx(
        np.mean(losses["s2l"]) - np.mean(losses["random"]), abs=1e-4
    )
    shared = json.loads((out / "selections" / "s2l-1" / "selection.json").read_text())
    assert shared["trajectories_from"] == str(out / "selections" / "s2l-0")  # no second proxy was trained
    assert not (out / "selections" / "s2l-1" / "trajectories.jsonl").exists()
    first = json.loads((out / "selections" / "s2l-0" / "selection.json").read_text())
    assert shared["clusters"]["k"] == first["clusters"]["k"] and shared["selected"] == first["selected"] == budget
    subset = [
        json.loads(line)["id"] for line in (out / "selections" / "s2l-1" / "subset.jsonl").read_text().splitlines()
    ]
    assert sorted(subset) == shared["ids"]
    # every arm's result is kept: a second run trains nothing; an arm judged before the held-out loss was
    # kept is judged again from its adapter, to the same numbers
    judged = out / "arms" / "random-0.json"
    first_judgement = json.loads(judged.read_text())
    judged.write_text(json.dumps({k: v for k, v in first_judgement.items() if k not in ("margins", "heldout_loss")}))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "arms").iterdir() if p != judged}
    assert s2l_experiment.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "arms").iterdir() if p != judged} == before
    again = json.loads(judged.read_text())
    assert again["margins"] == pytest.approx(first_judgement["margins"], abs=1e-5)
    assert again["heldout_loss"] == pytest.approx(first_judgement["heldout_loss"], abs=1e-6)


def test_s2l_selection_benchmark_reports_each_size(tiny_llama_dir, tmp_path, env):
    """bench/s2l_selection.py --fast on the tiny model: one row per size, from each command's own
    selection.json (the benchmark's numbers are in docs/BENCHMARKS.md)."""
    from support import load_bench

    bench = load_bench("s2l_selection")
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "10", "20", "--model", str(tiny_llama_dir), "--fast", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["examples"] for r in rows] == [10, 20]
    assert [r["selected"] for r in rows] == [Budget.parse("0.3").resolve(n) for n in (10, 20)]
    assert rows[0]["checkpoint_steps"][-1] < rows[1]["checkpoint_steps"][-1]  # one epoch of more examples
    assert all(r["peak_rss_mib"] > 0 and r["wall_s"] >= r["proxy_train_s"] > 0 for r in rows)
