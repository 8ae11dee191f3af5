"""``alignd train``: DPO and IRFT adapters on the tiny random Llama of conftest (seconds each, CPU only,
no server, no vLLM: sampling runs on the transformers engine, ALIGND_ENGINE=hf).

- TRL's loss on a fixed batch equals a hand computation from per-sequence log-probabilities of the
  response tokens, adapter on (policy) and off (reference = SFT), for DPO pairs and for IRFT pairs
  (demonstration vs generation), the latter in a later round, where the reference must still be the SFT
  model and not the previous round's policy;
- a few steps raise the implicit-reward margin on the training pairs;
- the commands end to end: manifests, base-model digest, resumption (sampling batches, TRL checkpoints,
  IRFT rounds), and every bad input as a one-line error with exit status 2;
- the import-linter contracts of alignd.train break when they should.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignd.cli import main
from alignd.models.weights import weights_digest
from alignd.train.data import Demonstration
from alignd.train.irft import GenerationOptions, generate_negatives, irft_pairs
from alignd.train.tuning import PreferencePair, TrainingOptions, build_trainer, train_adapter

PROMPTS = ["hello world", "the cat sat", "a happy answer", "numbers one two", "how are you", "the dog sat on"]
DEMOS = [
    ("hello world", "i am fine thank you"),
    ("the cat sat", "on the mat"),
    ("a happy answer", "is kind and warm"),
    ("numbers one two", "three four five"),
]
PAIRS = [
    PreferencePair("a", "hello world", "a happy answer is kind", "the dog sat on the log"),
    PreferencePair("b", "the cat sat", "on the mat", "numbers one two three four"),
    PreferencePair("c", "how are you", "i am fine thank you", "seven eight nine"),
    PreferencePair("d", "numbers one two", "three four five", "hello world how are"),
]
CALLABLE_REWARDS = {
    "chars": {"type": "callable", "path": "train_rewards:distinct_characters"},
    "flat": {"type": "callable", "path": "train_rewards:constant"},
}
# Small and fast: 2 samples of 8 tokens per prompt, 2 optimizer steps of 2 pairs.
FAST = [
    "--samples-per-prompt",
    "2",
    "--max-new-tokens",
    "8",
    "--max-steps",
    "2",
    "--batch-size",
    "2",
    "--sample-batch-size",
    "2",
    "--logging-steps",
    "1",
]
MANIFEST_KEYS = {
    "kind",
    "created",
    "base_model",
    "reward",
    "beta",
    "data",
    "metrics",
    "command",
    "seed",
    "versions",
    "dpo_config",
    "lora_config",
}


# ---------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


@pytest.fixture
def demos_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "demos.jsonl", [{"id": f"d{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(DEMOS)]
    )


@pytest.fixture
def train_env(monkeypatch, tmp_path):
    """The settings every command here runs with: the transformers engine, the test rewards, a private cache."""
    monkeypatch.setenv("ALIGND_ENGINE", "hf")
    monkeypatch.setenv("ALIGND_REWARDS", json.dumps(CALLABLE_REWARDS))
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGND_LOG_LEVEL", "warning")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def run_cli(argv: list[str]) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The chat rendered with and without the answer; the answer's tokens start where the two diverge
    (the tiny BPE merges the template's trailing space into the answer's first word)."""
    user = [{"role": "user", "content": prompt}]
    prompt_ids = chat_ids(tokenizer, user, generation_prompt=True)
    full = chat_ids(tokenizer, [*user, {"role": "assistant", "content": answer}], generation_prompt=False)
    k = 0
    while k < min(len(prompt_ids), len(full)) and prompt_ids[k] == full[k]:
        k += 1
    return full[:k], full[k:]


def sequence_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """log pi(answer | prompt): the sum of the answer tokens' log-probabilities, one unpadded forward pass."""
    head, tail = split_ids(tokenizer, prompt, answer)
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(head) + j - 1, tok]) for j, tok in enumerate(tail))


def implicit_margins(policy, reference, tokenizer, pairs, beta) -> list[float]:
    """beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] per pair."""
    out = []
    for p in pairs:
        chosen = sequence_logprob(policy, tokenizer, p.prompt, p.chosen) - sequence_logprob(
            reference, tokenizer, p.prompt, p.chosen
        )
        rejected = sequence_logprob(policy, tokenizer, p.prompt, p.rejected) - sequence_logprob(
            reference, tokenizer, p.prompt, p.rejected
        )
        out.append(beta * (chosen - rejected))
    return out


