"""``alignd train value-head`` on the tiny random Llama of conftest (CPU, the transformers engine: no vLLM,
no server; the whole file takes well under a minute on an idle machine).

- the features: the hidden state the head reads is the LM head's input (lm_head(h) gives the model's
  logits, and h is the output of the final norm);
- the targets: at every state of a TQ* decoding, the candidates and values the command computes are the
  ones ``transfer_q`` itself uses (same estimator, greedy rollouts: exactly equal);
- training: the loss ignores per-state shifts and is zero at the targets; a few hundred Adam steps learn a
  target that a head can represent (held-out Spearman and loss); the Spearman is scipy's;
- the command end to end with an adapter baseline: manifest, learning curve, plot, the head loads and is
  refused for another vocabulary; an interrupted run resumes without redoing finished states and ends
  with the same data and metrics as an uninterrupted one;
- bad input: one line, exit status 2; the import-linter allowance is for this module only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignd.cli import main
from alignd.errors import ConfigurationError
from alignd.models.value_head import HEAD_MANIFEST, HEAD_WEIGHTS, ValueHead, ValueHeadConfig, load_value_head
from alignd.models.weights import weights_digest
from alignd.settings import Settings
from alignd.train.value_head import (
    PLOT_FILE,
    HeadData,
    HeadTrainingOptions,
    TargetMaker,
    TargetOptions,
    final_hidden_states,
    head_loss,
    per_state_spearman,
    split_by_prompt,
    state_slots,
    train_with_learning_curve,
)

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
CALLABLE_REWARDS = {"chars": {"type": "callable", "path": "train_rewards:distinct_characters"}}
# A tiny run: 12 states, 3 candidates, 4-token rollouts, a small head.
FAST = [
    "--states",
    "12",
    "--top-k",
    "3",
    "--rollout-len",
    "4",
    "--answer-len",
    "6",
    "--concurrency",
    "4",
    "--rank",
    "8",
    "--epochs",
    "4",
    "--batch-size",
    "4",
    "--learning-rate",
    "1e-2",
    "--holdout-fraction",
    "0.25",
    "--reward",
    "chars",
]
MANIFEST_KEYS = {
    "format",
    "kind",
    "created",
    "base_model",
    "baseline",
    "reward",
    "top_k",
    "rollout_len",
    "num_rollouts",
    "alpha",
    "features",
    "data",
    "training",
    "metrics",
    "learning_curve",
    "command",
    "seed",
    "versions",
    "wall_s",
    "head",
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(argv: list) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


@pytest.fixture
def head_env(monkeypatch, tmp_path):
    """The transformers engine, the test reward, a private cache, quiet."""
    monkeypatch.setenv("ALIGND_ENGINE", "hf")
    monkeypatch.setenv("ALIGND_REWARDS", json.dumps(CALLABLE_REWARDS))
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGND_LOG_LEVEL", "warning")
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model with random (non-zero) weights: a baseline that differs from the
    SFT model, saved as PEFT saves it (no alignd manifest, so no digest to check)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_model(tiny_llama_dir), lora)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = tmp_path_factory.mktemp("tiny-adapter")
    model.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------- features
def test_the_features_are_the_lm_head_input(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    sequences = [[5, 9, 17, 3], [40, 2], [7, 8, 9, 10, 11, 12, 13], [60], [21, 22, 23]]
    normed = []
    hook = model.model.norm.register_forward_hook(lambda _m, _i, out: normed.append(out[0, -1].detach().clone()))
    logits = []
    with torch.no_grad():
        for seq in sequences:  # one at a time, unpadded: the reference
            logits.append(model(input_ids=torch.tensor([seq])).logits[0, -1])
    hook.remove()

    hidden = final_hidden_states(model, sequences, batch_size=3)  # batched by length, right-padded

    assert hidden.dtype == torch.float32 and hidden.shape == (len(sequences), model.config.hidden_size)
    with torch.no_grad():
        for i in range(len(sequences)):
            # the vector the LM head reads: it gives the model's own next-token logits ...
            torch.testing.assert_close(model.lm_head(hidden[i]), logits[i], atol=1e-4, rtol=1e-4)
            # ... and it is the output of the final norm (what vLLM's compute_logits receives)
            torch.testing.assert_close(hidden[i], normed[i], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- targets
async def test_targets_are_the_values_transfer_q_uses(tiny_llama_dir, tmp_path):
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import Generation
    from alignd.models.engine import GenerationParams
    from alignd.models.hf_engine import HFEngine
    from alignd.rewards.registry import build_rewards

    settings = Settings(engine="hf", model=str(tiny_llama_dir), rewards=CALLABLE_REWARDS, cache_dir=tmp_path)
    engine = HFEngine.from_pretrained(tiny_llama_dir)
    registry = await build_rewards(settings, engine)
    generation = Generation(engine, registry, settings)  # the prompted baseline is the default
    options = TargetOptions(top_k=3, rollout_len=4, answer_len=6)
    maker = TargetMaker.for_transfer_q(generation, reward="chars", options=options)
    assert maker.config.rollout_temperature == 0.0  # one greedy rollout per candidate: deterministic

    # A TQ* decoding with diagnostics: every step's candidates and their values
    prompt = generation.render_chat([{"role": "user", "content": "hello world"}])
    request = DecodingConfig(method="transfer_q", top_k=3, rollout_len=4, reward="chars", diagnostics=True)
    plan = generation.plan(prompt, GenerationParams(max_tokens=4, temperature=0.0), request)
    steps = (await generation.generate(plan, "tq")).choices[0].alignment.steps
    assert len(steps) >= 2
    generated: list[int] = []
    for step in steps:
        mine = await maker.values_at(prompt, generated, None)
        assert mine.candidates == [c.token_id for c in step.candidates]
        assert mine.values == [c.value for c in step.candidates]  # exactly: the same estimator, greedy rollouts
        assert mine.sft_logprobs == pytest.approx([c.sft_logprob for c in step.candidates], abs=1e-6)
        generated += step.chosen
    assert len({v for step in steps for v in (c.value for c in step.candidates)}) > 1  # the reward varies

    # a state of the command: an SFT answer cut at a seeded length, its targets the same function's
    slot = state_slots([_record("p0", "hello world")], 1, seed=7)[0]
    record = await maker.state(slot)
    assert record == {**await maker.state(slot), "seconds": record["seconds"]}  # seeded: the same state again
    cut = record["cut"]
    assert 0 <= cut <= min(record["answer_tokens"], options.answer_len - 1)
    assert record["tokens"][: record["prompt_tokens"]] == list(prompt.token_ids)
    again = await maker.values_at(prompt, record["tokens"][record["prompt_tokens"] :], None)
    assert (again.candidates, again.values) == (record["candidates"], record["values"])
    await registry.close()


def _record(pid: str, text: str):
    from alignd.train.data import PromptRecord

    return PromptRecord(pid, text, 1)


# ---------------------------------------------------------------------------- loss, metrics, training
def test_the_loss_sees_only_differences_within_a_state():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(6, 4, generator=generator)
    shift = torch.randn(6, 1, generator=generator)
    loss, parts = head_loss(targets + shift, targets, scale=0.5, ranking_weight=1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and parts["pairwise"] == pytest.approx(0.0, abs=1e-6)
    worse, _ = head_loss(targets.flip(-1), targets, scale=0.5, ranking_weight=1.0)
    assert float(worse) > 0.1


def test_per_state_spearman_is_scipys():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 6))
    targets = np.round(rng.normal(size=(5, 6)), 0)  # ties
    targets[4] = 1.0  # no ranking at all
    rho = per_state_spearman(values, targets)
    for i in range(4):
        assert rho[i] == pytest.approx(spearmanr(values[i], targets[i]).statistic)
    assert np.isnan(rho[4])


def synthetic_data(n_states: int, k: int, d: int, vocab: int, seed: int) -> tuple[HeadData, ValueHead]:
    """States whose targets a head can represent: a random teacher head's values, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = ValueHead(ValueHeadConfig(hidden_size=d, vocab_size=vocab, rank=8)).eval()
    table = torch.randn(vocab, d, generator=generator)
    hidden = torch.randn(n_states, d, generator=generator)
    candidates = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(n_states)])
    with torch.no_grad():
        targets = teacher(hidden, table[candidates]) * 3
    targets += 0.01 * torch.randn(targets.shape, generator=generator)
    sft = torch.log_softmax(torch.randn(n_states, k, generator=generator), -1)
    prompt_ids = [f"p{i // 4}" for i in range(n_states)]
    return HeadData(hidden, candidates, table, targets, sft, prompt_ids), teacher


