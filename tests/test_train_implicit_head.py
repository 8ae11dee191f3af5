"""``alignd train value-head --targets implicit``: a value head distilled from a DPO baseline's exact token-level
Q, ``beta * (log pi_BL - log pi_SFT)``, at every position of sampled SFT answers (tiny random Llama, float32,
the transformers engine: no vLLM, no server).

- the dense targets of one teacher-forced pass are, at every state, the candidates and values that
  ``decoding.value='implicit'`` itself computes (the same door: ``Generation.value_estimator``);
- the command end to end: manifest (targets, beta, the baseline's own reward), every position a state, the
  sampled tokens aligned with the pass, the head loads; interrupted while sampling, it resumes without
  sampling a finished answer again and ends with the same data;
- what it cannot do is a one-line error: a baseline without an implicit Q, another reward, rollout-only options.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import TINY_ADAPTER_BETA as BETA
from support import door_on_own_loop, make_adapter
from test_train_value_head import assert_one_line_error, run_cli, write_jsonl

from alignd.decoding.config import DecodingConfig
from alignd.models.value_head import HEAD_MANIFEST, load_value_head
from alignd.models.weights import weights_digest
from alignd.settings import Settings
from alignd.train.implicit_targets import dense_targets, load_models

PROMPTS = [
    "hello world",
    "the cat sat",
    "a happy answer",
    "numbers one two",
    "how are you",
    "the dog sat on",
    "kind and warm",
    "one two three",
]
TOP_K = 3


@pytest.fixture(scope="module")
def dpo_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("implicit-head") / "dpo", seed=5)


@pytest.fixture(scope="module")
def door(tiny_hf_engine, dpo_adapter):
    """The door over the tiny transformers engine with the DPO adapter as the default baseline."""
    with door_on_own_loop(
        tiny_hf_engine, Settings(engine="hf", baseline_adapter=str(dpo_adapter), value_head="none")
    ) as opened:
        yield opened


def test_dense_targets_are_the_values_implicit_tq_uses_at_every_state(door, tiny_llama_dir, dpo_adapter, tmp_path):
    generation, loop = door
    engine = generation.engine
    config, estimator = generation.value_estimator(DecodingConfig(method="transfer_q", value="implicit", top_k=TOP_K))
    answers = []
    for slot, text in enumerate(PROMPTS[:3]):
        prompt = list(engine.render_chat([{"role": "user", "content": text}]))
        answer = loop.run_until_complete(engine.rollouts([prompt], 1, 7, 1.0, seed=slot))[0][0].token_ids
        answers.append({"slot": slot, "prompt_id": f"p{slot}", "prompt_tokens": prompt, "answer": list(answer)})
    sft, baseline = load_models(tiny_llama_dir, dpo_adapter, tmp_path)
    # two answers a batch: right-padding must not change a state's targets
    dense = dense_targets(sft, baseline, answers, top_k=TOP_K, beta=BETA, answer_len=7, batch_size=2)
    assert len(dense.records) == sum(len(a["answer"]) for a in answers) == dense.hidden.shape[0]
    by_answer = {a["slot"]: a for a in answers}
    for record in dense.records:
        answer = by_answer[record["answer_slot"]]
        prompt = generation.render_chat([{"role": "user", "content": PROMPTS[record["answer_slot"]]}])
        generated = answer["answer"][: record["position"]]
        top = loop.run_until_complete(engine.top_k_next([list(prompt.token_ids) + generated], TOP_K))[0]
        assert record["candidates"] == [t.token_id for t in top]
        assert record["sft_logprobs"] == pytest.approx([t.logprob for t in top], abs=1e-4)
        values, _ = loop.run_until_complete(
            estimator.estimate(
                prompt, estimator.policy_for_prefix().prefix(prompt), generated, record["candidates"], None
            )
        )
        assert record["values"] == pytest.approx(values, abs=1e-5)
    assert config.alpha == BETA and any(abs(v) > 1e-3 for r in dense.records for v in r["values"])


# ---------------------------------------------------------------------------- the command
@pytest.fixture
def head_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGND_ENGINE", "hf")
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGND_LOG_LEVEL", "warning")
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


# Eight answers of at most 6 tokens, nearly greedy (so that the sampled tokens are the SFT top-k's), a small head.
FAST = [
    "--targets",
    "implicit",
    "--answers",
    "8",
    "--answer-len",
    "6",
    "--sample-temperature",
    "0.05",
    "--top-k",
    str(TOP_K),
    "--concurrency",
    "4",
    "--rank",
    "8",
    "--epochs",
    "4",
    "--batch-size",
    "8",
    "--learning-rate",
    "1e-2",
    "--holdout-fraction",
    "0.25",
]


def implicit_argv(model_dir, prompts_file, out, baseline, *extra) -> list:
    return [
        "train",
        "value-head",
        "--model",
        model_dir,
        "--prompts",
        prompts_file,
        "--out",
        out,
        "--baseline",
        baseline,
        *FAST,
        *extra,
    ]


def test_end_to_end_dense_and_resumed_after_an_interruption(
    tiny_llama_dir, dpo_adapter, prompts_file, tmp_path, head_env, monkeypatch, capsys
):
    import alignd.train.implicit_targets as implicit

    out = tmp_path / "head"
    assert run_cli(implicit_argv(tiny_llama_dir, prompts_file, out, dpo_adapter)) == 0, capsys.readouterr().err
    manifest = json.loads((out / HEAD_MANIFEST).read_text())
    assert (manifest["targets"], manifest["beta"], manifest["top_k"], manifest["transfer"]) == (
        "implicit",
        BETA,
        3,
        "direct",
    )
    assert manifest["reward"] == "positivity" and manifest["baseline_trained_by"] == "dpo"  # the adapter's own
    assert "rollout_len" not in manifest and manifest["baseline"]["weights_digest"] == weights_digest(dpo_adapter)
    data = manifest["data"]
    answers = [json.loads(line) for line in (Path(data["kept_in"]) / "answers.jsonl").read_text().splitlines()]
    assert data["answers"] == len(answers) == 8
    assert data["states"] == sum(len(a["answer"]) for a in answers) > 8  # every position is a state
    assert data["split"]["train_states"] + data["split"]["heldout_states"] == data["states"]
    # nearly greedy answers: their tokens are the pass's top-1 nearly always (a shifted position: chance, 3/vocab)
    assert manifest["features"]["check"]["sampled_token_in_top_k"] >= 0.9
    assert data["targets"]["std_within_state"] > 0
    loaded = load_value_head(
        out,
        vocab_size=manifest["head"]["vocab_size"],
        hidden_size=32,
        base_weights_digest=weights_digest(tiny_llama_dir),
    )
    assert loaded.reward == "positivity"

    # interrupted after 3 sampled answers (a torn line left behind), in a fresh cache; then resumed
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache-2"))
    resumed = tmp_path / "resumed"
    argv = implicit_argv(tiny_llama_dir, prompts_file, resumed, dpo_adapter)
    real_append = implicit.append_work_records
    sampled: list[int] = []

    def append_then_stop(path, records):
        real_append(path, records)
        sampled.extend(r["slot"] for r in records if "answer" in r)
        if path.name == "answers.jsonl" and len(sampled) == 3:
            with open(path, "a") as handle:
                handle.write('{"slot": 99, "prompt_id": "p')
            raise KeyboardInterrupt

    monkeypatch.setattr(implicit, "append_work_records", append_then_stop)
    assert run_cli(argv) == 130 and not resumed.exists()
    first = list(sampled)
    sampled.clear()
    monkeypatch.setattr(
        implicit,
        "append_work_records",
        lambda path, records: (sampled.extend(r["slot"] for r in records if "answer" in r), real_append(path, records)),
    )
    assert run_cli(argv) == 0, capsys.readouterr().err
    assert sorted(sampled) == sorted(set(range(8)) - set(first))  # no finished answer sampled again
    again = json.loads((resumed / HEAD_MANIFEST).read_text())
    assert again["data"]["targets"] == pytest.approx(data["targets"]) and again["data"]["split"] == data["split"]


def test_a_baseline_without_an_implicit_q_or_another_reward_is_a_one_line_error(
    tiny_llama_dir, dpo_adapter, prompts_file, tmp_path, head_env, capsys
):
    sft_lora = make_adapter(tiny_llama_dir, tmp_path / "sft-lora", seed=6, manifest={"kind": "sft"})
    capsys.readouterr()  # (transformers' loading bar)
    cases = [
        ([sft_lora], ["was not trained by DPO or IRFT (its manifest's kind: sft)", "--targets rollouts"]),
        (["prompted"], ["is a prompted baseline, not an adapter", "--targets rollouts"]),
        ([dpo_adapter, "--reward", "length_penalty"], ["Q of the baseline's own reward, 'positivity'"]),
        ([dpo_adapter, "--shard", "0/2"], ["--shard is for rollout targets"]),
    ]
    for i, (extra, says) in enumerate(cases):
        code = run_cli(implicit_argv(tiny_llama_dir, prompts_file, tmp_path / f"out{i}", *extra))
        assert_one_line_error(capsys, code, *says)
    rollouts = [
        "train",
        "value-head",
        "--model",
        tiny_llama_dir,
        "--prompts",
        prompts_file,
        "--out",
        tmp_path / "r",
        "--answers",
        "4",
    ]
    assert_one_line_error(capsys, run_cli(rollouts), "--answers is for --targets implicit")


def test_the_committed_implicit_head_is_made_for_the_embedded_model_with_its_record(embedded_model_dir):
    """value_heads/smollm2-positivity-implicit: it loads for the embedded model's weights, is within the size
    limit, was distilled from the committed DPO adapter's implicit Q, and its manifest holds what reproduces it
    (the command docs/TRAINING.md gives) and its held-out record."""
    from alignd.settings import ASSETS_DIR, EMBEDDED_ADAPTER_DIR
    from alignd.train.data import file_sha256

    folder = ASSETS_DIR / "value_heads" / "smollm2-positivity-implicit"
    config = json.loads((embedded_model_dir / "config.json").read_text())
    manifest = load_value_head(
        folder,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        base_weights_digest=weights_digest(embedded_model_dir),
    ).manifest
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 10 * 2**20
    assert (manifest["targets"], manifest["beta"], manifest["reward"], manifest["top_k"]) == (
        "implicit",
        0.1,
        "positivity",
        10,
    )
    assert manifest["baseline"]["weights_digest"] == weights_digest(EMBEDDED_ADAPTER_DIR)
    pool = Path(__file__).resolve().parents[1] / "train" / "data" / "prompts.jsonl"
    assert manifest["data"]["sha256"] == file_sha256(pool) and manifest["data"]["eval_prompts"]["shared"] == 0
    command = " ".join(manifest["command"])
    assert "--targets implicit" in command and "--seed 0" in command and "--alpha 0.1" in command
    assert manifest["metrics"]["heldout"]["spearman_mean"] == manifest["learning_curve"][-1]["heldout_spearman"]
    assert manifest["features"]["check"]["sampled_token_in_top_k"] > 0.5 and (folder / "learning_curve.png").is_file()
