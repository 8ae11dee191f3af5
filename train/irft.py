"""``alignd train irft``: a reward learned from demonstrations alone (the IRL seed, ALGORITHMS.md 3).

Maximum-likelihood inverse RL with an implicit reward ``r(x, y) = beta * log(pi(y|x) / pi_sft(y|x))``,
trained with the IRFT (SPIN-style) loss

    -log sigmoid(beta * [(log pi(y_demo) - log pi(y')) - (log pi_sft(y_demo) - log pi_sft(y'))])

which is DPO's loss with chosen = the demonstration and rejected = y', the current policy's own
generation. The negatives y' are regenerated from the current policy (SFT + the adapter trained so far)
at the start of every round, ``--rounds`` T times over the run (T = 1 is one SPIN round); the reference
stays the SFT model throughout (each round hands TRL a fresh adapter initialised from the previous
round's weights, see alignd.train.tuning), so the learned reward is measured against the SFT model.

Work kept in ``<out>.partial/round-<t>/``: ``negatives.jsonl`` (appended per generation batch),
TRL's checkpoints and the round's adapter under ``training/``, and ``round.json`` written last when the
round is done; a resumed run skips finished rounds and batches.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignd.settings import Settings
from alignd.train.data import (
    Demonstration,
    TrainingError,
    TrainingInputError,
    append_work_records,
    file_sha256,
    read_demonstrations,
    read_work_file,
    require,
    write_json_atomic,
)
from alignd.train.manifest import manifest_header, peak_rss_mib
from alignd.train.tuning import (
    ADAPTER_FILES,
    BaseModel,
    PreferencePair,
    TrainingOptions,
    max_lora_rank,
    prepare_base_model,
    train_adapter,
)
from alignd.train.workspace import Workspace

logger = logging.getLogger(__name__)
_ROUND_SEED_STRIDE = 1_000_003  # round t samples with seed + t * stride + batch start: no two batches share one


@dataclass(frozen=True)
class GenerationOptions:
    # Above the demonstrations' length: a cut-off generation is still rendered with the chat template's
    # end-of-turn in training, and if most negatives were cut and no demonstration was, "ends early"
    # would be the easiest thing for the learned reward to pick up.
    max_new_tokens: int = 96
    temperature: float = 1.0
    batch_size: int = 16  # prompts per model.generate call, and per batch appended to negatives.jsonl

    def check(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--sample-temperature must be > 0, got {self.temperature}"),
            (self.batch_size >= 1, f"--generation-batch-size must be >= 1, got {self.batch_size}"),
        ]
        require(checks)


@dataclass
class IRFTRun:
    settings: Settings
    demonstrations_file: Path
    out: Path
    rounds: int = 2
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    overwrite: bool = False
    restart: bool = False
    command: list[str] = field(default_factory=list)
    progress: bool = True
    select: tuple | None = None  # ("s2l" | "random", Budget) of --select: train on that subset


def generate_negatives(
    model_dir: Path,
    adapter_dir: Path | None,
    demos: list[Demonstration],
    out_file: Path,
    opts: GenerationOptions,
    seed: int,
    *,
    desc: str = "negatives",
    progress: bool = True,
    demonstrations_file: Path | None = None,
) -> list[dict]:
    """One generation y' per demonstration prompt from the policy SFT + ``adapter_dir`` (the SFT model
    alone when None), sampled at ``opts.temperature``, appended to ``out_file`` per batch (batches
    already there are kept). Returns the records ``{"id", "text", "tokens", "finish_reason"}``.

    Generated with the PEFT model in transformers (``model.generate``, batched, left-padded) rather than
    through an engine: the policy changes every round and lives in this process; generating with it
    directly samples exactly the policy being trained, unmerged, with no adapter to save and merge and
    no engine to (re)start each round. A vLLM engine would start in about a minute on the CPU per round,
    hold a second copy of the weights beside the trainer, and run LoRA requests at about 0.4x there
    (docs: PLATFORM.md). Demonstration sets are hundreds of prompts, where generate's speed is enough.
    """
    records = read_work_file(out_file)
    done = {r["id"] for r in records}
    if all(d.id in done for d in demos):
        return records
    policy = _load_policy(model_dir, adapter_dir)
    with tqdm(
        total=len(demos), initial=sum(d.id in done for d in demos), desc=desc, unit="prompt", disable=not progress
    ) as bar:
        for start in range(0, len(demos), opts.batch_size):
            batch = [d for d in demos[start : start + opts.batch_size] if d.id not in done]
            if not batch:
                continue
            new = _sample_negatives(policy, batch, opts, seed + start, demonstrations_file)
            append_work_records(out_file, new)
            records.extend(new)
            done.update(d.id for d in batch)
            bar.update(len(batch))
    del policy
    return records


@dataclass
class _Policy:
    """The policy (the SFT model, with the adapter trained so far when there is one) loaded for sampling,
    with the token ids that end or pad its generations."""

    tokenizer: Any
    model: Any
    device: Any
    eos_ids: set[int]
    pad_id: int
    context: int | None  # the model's context length, when its config gives one


def _load_policy(model_dir: Path, adapter_dir: Path | None) -> _Policy:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    context = getattr(model.config, "max_position_embeddings", None)
    return _Policy(tokenizer, model, device, eos_ids, pad_id, context)


def _sample_negatives(
    policy: _Policy, batch: list[Demonstration], opts: GenerationOptions, seed: int, demonstrations_file: Path | None
) -> list[dict]:
    """One sampled generation per prompt of ``batch``, in one ``model.generate`` call seeded with ``seed``."""
    import torch

    tokenizer = policy.tokenizer
    # The chat rendered as the engines render it (Engine.render_chat): template text, then tokens.
    texts = [tokenizer.apply_chat_template(d.chat(), add_generation_prompt=True, tokenize=False) for d in batch]
    encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(policy.device)
    width = encoded["input_ids"].shape[1]
    if policy.context is not None:
        _check_context(policy.context, batch, encoded["attention_mask"], opts.max_new_tokens, demonstrations_file)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = policy.model.generate(
            **encoded,
            do_sample=True,
            temperature=opts.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=opts.max_new_tokens,
            pad_token_id=policy.pad_id,
        )
    new = []
    for d, row in zip(batch, output[:, width:].tolist(), strict=False):
        stop = next((i for i, t in enumerate(row) if t in policy.eos_ids), None)
        tokens = row if stop is None else row[: stop + 1]
        new.append(
            {
                "id": d.id,
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "tokens": len(tokens),
                "finish_reason": "length" if stop is None else "stop",
            }
        )
    return new


def _check_context(
    context: int, batch: list[Demonstration], attention_mask, max_new_tokens: int, demonstrations_file: Path | None
) -> None:
    """A prompt whose tokens and the --max-new-tokens to generate after them exceed the model's context is bad
    input, named by its line of the demonstrations file."""
    for d, mask in zip(batch, attention_mask, strict=False):
        if int(mask.sum()) + max_new_tokens > context:
            where = f"{demonstrations_file}:{d.line}" if demonstrations_file else f"demonstration '{d.id}'"
            raise TrainingInputError(
                f"{where}: prompt '{d.id}' is {int(mask.sum())} tokens; with --max-new-tokens "
                f"{max_new_tokens} it exceeds the model's context of {context}"
            )


def irft_pairs(demos: list[Demonstration], negatives: list[dict]) -> tuple[list[PreferencePair], int]:
    """(demonstration, generation) pairs, chosen = the demonstration; a generation that equals its
    demonstration carries no signal and is skipped (counted)."""
    by_id = {r["id"]: r for r in negatives}
    pairs, identical = [], 0
    for d in demos:
        text = by_id[d.id]["text"]
        if text.strip() == d.response.strip():
            identical += 1
            continue
        pairs.append(PreferencePair(d.id, d.prompt, d.response, text))
    return pairs, identical


def run_irft(run: IRFTRun) -> Path:
    """T rounds of (regenerate negatives from the current policy, train); return the adapter folder."""
    started = time.perf_counter()
    settings = run.settings
    workspace = Workspace(run.out, overwrite=run.overwrite, restart=run.restart)
    workspace.check_output()
    if run.rounds < 1:
        raise TrainingInputError(f"--rounds must be >= 1, got {run.rounds}")
    run.generation.check()
    run.training.check(max_rank=max_lora_rank(settings))
    demos_file = Path(run.demonstrations_file).expanduser().absolute()
    demos = read_demonstrations(demos_file)
    base = prepare_base_model(settings, run.training, progress=run.progress)
    data_sha = file_sha256(demos_file)
    workspace.open(_run_inputs(run, base.digest, data_sha), {})
    for note in workspace.notes:
        logger.warning("%s", note)
    in_file = len(demos)
    selection = None
    if run.select is not None:
        from alignd.train.select import select_for_training

        ids, selection = select_for_training(
            settings, demos_file, run.select, workspace.partial, seed=run.training.seed, progress=run.progress
        )
        keep = set(ids)
        demos = [d for d in demos if d.id in keep]
        logger.info("training on %d of %d demonstrations (--select %s:%s)", len(demos), in_file, *run.select)

    rounds, adapter = _train_rounds(run, base.folder, demos, demos_file, workspace.partial)
    data = {
        "file": str(demos_file),
        "sha256": data_sha,
        "demonstrations": len(demos),
        "demonstrations_in_file": in_file,
        "pairs_per_round": [r["pairs"] for r in rounds],
        "identical_skipped_per_round": [r["identical_skipped"] for r in rounds],
        "generation": {
            "backend": "transformers generate (PEFT model)",
            **asdict(run.generation),
            "seed": run.training.seed,
        },
    }
    manifest = _irft_manifest(run, base, workspace, rounds, selection, data, started)
    return workspace.publish_adapter(adapter, manifest, ADAPTER_FILES)


def _run_inputs(run: IRFTRun, base_digest: str, data_sha: str) -> dict:
    """What the work kept in the partial folder depends on: a resumed run with other inputs starts over."""
    # Every round depends on the rounds before it (its negatives come from their adapter), so the
    # training options are inputs here too; the number of rounds is not: finished rounds stay valid
    # when a later run asks for more.
    return {
        "kind": "irft",
        "base_weights": base_digest,
        "demonstrations_sha256": data_sha,
        "generation": asdict(run.generation),
        "training": run.training.identity(),
        "select": None if run.select is None else f"{run.select[0]}:{run.select[1]}",
    }


def _train_rounds(
    run: IRFTRun, model_dir: Path, demos: list[Demonstration], demos_file: Path, partial: Path
) -> tuple[list[dict], Path | None]:
    """Every round's record (those finished by an earlier run read back, not redone) and the last adapter."""
    prev_adapter: Path | None = None
    rounds: list[dict] = []
    for t in range(1, run.rounds + 1):
        round_dir = partial / f"round-{t}"
        round_file = round_dir / "round.json"
        if round_file.is_file():
            rounds.append(json.loads(round_file.read_text()))
            prev_adapter = round_dir / "training" / "adapter"
            logger.info("round %d already finished", t)
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        record, adapter = _train_round(run, t, model_dir, demos, demos_file, round_dir, prev_adapter)
        write_json_atomic(round_file, record)
        rounds.append(record)
        prev_adapter = adapter
    return rounds, prev_adapter