def test_a_few_hundred_steps_learn_a_learnable_target():
    data, _ = synthetic_data(n_states=320, k=5, d=16, vocab=60, seed=1)
    train_rows, heldout_rows = split_by_prompt(data.prompt_ids, 0.25, seed=0)
    held_prompts = {data.prompt_ids[i] for i in heldout_rows}
    assert held_prompts and not held_prompts & {data.prompt_ids[i] for i in train_rows}  # no prompt on both sides
    opts = HeadTrainingOptions(rank=16, epochs=40, learning_rate=1e-2, batch_size=32, curve_fractions=(0.1, 0.5, 1.0))

    fitted, curve, fit = train_with_learning_curve(data, train_rows, heldout_rows, opts, vocab_size=60)

    history = fitted.history
    assert history[-1]["heldout_loss"] < 0.5 * history[0]["heldout_loss"]
    assert history[-1]["heldout_spearman"] > history[0]["heldout_spearman"]
    final = curve[-1]["heldout"]
    assert final["spearman_mean"] > 0.8 and final["pairwise_accuracy"] > 0.85, final
    assert final["mse_centred"] < 0.25 * final["target_variance_centred"]
    # three data sizes, same number of steps each, and more data helps here
    assert [c["train_states"] for c in curve] == [math.ceil(f * len(train_rows)) for f in (0.1, 0.5, 1.0)]
    assert len({c["steps"] for c in curve}) == 1 and fit["steps"] == curve[0]["steps"]
    assert curve[-1]["heldout"]["spearman_mean"] > curve[0]["heldout"]["spearman_mean"]