def hand_dpo_loss(margins: list[float]) -> float:
    """-log sigmoid(margin), averaged over the batch (TRL's 'sigmoid' loss)."""
    return float(torch.stack([-F.logsigmoid(torch.tensor(m, dtype=torch.float64)) for m in margins]).mean())


def randomize_adapter(peft_model, seed: int, scale: float = 0.2) -> None:
    """LoRA's B starts at zero (policy == reference, loss log 2 whatever the data): make the check real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def trl_batch_loss(trainer, n: int) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def load_sft(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- the weights digest
def test_weights_digest_is_over_tensors_not_files(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    digest = weights_digest(tiny_llama_dir)
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    names = sorted(tensors)
    # the same tensors, in two shards written in another order with other metadata: the same digest
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {"b.safetensors": names[: len(names) // 2], "a.safetensors": names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in reversed(part)}, str(sharded / file), metadata={"format": "pt", "by": "test"})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}})
    )
    assert weights_digest(sharded) == digest
    # one value changed, or one dtype: another digest
    changed = tmp_path / "changed"
    changed.mkdir()
    edited = dict(tensors)
    edited[names[0]] = tensors[names[0]].clone()
    edited[names[0]].view(-1)[0] += 1
    save_file(edited, str(changed / "model.safetensors"))
    assert weights_digest(changed) != digest
    edited[names[0]] = tensors[names[0]].to(torch.bfloat16)
    save_file(edited, str(changed / "model.safetensors"))
    assert weights_digest(changed) != digest


# ---------------------------------------------------------------------------- the losses, by hand
def test_trl_dpo_loss_equals_the_hand_computation(tiny_llama_dir, tmp_path):
    opts = TrainingOptions(beta=0.3, lora_rank=4, batch_size=2, max_steps=1)
    trainer = build_trainer(tiny_llama_dir, PAIRS, opts, tmp_path / "checkpoints")
    randomize_adapter(trainer.model, seed=1)
    tokenizer = trainer.processing_class
    # TRL tokenized the pairs as the hand computation does
    for i, pair in enumerate(PAIRS):
        row = trainer.train_dataset[i]
        head, tail = split_ids(tokenizer, pair.prompt, pair.chosen)
        assert (row["prompt_ids"], row["chosen_ids"]) == (head, tail)

    loss = trl_batch_loss(trainer, len(PAIRS))

    with trainer.model.disable_adapter():  # the reference: the SFT weights
        reference_lps = {
            (p.id, side): sequence_logprob(trainer.model, tokenizer, p.prompt, getattr(p, side))
            for p in PAIRS
            for side in ("chosen", "rejected")
        }
    sft = load_sft(tiny_llama_dir)
    assert reference_lps[("a", "chosen")] == pytest.approx(
        sequence_logprob(sft, tokenizer, "hello world", PAIRS[0].chosen), abs=1e-5
    )
    margins = []
    for p in PAIRS:
        lp_w = sequence_logprob(trainer.model, tokenizer, p.prompt, p.chosen)
        lp_l = sequence_logprob(trainer.model, tokenizer, p.prompt, p.rejected)
        margins.append(
            opts.beta * ((lp_w - reference_lps[(p.id, "chosen")]) - (lp_l - reference_lps[(p.id, "rejected")]))
        )
    assert abs(max(margins)) > 0.05  # the adapter does change the model
    assert loss == pytest.approx(hand_dpo_loss(margins), abs=1e-4)


def saved_random_adapter(model_dir, opts, folder: Path, seed: int) -> Path:
    """A non-trivial adapter saved as a finished round would leave it."""
    trainer = build_trainer(model_dir, PAIRS[:2], opts, folder / "checkpoints")
    randomize_adapter(trainer.model, seed=seed)
    trainer.model.save_pretrained(str(folder / "adapter"))
    return folder / "adapter"


def test_irft_loss_on_demonstration_vs_generation_keeps_the_sft_reference(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    opts = TrainingOptions(beta=0.2, lora_rank=4, batch_size=2, max_steps=1)
    demos = [Demonstration(f"d{i}", p, r, i + 1) for i, (p, r) in enumerate(DEMOS[:2])]
    round_one = saved_random_adapter(tiny_llama_dir, opts, tmp_path / "round-1", seed=2)
    negatives = generate_negatives(
        tiny_llama_dir,
        round_one,
        demos,
        tmp_path / "negatives.jsonl",
        GenerationOptions(max_new_tokens=6),
        seed=5,
        progress=False,
    )
    again = generate_negatives(
        tiny_llama_dir,
        round_one,
        demos,
        tmp_path / "again.jsonl",
        GenerationOptions(max_new_tokens=6),
        seed=5,
        progress=False,
    )
    assert [r["text"] for r in negatives] == [r["text"] for r in again]  # seeded: a resumed round draws the same
    pairs, identical = irft_pairs(demos, negatives)
    assert len(pairs) + identical == len(demos) and pairs
    assert all(p.chosen == d.response for p, d in zip(pairs, demos, strict=False))

    # round 2: the policy starts at round 1's adapter, the reference is still the SFT model
    trainer = build_trainer(tiny_llama_dir, pairs, opts, tmp_path / "checkpoints", init_adapter=round_one)
    loss = trl_batch_loss(trainer, len(pairs))

    tokenizer = trainer.processing_class
    policy = PeftModel.from_pretrained(load_sft(tiny_llama_dir), str(round_one)).eval()
    sft = load_sft(tiny_llama_dir)
    margins = implicit_margins(policy, sft, tokenizer, pairs, opts.beta)
    assert loss == pytest.approx(hand_dpo_loss(margins), abs=1e-4)
    # not the loss with round 1's policy as the reference (TRL's own choice for a wrapped PeftModel): log 2
    assert abs(loss - hand_dpo_loss([0.0] * len(pairs))) > 1e-3


def test_a_few_steps_raise_the_implicit_reward_margin(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    opts = TrainingOptions(
        beta=0.1, lora_rank=8, learning_rate=5e-3, max_steps=6, batch_size=2, logging_steps=1, save_steps=100
    )
    sft = load_sft(tiny_llama_dir)
    trainer = build_trainer(tiny_llama_dir, PAIRS, opts, tmp_path / "probe")
    tokenizer = trainer.processing_class
    before = implicit_margins(trainer.model, sft, tokenizer, PAIRS, opts.beta)  # a fresh adapter is the SFT model
    assert before == pytest.approx([0.0] * len(PAIRS), abs=1e-6)

    result = train_adapter(tiny_llama_dir, PAIRS, opts, tmp_path / "work")

    policy = PeftModel.from_pretrained(load_sft(tiny_llama_dir), str(result.adapter_dir)).eval()
    after = implicit_margins(policy, sft, tokenizer, PAIRS, opts.beta)
    assert sum(after) / len(after) > 0.05, after
    assert sum(a > 0 for a in after) >= 3
    # TRL's own logs say the same, and the metrics come from them
    assert result.metrics["steps"] == 6 and result.metrics["final_step"] == 6
    assert result.metrics["reward_margin"] > result.metrics["log"][0]["rewards/margins"]
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_training_resumes_from_the_last_trl_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    from trl import DPOTrainer

    opts = TrainingOptions(lora_rank=4, max_steps=3, batch_size=2, save_steps=1, logging_steps=1, learning_rate=1e-3)
    work = tmp_path / "work"
    original = DPOTrainer.training_step
    calls = []

    def stop_in_step_three(self, *args, **kwargs):
        if self.state.global_step == 2:  # checkpoint-2 is on disk: a kill here loses nothing finished
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", stop_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_llama_dir, PAIRS, opts, work)
    assert (work / "checkpoints" / "checkpoint-2").is_dir() and not (work / "adapter").exists()

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", counted)
    result = train_adapter(tiny_llama_dir, PAIRS, opts, work)
    assert result.resumed_from.endswith("checkpoint-2")
    assert calls == [2]  # only step 3 ran again
    assert [e["step"] for e in result.metrics["log"]] == [1, 2, 3]  # steps 1-2 logged before the interruption
    # finished: not trained again
    again = train_adapter(tiny_llama_dir, PAIRS, opts, work)
    assert calls == [2] and again.metrics == result.metrics


# ---------------------------------------------------------------------------- the commands end to end
def dpo_argv(model_dir, prompts_file, out, *extra) -> list:
    return [
        "train",
        "dpo",
        "--model",
        model_dir,
        "--prompts",
        prompts_file,
        "--reward",
        "chars",
        "--out",
        out,
        *FAST,
        *extra,
    ]


def test_dpo_end_to_end_and_resumed_after_an_interruption(
    tiny_llama_dir, prompts_file, tmp_path, train_env, monkeypatch, capsys
):
    import alignd.train.dpo as dpo
    from alignd.models.hf_engine import HFEngine

    out = tmp_path / "adapter"
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, out)) == 0
    assert f"adapter written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "alignd_adapter.json",
    ]
    assert not out.with_name("adapter.partial").exists()
    manifest = json.loads((out / "alignd_adapter.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["kind"] == "dpo" and manifest["reward"] == "chars" and manifest["beta"] == 0.1
    assert manifest["base_model"]["weights_digest"] == weights_digest(tiny_llama_dir)
    assert manifest["base_model"]["path"] == str(tiny_llama_dir.resolve())
    data = manifest["data"]
    assert data["file"] == str(prompts_file) and len(data["sha256"]) == 64
    assert (data["prompts"], data["samples"]) == (6, 12)
    assert data["pairs"] + data["ties_skipped"] == 6 and data["pairs"] > 0
    metrics = manifest["metrics"]
    for key in (
        "final_loss",
        "reward_margin",
        "reward_accuracy",
        "train_wall_s",
        "train_examples_per_s",
        "peak_rss_mib",
    ):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 2 and metrics["peak_rss_mib"]["self"] > 0
    assert metrics["target_reward"]["chosen_mean"] > metrics["target_reward"]["rejected_mean"]
    assert manifest["command"][:3] == ["alignd", "train", "dpo"] and "--out" in manifest["command"]
    assert manifest["versions"]["trl"] == "1.16.0" and manifest["versions"]["peft"] == "0.21.2"
    assert manifest["dpo_config"]["beta"] == 0.1 and manifest["dpo_config"]["max_steps"] == 2
    assert manifest["lora_config"]["r"] == 8 and sorted(manifest["lora_config"]["target_modules"]) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"

    # The same run, interrupted after its first sampling batch (and a torn line left behind), then resumed.
    resumed_out = tmp_path / "resumed"
    sampled: list[int] = []
    real_rollouts = HFEngine.rollouts
    real_append = dpo.append_work_records

    async def counting_rollouts(self, prefixes, *args, **kwargs):
        sampled.append(len(prefixes))
        return await real_rollouts(self, prefixes, *args, **kwargs)

    def append_then_stop(path, records):
        real_append(path, records)
        with open(path, "a") as handle:
            handle.write('{"id": "p2", "prompt": "a ha')  # killed in the middle of the next write
        raise KeyboardInterrupt

    monkeypatch.setattr(HFEngine, "rollouts", counting_rollouts)
    monkeypatch.setattr(dpo, "append_work_records", append_then_stop)
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, resumed_out)) == 130
    assert "resume" in capsys.readouterr().err
    partial = resumed_out.with_name("resumed.partial")
    assert not resumed_out.exists() and (partial / "samples.jsonl").is_file()
    assert sampled == [2]

    monkeypatch.setattr(dpo, "append_work_records", real_append)
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, resumed_out)) == 0
    assert sampled == [2, 2, 2]  # the first batch was not sampled again
    again = json.loads((resumed_out / "alignd_adapter.json").read_text())
    # the same samples (each batch has its own seed), so the same data and pairs as the uninterrupted run
    assert again["data"] == manifest["data"]
    assert again["metrics"]["target_reward"] == manifest["metrics"]["target_reward"]
    assert again["metrics"]["final_loss"] == pytest.approx(manifest["metrics"]["final_loss"], abs=1e-5)
    assert not partial.exists()

    # an existing result is replaced only with --overwrite, and only once the new one is complete
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, resumed_out, "--overwrite", "--beta", "0.2")) == 0
    assert json.loads((resumed_out / "alignd_adapter.json").read_text())["beta"] == 0.2


def test_dpo_with_changed_inputs_refuses_the_old_work_unless_restarted(
    tiny_llama_dir, prompts_file, tmp_path, train_env, capsys, monkeypatch
):
    out = tmp_path / "adapter"
    partial = out.with_name("adapter.partial")
    # the rewards as a JSON flag this time (flags are parsed like environment variables)
    monkeypatch.delenv("ALIGND_REWARDS")
    rewards = ["--rewards", json.dumps(CALLABLE_REWARDS)]
    # every prompt ties under a constant reward: the run stops after sampling, its samples kept
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, out, "--reward", "flat", *rewards)) == 1
    assert "no preference pairs" in capsys.readouterr().err
    assert (partial / "samples.jsonl").is_file()
    # another reward would mix its scores with these samples: refused, one line, exit 2
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, out, *rewards)) == 2
    err = capsys.readouterr().err
    assert "other inputs" in err and "--restart" in err and len(err.strip().splitlines()) == 1
    assert run_cli(dpo_argv(tiny_llama_dir, prompts_file, out, "--restart", *rewards)) == 0
    assert json.loads((out / "alignd_adapter.json").read_text())["reward"] == "chars"


def test_irft_end_to_end_with_two_rounds(tiny_llama_dir, demos_file, tmp_path, train_env, capsys):
    out = tmp_path / "irft"
    argv = [
        "train",
        "irft",
        "--model",
        tiny_llama_dir,
        "--demonstrations",
        demos_file,
        "--rounds",
        "2",
        "--max-new-tokens",
        "8",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--out",
        out,
    ]
    assert run_cli(argv) == 0
    assert f"adapter written to {out}" in capsys.readouterr().out
    manifest = json.loads((out / "alignd_adapter.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["kind"] == "irft" and manifest["rounds"] == 2 and manifest["beta"] == 0.1
    assert manifest["base_model"]["weights_digest"] == weights_digest(tiny_llama_dir)
    assert manifest["learned_reward"]["kind"] == "implicit" and "LEARNED" in manifest["notes"][0]
    data = manifest["data"]
    assert data["demonstrations"] == 4 and len(data["pairs_per_round"]) == 2 and data["sha256"]
    rounds = manifest["metrics"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["final_loss"] is not None and r["steps"] == 2 for r in rounds)
    # round 1 starts at the SFT model (margin 0 at its first step); round 2 continues round 1's adapter
    # against the same SFT reference, so its first step already has a margin
    assert rounds[0]["log"][0]["rewards/margins"] == 0.0
    assert rounds[1]["log"][0]["rewards/margins"] != 0.0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "alignd_adapter.json",
    ]


def test_irft_keeps_finished_rounds(tiny_llama_dir, demos_file, tmp_path, train_env, monkeypatch):
    import alignd.train.irft as irft

    out = tmp_path / "irft"
    argv = [
        "train",
        "irft",
        "--model",
        tiny_llama_dir,
        "--demonstrations",
        demos_file,
        "--rounds",
        "2",
        "--max-new-tokens",
        "6",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        out,
    ]
    real = irft.generate_negatives
    rounds_generated = []

    def generate(*args, desc, **kwargs):
        rounds_generated.append(desc.split(":")[0])
        if desc.startswith("round 2") and len(rounds_generated) == 2:
            raise KeyboardInterrupt
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(irft, "generate_negatives", generate)
    assert run_cli(argv) == 130
    assert (out.with_name("irft.partial") / "round-1" / "round.json").is_file()
    assert run_cli(argv) == 0
    assert rounds_generated == ["round 1/2", "round 2/2", "round 2/2"]  # round 1 was not redone
    assert json.loads((out / "alignd_adapter.json").read_text())["data"]["pairs_per_round"] == [4, 4]


# ---------------------------------------------------------------------------- bad input: one line, exit 2
BAD_PROMPTS = {
    "not JSON": ([{"id": "a", "prompt": "hi"}, '{"id": "b", "prompt": '], "prompts.jsonl:2: not valid JSON"),
    "a field missing": ([{"id": "a", "prompt": "hi"}, {"id": "b"}], "prompts.jsonl:2: missing field 'prompt'"),
    "duplicate ids": (
        [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "yo"}, {"id": "a", "prompt": "hey"}],
        "prompts.jsonl:3: duplicate id 'a' (first on line 1)",
    ),
}


def assert_one_line_error(capsys, code: int, *expected: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("alignd train ") and all(e in lines[0] for e in expected), lines[0]


@pytest.mark.parametrize("case", list(BAD_PROMPTS), ids=list(BAD_PROMPTS))
def test_a_bad_prompts_file_names_file_and_line(case, tiny_llama_dir, tmp_path, train_env, capsys):
    rows, expected = BAD_PROMPTS[case]
    bad = write_jsonl(tmp_path / "prompts.jsonl", rows)
    code = run_cli(dpo_argv(tiny_llama_dir, bad, tmp_path / "out"))
    assert_one_line_error(capsys, code, str(tmp_path / expected))
    assert not (tmp_path / "out.partial").exists()


def test_a_bad_demonstrations_file_names_file_and_line(tiny_llama_dir, tmp_path, train_env, capsys):
    bad = write_jsonl(
        tmp_path / "demos.jsonl", [{"id": "a", "prompt": "hi", "response": "hello"}, {"id": "b", "prompt": "yo"}]
    )
    code = run_cli(["train", "irft", "--model", tiny_llama_dir, "--demonstrations", bad, "--out", tmp_path / "out"])
    assert_one_line_error(capsys, code, f"{bad}:2: missing field 'response'")


BAD_OPTIONS = {
    "unknown reward": (["--reward", "nope"], ["unknown reward 'nope'; known rewards: ", "chars", "flat", "positivity"]),
    "LoRA rank above the limit": (["--lora-rank", "1000"], ["--lora-rank 1000 is out of range"]),
    "unknown target module": (["--target-modules", "q_proj,nope_proj"], ["--target-modules nope_proj: no such layer"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_a_bad_option_is_a_one_line_error(case, tiny_llama_dir, prompts_file, tmp_path, train_env, capsys):
    extra, expected = BAD_OPTIONS[case]
    code = run_cli(dpo_argv(tiny_llama_dir, prompts_file, tmp_path / "out", *extra))
    assert_one_line_error(capsys, code, *expected)


def test_an_existing_output_folder_is_refused_without_overwrite(
    tiny_llama_dir, prompts_file, tmp_path, train_env, capsys
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = run_cli(dpo_argv(tiny_llama_dir, prompts_file, tmp_path / "out"))
    assert_one_line_error(capsys, code, "already exists (pass --overwrite to replace it)")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_model_folder_that_does_not_exist(prompts_file, tmp_path, train_env, capsys):
    code = run_cli(dpo_argv(tmp_path / "no-such-model", prompts_file, tmp_path / "out"))
    assert_one_line_error(capsys, code, f"model folder {tmp_path / 'no-such-model'} does not exist")


def test_a_missing_data_file(tiny_llama_dir, tmp_path, train_env, capsys):
    code = run_cli(dpo_argv(tiny_llama_dir, tmp_path / "absent.jsonl", tmp_path / "out"))
    assert_one_line_error(capsys, code, "does not exist")


# ---------------------------------------------------------------------------- the layering contracts
@pytest.mark.parametrize(
    ("module", "wrong", "contract"),
    [
        (
            "alignd.train.dpo",
            "import alignd.decoding.rule",
            "alignd.train builds on models, rewards, settings, errors and protocol only",
        ),
        ("alignd.models.weights", "import alignd.train.data", "only alignd.cli imports alignd.train"),
    ],
    ids=["train imports decoding", "models import train"],
)
def test_the_train_contracts_break_when_they_should(module, wrong, contract, tmp_path):
    import lint_imports

    tree = lint_imports.build_tree(tmp_path)
    source = tree.joinpath(*module.split(".")).with_suffix(".py").resolve().read_text()
    lint_imports.override(tree, module, source + f"\n{wrong}  # deliberately wrong\n")
    result = lint_imports.run_in_tree(tree, capture=True)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout


def test_invalid_settings_are_a_one_line_error(tiny_llama_dir, prompts_file, tmp_path, train_env, capsys):
    code = run_cli(dpo_argv(tiny_llama_dir, prompts_file, tmp_path / "out", "--max-model-len", "3"))
    assert_one_line_error(capsys, code, "invalid settings", "--max-model-len")