def _train_round(
    run: IRFTRun,
    t: int,
    model_dir: Path,
    demos: list[Demonstration],
    demos_file: Path,
    round_dir: Path,
    prev_adapter: Path | None,
) -> tuple[dict, Path]:
    """Round ``t``: negatives from the policy of ``prev_adapter``, then an adapter initialised from it and
    trained on the (demonstration, negative) pairs. Returns the round's record and its adapter."""
    negatives = generate_negatives(
        model_dir,
        prev_adapter,
        demos,
        round_dir / "negatives.jsonl",
        run.generation,
        run.training.seed + t * _ROUND_SEED_STRIDE,
        desc=f"round {t}/{run.rounds}: generating negatives",
        progress=run.progress,
        demonstrations_file=demos_file,
    )
    pairs, identical = irft_pairs(demos, negatives)
    if not pairs:
        raise TrainingError(f"round {t}: every generation equals its demonstration; nothing to contrast")
    logger.info("round %d/%d: %d pairs (demonstration vs own generation); training", t, run.rounds, len(pairs))
    result = train_adapter(model_dir, pairs, run.training, round_dir / "training", init_adapter=prev_adapter)
    record = {
        "round": t,
        "pairs": len(pairs),
        "identical_skipped": identical,
        "negatives": {
            "mean_tokens": round(statistics.fmean(r["tokens"] for r in negatives), 2),
            "stopped": sum(r["finish_reason"] == "stop" for r in negatives),
        },
        "metrics": result.metrics,
        "dpo_config": result.dpo_config,
        "lora_config": result.lora_config,
        "resumed_from_checkpoint": result.resumed_from,
    }
    return record, result.adapter_dir