# ---------------------------------------------------------------------------- the command
def head_argv(model_dir, prompts_file, out, *extra) -> list:
    return ["train", "value-head", "--model", model_dir, "--prompts", prompts_file, "--out", out, *FAST, *extra]


def test_end_to_end_with_an_adapter_baseline_and_resumed_after_an_interruption(
    tiny_llama_dir, tiny_adapter, prompts_file, tmp_path, head_env, monkeypatch, capsys
):
    import alignd.train.value_head as value_head
    from alignd.train.value_head import rollouts  # the module that appends each finished state

    out = tmp_path / "head"
    argv = head_argv(tiny_llama_dir, prompts_file, out, "--baseline", tiny_adapter)
    assert run_cli(argv) == 0
    assert f"value head written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [HEAD_MANIFEST, PLOT_FILE, HEAD_WEIGHTS]
    assert not out.with_name("head.partial").exists()
    assert sum(p.stat().st_size for p in out.iterdir()) < 10 * 2**20
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((out / HEAD_MANIFEST).read_text())
    assert MANIFEST_KEYS <= set(manifest), MANIFEST_KEYS - set(manifest)
    assert manifest["kind"] == "value_head" and manifest["reward"] == "chars"
    assert manifest["base_model"]["weights_digest"] == weights_digest(tiny_llama_dir)
    assert manifest["baseline"]["kind"] == "adapter"
    assert manifest["baseline"]["weights_digest"] == weights_digest(tiny_adapter)
    assert (manifest["top_k"], manifest["rollout_len"], manifest["num_rollouts"], manifest["alpha"]) == (3, 4, 1, 1.0)
    assert manifest["rollout_temperature"] == 0.0
    data = manifest["data"]
    assert data["states"] == 12 and data["sha256"] and data["eval_prompts"]["checked"] is True
    split = data["split"]
    assert split["train_states"] + split["heldout_states"] == 12 and split["heldout_prompts"] == 2
    assert data["cost_per_state"]["rollouts"] <= 3
    assert manifest["features"]["check"]["hf_top1_agreement"] == 1.0  # the same float32 model on both sides
    assert manifest["features"]["check"]["max_logprob_gap"] < 1e-3
    heldout = manifest["metrics"]["heldout"]
    for key in ("spearman_mean", "top1_agreement", "sft_top1_agreement", "mse_centred"):
        assert key in heldout
    assert set(heldout["top1_agreement_by_alpha"]) == {"0.1", "0.3", "1"}
    assert [c["fraction"] for c in manifest["learning_curve"]] == [0.25, 0.5, 1.0]
    assert all("heldout_spearman" in c for c in manifest["learning_curve"])
    assert manifest["command"][:3] == ["alignd", "train", "value-head"]
    assert manifest["head"] == {
        "architecture": "additive-mlp",
        "hidden_size": 32,
        "vocab_size": manifest["head"]["vocab_size"],
        "rank": 8,
    }

    vocab = manifest["head"]["vocab_size"]
    loaded = load_value_head(out, vocab_size=vocab, hidden_size=32, base_weights_digest=weights_digest(tiny_llama_dir))
    assert loaded.reward == "chars"
    with pytest.raises(ConfigurationError, match=f"vocabulary of {vocab} tokens.*has {vocab + 7}"):
        load_value_head(out, vocab_size=vocab + 7)

    # the finished states are kept in the cache, for a later run with other training options
    kept = Path(data["kept_in"])
    assert kept.is_relative_to(tmp_path / "cache") and len((kept / "states.jsonl").read_text().splitlines()) == 12

    # The same run, interrupted after 5 finished states (a torn line left behind), then resumed; in a
    # fresh cache, so that it makes its own states.
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache-2"))
    resumed = tmp_path / "resumed"
    argv = head_argv(tiny_llama_dir, prompts_file, resumed, "--baseline", tiny_adapter)
    made: list[int] = []
    real_state, real_append = value_head.TargetMaker.state, rollouts.append_work_records

    async def counted_state(self, slot):
        made.append(slot.index)
        return await real_state(self, slot)

    def append_then_stop(path, records):
        real_append(path, records)
        if sum(1 for _ in open(path)) == 5:
            with open(path, "a") as handle:
                handle.write('{"slot": 99, "prompt_id": "p')  # killed in the middle of the next write
            raise KeyboardInterrupt

    monkeypatch.setattr(value_head.TargetMaker, "state", counted_state)
    monkeypatch.setattr(rollouts, "append_work_records", append_then_stop)
    assert run_cli(argv) == 130
    assert "resume" in capsys.readouterr().err
    states_file = resumed.with_name("resumed.partial") / "states.jsonl"
    finished = [json.loads(line)["slot"] for line in states_file.read_text().splitlines()[:5]]
    assert not resumed.exists() and len(finished) == 5

    made.clear()
    monkeypatch.setattr(rollouts, "append_work_records", real_append)
    assert run_cli(argv) == 0
    assert sorted(made) == sorted(set(range(12)) - set(finished))  # no finished state made again
    again = json.loads((resumed / HEAD_MANIFEST).read_text())
    # seeded per state: the same states and targets as the uninterrupted run, so the same head
    assert again["data"]["targets"] == manifest["data"]["targets"]
    assert again["data"]["split"] == manifest["data"]["split"]
    by_alpha = again["metrics"]["heldout"].pop("top1_agreement_by_alpha")
    assert by_alpha == heldout.pop("top1_agreement_by_alpha")
    assert again["metrics"]["heldout"] == pytest.approx(heldout, abs=1e-6)

    # an existing head is replaced only with --overwrite; other training options reuse the kept states
    assert run_cli(argv) == 2
    assert "already exists" in capsys.readouterr().err
    made.clear()
    assert run_cli([*argv, "--overwrite", "--rank", "4"]) == 0
    assert made == []
    retrained = json.loads((resumed / HEAD_MANIFEST).read_text())
    assert retrained["head"]["rank"] == 4 and retrained["data"]["targets"] == manifest["data"]["targets"]
    assert any("reused 12 finished states" in note for note in retrained["resumed"]["notes"])


def test_shards_make_the_states_together_and_the_plain_command_merges_and_trains(
    tiny_llama_dir, tiny_adapter, prompts_file, tmp_path, head_env, monkeypatch, capsys
):
    """--shard K/N: each process makes the slots K mod N in a file of its own and stops; a shard already
    running, or still running when the plain command starts, is refused; the plain command merges the
    shards, makes no state again, and trains on exactly the states an unsharded run makes."""
    import fcntl

    import alignd.train.value_head as value_head

    made: list[int] = []
    real_state = value_head.TargetMaker.state

    async def counted_state(self, slot):
        made.append(slot.index)
        return await real_state(self, slot)

    monkeypatch.setattr(value_head.TargetMaker, "state", counted_state)
    out = tmp_path / "head"
    partial = tmp_path / "head.partial"
    argv = head_argv(tiny_llama_dir, prompts_file, out, "--baseline", tiny_adapter)

    assert run_cli([*argv, "--shard", "0/2"]) == 0
    assert "the states of shard 0/2 (the same command without --shard trains)" in capsys.readouterr().out
    assert sorted(made) == [0, 2, 4, 6, 8, 10] and not out.exists()
    shard0 = partial / "states.shard-0-of-2.jsonl"
    assert sorted(json.loads(line)["slot"] for line in shard0.read_text().splitlines()) == [0, 2, 4, 6, 8, 10]

    # a shard whose process is running (it holds the lock on its file) is neither run twice nor merged
    shard1 = partial / "states.shard-1-of-2.jsonl"
    with open(shard1, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        made.clear()
        assert_one_line_error(capsys, run_cli([*argv, "--shard", "1/2"]), "--shard 1/2 is already running")
        assert_one_line_error(capsys, run_cli(argv), "states.shard-1-of-2.jsonl is still being made")
        assert made == []
    assert run_cli([*argv, "--shard", "1/2"]) == 0
    assert sorted(made) == [1, 3, 5, 7, 9, 11]
    capsys.readouterr()

    made.clear()
    assert run_cli(argv) == 0
    assert made == []  # every state came from the shards
    assert f"value head written to {out}" in capsys.readouterr().out
    assert not partial.exists() and not tmp_path.joinpath("head.partial.lock").exists()
    sharded = json.loads((out / HEAD_MANIFEST).read_text())
    assert sharded["data"]["states"] == 12
    assert any("merged 12 states made by --shard runs" in note for note in sharded["resumed"]["notes"])

    # per-slot seeds: the same states and targets as one process makes
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache-2"))
    assert run_cli(head_argv(tiny_llama_dir, prompts_file, tmp_path / "one", "--baseline", tiny_adapter)) == 0
    one = json.loads((tmp_path / "one" / HEAD_MANIFEST).read_text())
    assert one["data"]["targets"] == sharded["data"]["targets"] and one["data"]["split"] == sharded["data"]["split"]
    capsys.readouterr()

    assert_one_line_error(
        capsys, run_cli([*argv, "--overwrite", "--shard", "2/2"]), "--shard 2/2: N must be >= 2 and K in 0..N-1"
    )
    assert_one_line_error(capsys, run_cli([*argv, "--overwrite", "--shard", "half"]), "--shard 'half' is not K/N")


def assert_one_line_error(capsys, code: int, *expected: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("alignd train value-head: error:") and all(e in lines[0] for e in expected), lines[0]


def _an_eval_prompt() -> dict:
    from alignd.train.value_head import DEFAULT_EVAL_PROMPTS

    return json.loads(DEFAULT_EVAL_PROMPTS.read_text().splitlines()[3])


BAD_OPTIONS = {
    "unknown reward": (["--reward", "nope"], ["unknown reward 'nope'; known rewards: ", "chars", "positivity"]),
    "unknown baseline": (["--baseline", "nobody"], ["unknown baseline 'nobody'", "default, prompted"]),
    "top-k above the limit": (["--top-k", "50"], ["--top-k 50 is out of range: 1 to 20"]),
    "too few states": (["--states", "2"], ["--states must be >= 4"]),
    "no full-data point": (["--curve-fractions", "0.2,0.5,0.8"], ["--curve-fractions needs", "1 among them"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_a_bad_option_is_a_one_line_error(case, tiny_llama_dir, prompts_file, tmp_path, head_env, capsys):
    extra, expected = BAD_OPTIONS[case]
    code = run_cli(head_argv(tiny_llama_dir, prompts_file, tmp_path / "out", *extra))
    assert_one_line_error(capsys, code, *expected)
    assert not (tmp_path / "out.partial").exists()


def test_a_training_pool_that_shares_an_evaluation_prompt_is_refused(tiny_llama_dir, tmp_path, head_env, capsys):
    shared = _an_eval_prompt()
    pool = write_jsonl(
        tmp_path / "pool.jsonl",
        [{"id": "a", "prompt": "hello world"}, {"id": "b", "prompt": "  " + shared["prompt"].upper() + " "}],
    )
    code = run_cli(head_argv(tiny_llama_dir, pool, tmp_path / "out"))
    assert_one_line_error(
        capsys, code, f"{pool}:2: prompt 'b' is also evaluation prompt '{shared['id']}'", "must be disjoint"
    )


def test_an_existing_output_folder_is_refused_without_overwrite(
    tiny_llama_dir, prompts_file, tmp_path, head_env, capsys
):
    (tmp_path / "out").mkdir()
    code = run_cli(head_argv(tiny_llama_dir, prompts_file, tmp_path / "out"))
    assert_one_line_error(capsys, code, "already exists (pass --overwrite to replace it)")


def test_the_committed_pools_are_disjoint():
    from alignd.train.data import read_prompts
    from alignd.train.value_head import DEFAULT_EVAL_PROMPTS, check_disjoint

    pool = Path(__file__).resolve().parents[1] / "train" / "data" / "prompts.jsonl"
    checked = check_disjoint(read_prompts(pool), pool, DEFAULT_EVAL_PROMPTS)
    assert checked["checked"] and checked["shared"] == 0 and checked["prompts"] == 112


def test_the_committed_default_head_is_made_for_the_embedded_model_with_its_record(embedded_model_dir):
    """value_heads/smollm2-positivity (what ALIGND_VALUE_HEAD=default serves): it loads for the embedded
    model's weights, is within the size limit, and its manifest holds what reproduces and judges it."""
    from alignd.settings import EMBEDDED_VALUE_HEAD_DIR
    from alignd.train.data import file_sha256

    folder = EMBEDDED_VALUE_HEAD_DIR
    config = json.loads((embedded_model_dir / "config.json").read_text())
    loaded = load_value_head(
        folder,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        base_weights_digest=weights_digest(embedded_model_dir),
    )
    manifest = loaded.manifest
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 10 * 2**20
    assert manifest["reward"] == "positivity" and manifest["top_k"] == 10
    assert manifest["baseline"]["kind"] == "adapter"
    pool = Path(__file__).resolve().parents[1] / "train" / "data" / "prompts.jsonl"
    assert manifest["data"]["sha256"] == file_sha256(pool)  # the committed pool, unchanged since
    assert manifest["data"]["eval_prompts"]["shared"] == 0
    command = " ".join(manifest["command"])  # the argv of the run, as docs/TRAINING.md gives it
    assert "train value-head" in command and "--seed 0" in command and "--reward positivity" in command
    curve = manifest["learning_curve"]
    assert len(curve) >= 3 and [c["train_states"] for c in curve] == sorted({c["train_states"] for c in curve})
    heldout = manifest["metrics"]["heldout"]
    assert heldout["spearman_mean"] == curve[-1]["heldout_spearman"]
    assert (folder / "learning_curve.png").is_file()


# ---------------------------------------------------------------------------- the layering allowance
def test_only_the_value_head_module_may_import_decoding(tmp_path):
    import lint_imports

    tree = lint_imports.build_tree(tmp_path)
    module = "alignd.train.irft"
    source = tree.joinpath(*module.split(".")).with_suffix(".py").resolve().read_text()
    lint_imports.override(tree, module, source + "\nimport alignd.decoding.values  # deliberately wrong\n")
    result = lint_imports.run_in_tree(tree, capture=True)
    assert result.returncode != 0
    assert "alignd.train builds on models, rewards, settings, errors and protocol only BROKEN" in result.stdout
    assert "alignd.train.irft -> alignd.decoding.values" in result.stdout


def test_a_remote_baseline_is_a_baseline_of_value_head_training(tiny_llama_dir):
    from alignd.train.value_head import resolve_baseline

    url = "http://127.0.0.1:8100"
    settings = Settings(model=str(tiny_llama_dir), baseline_url=url, baseline_served_model="bl")
    # ALIGND_BASELINE_URL is the server's default baseline, so it is the default one here too
    choice = resolve_baseline(settings, "default", tiny_llama_dir)
    assert (choice.kind, choice.source, choice.weights_digest) == ("url", f"{url} (bl)", None)
    assert choice.engine_updates["baseline_url"] == url and choice.engine_updates["baseline_served_model"] == "bl"
    # another choice unsets it: the engine's default baseline must be the chosen one, not the remote
    prompted = resolve_baseline(settings, "prompted", tiny_llama_dir)
    assert prompted.kind == "prompted" and prompted.engine_updates["baseline_url"] is None
    named = Settings(model=str(tiny_llama_dir), baselines={"far": {"url": url}})
    far = resolve_baseline(named, "far", tiny_llama_dir)
    assert far.kind == "url" and far.source == url and far.engine_updates["baseline_served_model"] is None