def _irft_manifest(
    run: IRFTRun,
    base: BaseModel,
    workspace: Workspace,
    rounds: list[dict],
    selection: dict | None,
    data: dict,
    started: float,
) -> dict:
    """alignd_adapter.json of the finished adapter: the learned reward, the data, every round's metrics."""
    beta = run.training.beta
    last = rounds[-1]
    return {
        **manifest_header("irft", base.manifest_entry(), run.training, run.command),
        "reward": None,
        "learned_reward": {
            "kind": "implicit",
            "formula": f"{beta} * log(pi_adapter(y|x) / pi_base(y|x))",
            "beta": beta,
            "reference": "the base (SFT) model",
        },
        "rounds": run.rounds,
        "selection": selection,
        "data": data,
        "metrics": {
            "rounds": [
                {
                    "round": r["round"],
                    "pairs": r["pairs"],
                    **r["negatives"],
                    **{k: v for k, v in r["metrics"].items() if k != "log"},
                    "log": r["metrics"].get("log"),
                }
                for r in rounds
            ],
            "final_loss": last["metrics"].get("final_loss"),
            "reward_margin": last["metrics"].get("reward_margin"),
            "reward_accuracy": last["metrics"].get("reward_accuracy"),
            "train_wall_s": round(sum(r["metrics"].get("train_wall_s") or 0 for r in rounds), 3),
            "peak_rss_mib": peak_rss_mib(),
            "total_wall_s_this_process": round(time.perf_counter() - started, 3),
        },
        "dpo_config": last["dpo_config"],
        "lora_config": last["lora_config"],
        "resumed": {"notes": workspace.notes},
        "notes": [
            "The implicit reward beta*log(pi_adapter/pi_base) of this adapter is a LEARNED reward (maximum-"
            "likelihood inverse RL from demonstrations, IRFT): it is not a target reward given in advance.",
            f"IRFT loss = DPO's sigmoid loss with chosen = demonstration, rejected = the policy's own "
            f"generation, regenerated at the start of each of the {run.rounds} rounds; the reference is the "
            "base (SFT) model in every round.",
        ],
    }
