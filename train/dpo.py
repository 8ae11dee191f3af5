"""``alignd train dpo``: a baseline aligned to a target reward, from the SFT model's own samples.

    prompts --(engine.rollouts, chat template)--> k samples per prompt --(reward.score)--> rewards
            --> one pair per prompt: best vs worst sample (ties within --tie-margin skipped)
            --> TRL DPOTrainer + PEFT LoRA, reference = the SFT model --> adapter + alignd_adapter.json

Sampling goes through the engine contract (``alignd.models.engine.Engine.rollouts`` over a batch of
prompts at once), on the engine ``open_engine(settings)`` builds: vLLM on the real model,
the transformers engine under ``--engine hf``. Rewards are the registry's, built as the server builds
them (``build_rewards(settings, engine)``), so any configured reward can be the target.

Samples are appended to ``<out>.partial/samples.jsonl`` one prompt batch at a time, already scored:
an interrupted run resumes with the first batch not in the file. Each batch has its own seed (the run's
seed offset by the batch's first prompt), so a resumed run draws the same samples an uninterrupted one
would.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from alignd.settings import Settings
from alignd.train.data import (
    PromptRecord,
    TrainingError,
    TrainingInputError,
    append_work_records,
    file_sha256,
    read_prompts,
    read_work_file,
    require,
)
from alignd.train.manifest import manifest_header
from alignd.train.tuning import (
    ADAPTER_FILES,
    BaseModel,
    PreferencePair,
    TrainingOptions,
    TrainResult,
    max_lora_rank,
    prepare_base_model,
    train_adapter,
)
from alignd.train.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingOptions:
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 32  # prompts per engine call, and per batch appended to samples.jsonl
    tie_margin: float = 1e-6  # best - worst reward at most this: the prompt gives no pair

    def check(self) -> None:
        checks = [
            (
                self.samples_per_prompt >= 2,
                f"--samples-per-prompt must be >= 2 (a pair), got {self.samples_per_prompt}",
            ),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (
                self.temperature > 0,
                f"--sample-temperature must be > 0 (the samples must differ), got {self.temperature}",
            ),
            (self.batch_size >= 1, f"--sample-batch-size must be >= 1, got {self.batch_size}"),
            (self.tie_margin >= 0, f"--tie-margin must be >= 0, got {self.tie_margin}"),
        ]
        require(checks)


@dataclass
class DPORun:
    settings: Settings
    prompts_file: Path
    reward: str
    out: Path
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    overwrite: bool = False
    restart: bool = False
    command: list[str] = field(default_factory=list)
    progress: bool = True
    select: tuple | None = None  # ("s2l" | "random", Budget) of --select: train on that subset of the pairs


# ---------------------------------------------------------------------------- rewards
def _unknown_reward(name: str, known: list[str]) -> TrainingInputError:
    return TrainingInputError(
        f"unknown reward '{name}'; known rewards: {', '.join(sorted(known))} (more through ALIGND_REWARDS)"
    )


def precheck_reward(settings: Settings, name: str) -> None:
    """Fail fast on a reward name the registry will not know, before an engine starts (a vLLM start
    takes a minute on the CPU). The built-in rewards are listed by building the registry without an
    engine and without the configured extra rewards (the built-ins only keep the engine until they
    score); if that is not possible the registry's own check, once built, is the only one."""
    if name in settings.rewards:
        return
    from alignd.rewards.registry import build_rewards

    try:
        builtin = asyncio.run(build_rewards(settings.model_copy(update={"rewards": {}}), None)).names()
    except Exception:  # noqa: BLE001 - best effort; the definitive check follows
        return
    if name not in builtin:
        raise _unknown_reward(name, [*builtin, *settings.rewards])


# ---------------------------------------------------------------------------- sampling
async def _sample_and_score(
    run: DPORun, engine_settings: Settings, prompts: list[PromptRecord], samples_file: Path, done: set[str]
) -> None:
    from alignd.errors import RewardNotFoundError
    from alignd.models.factory import open_engine
    from alignd.rewards.base import RewardItem
    from alignd.rewards.registry import build_rewards

    opts = run.sampling
    n = opts.samples_per_prompt
    async with open_engine(engine_settings, progress=run.progress) as engine:
        registry = await build_rewards(engine_settings, engine)
        try:
            try:
                reward = registry.get(run.reward)
            except RewardNotFoundError:
                raise _unknown_reward(run.reward, registry.names()) from None
            context = engine.info.max_model_len
            finished = sum(p.id in done for p in prompts)
            sampling_bar = tqdm(
                total=len(prompts), initial=finished, desc="sampling", unit="prompt", disable=not run.progress
            )
            scoring_bar = tqdm(
                total=len(prompts) * n,
                initial=finished * n,
                desc=f"scoring ({run.reward})",
                unit="sample",
                disable=not run.progress,
            )
            with sampling_bar, scoring_bar:
                for start in range(0, len(prompts), opts.batch_size):
                    batch = [p for p in prompts[start : start + opts.batch_size] if p.id not in done]
                    if not batch:
                        continue
                    began = time.perf_counter()
                    prefixes = [engine.render_chat(p.chat()) for p in batch]
                    for p, prefix in zip(batch, prefixes, strict=False):
                        if len(prefix) + opts.max_new_tokens > context:
                            raise TrainingInputError(
                                f"{run.prompts_file}:{p.line}: prompt '{p.id}' is {len(prefix)} tokens; with "
                                f"--max-new-tokens {opts.max_new_tokens} it exceeds the model's context of {context}"
                            )
                    # One engine call for the whole batch: every prompt's n samples at once.
                    rollouts = await engine.rollouts(
                        prefixes, n, opts.max_new_tokens, opts.temperature, seed=run.training.seed + start * n
                    )
                    sampling_bar.update(len(batch))
                    items = [
                        RewardItem(response=r.text, prompt=p.prompt)
                        for p, rs in zip(batch, rollouts, strict=False)
                        for r in rs
                    ]
                    scores = await reward.score(items, truncate=True)
                    scoring_bar.update(len(items))
                    seconds = (time.perf_counter() - began) / len(batch)
                    records = []
                    for i, (p, rs) in enumerate(zip(batch, rollouts, strict=False)):
                        records.append(
                            {
                                "id": p.id,
                                "prompt": p.prompt,
                                "seconds": round(seconds, 4),
                                "samples": [
                                    {
                                        "text": r.text,
                                        "tokens": len(r.token_ids),
                                        "finish_reason": r.finish_reason,
                                        "reward": scores[i * n + j].value,
                                    }
                                    for j, r in enumerate(rs)
                                ],
                            }
                        )
                    append_work_records(samples_file, records)
                    done.update(p.id for p in batch)
        finally:
            await registry.close()


def make_pairs(records: list[dict], tie_margin: float) -> tuple[list[PreferencePair], int, dict]:
    """One pair per prompt, its best-rewarded sample over its worst; a prompt whose best and worst differ
    by at most ``tie_margin`` (or are the same text) gives none. Returns the pairs, the number of
    prompts skipped as ties, and the target reward of the chosen, rejected and all samples."""
    pairs: list[PreferencePair] = []
    ties = 0
    chosen_rewards, rejected_rewards, all_rewards = [], [], []
    for record in records:
        samples = record["samples"]
        rewards = [s["reward"] for s in samples]
        all_rewards.extend(rewards)
        best = max(range(len(samples)), key=rewards.__getitem__)
        worst = min(range(len(samples)), key=rewards.__getitem__)
        if rewards[best] - rewards[worst] <= tie_margin or samples[best]["text"] == samples[worst]["text"]:
            ties += 1
            continue
        pairs.append(PreferencePair(record["id"], record["prompt"], samples[best]["text"], samples[worst]["text"]))
        chosen_rewards.append(rewards[best])
        rejected_rewards.append(rewards[worst])

    def mean(values):
        return round(statistics.fmean(values), 6) if values else None

    stats = {
        "chosen_mean": mean(chosen_rewards),
        "rejected_mean": mean(rejected_rewards),
        "samples_mean": mean(all_rewards),
        "pair_gap_mean": mean([c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=False)]),
    }
    return pairs, ties, stats


# ---------------------------------------------------------------------------- the command
def run_dpo(run: DPORun) -> Path:
    """Sample, score, pair, train; return the finished adapter folder (``run.out``)."""
    started = time.perf_counter()
    settings = run.settings
    workspace = Workspace(run.out, overwrite=run.overwrite, restart=run.restart)
    workspace.check_output()
    run.sampling.check()
    run.training.check(max_rank=max_lora_rank(settings))
    prompts_file = Path(run.prompts_file).expanduser().absolute()
    prompts = read_prompts(prompts_file)
    precheck_reward(settings, run.reward)
    base = prepare_base_model(settings, run.training, progress=run.progress)
    data_sha = file_sha256(prompts_file)
    select = None if run.select is None else f"{run.select[0]}:{run.select[1]}"
    training_identity = {**run.training.identity(), "tie_margin": run.sampling.tie_margin, "select": select}
    workspace.open(
        _run_inputs(run, base.digest, data_sha), training_identity, training_artefacts=("training", "selection")
    )
    for note in workspace.notes:
        logger.warning("%s", note)

    ordered = _scored_samples(run, base.folder, prompts, workspace.partial / "samples.jsonl")
    pairs, ties, reward_stats = make_pairs(ordered, run.sampling.tie_margin)
    if not pairs:
        raise TrainingError(
            f"no preference pairs: the samples of all {len(prompts)} prompts tie under reward '{run.reward}' "
            f"(within --tie-margin {run.sampling.tie_margin}); use a reward that tells the samples apart, or more "
            "--samples-per-prompt"
        )
    logger.info("%d pairs from %d prompts (%d ties skipped)", len(pairs), len(prompts), ties)
    all_pairs = len(pairs)
    selection = None
    if run.select is not None:
        pairs, selection = _selected_pairs(run, pairs, workspace.partial)
        logger.info("training on %d of %d pairs (--select %s)", len(pairs), all_pairs, select)
    result = train_adapter(base.folder, pairs, run.training, workspace.partial / "training")

    data = {
        "file": str(prompts_file),
        "sha256": data_sha,
        "prompts": len(prompts),
        "samples": sum(len(r["samples"]) for r in ordered),
        "samples_per_prompt": run.sampling.samples_per_prompt,
        "pairs": len(pairs),
        "pairs_before_selection": all_pairs,
        "ties_skipped": ties,
        "tie_margin": run.sampling.tie_margin,
        "sampling": {
            "engine": settings.engine,
            "max_new_tokens": run.sampling.max_new_tokens,
            "temperature": run.sampling.temperature,
            "batch_size": run.sampling.batch_size,
            "seed": run.training.seed,
        },
    }
    sampling_s = round(sum(r.get("seconds", 0.0) for r in ordered), 3)
    manifest = _dpo_manifest(run, base, workspace, result, selection, data, reward_stats, sampling_s, started)
    return workspace.publish_adapter(result.adapter_dir, manifest, ADAPTER_FILES)


def _run_inputs(run: DPORun, base_digest: str, data_sha: str) -> dict:
    """What the samples kept in the partial folder depend on: a resumed run with other inputs starts over."""
    sampling_identity = {k: v for k, v in asdict(run.sampling).items() if k != "tie_margin"}
    return {
        "kind": "dpo",
        "base_weights": base_digest,
        "prompts_sha256": data_sha,
        "reward": run.reward,
        "reward_spec": run.settings.rewards.get(run.reward),
        "engine": run.settings.engine,
        "sampling": sampling_identity,
        "seed": run.training.seed,
    }


def _scored_samples(run: DPORun, model_dir: Path, prompts: list[PromptRecord], samples_file: Path) -> list[dict]:
    """Every prompt's scored samples, in the prompts' order: those of ``samples_file`` (an earlier run's), the
    rest sampled and scored now and appended to it."""
    records = read_work_file(samples_file)
    done = {r["id"] for r in records}
    if len(done) < len(prompts):
        settings = run.settings
        # The engine samples the SFT model itself: no baselines (and no LoRA they would switch on).
        updates = {"model": str(model_dir)}
        if "baselines" in type(settings).model_fields:
            updates["baselines"] = {}
        engine_settings = settings.model_copy(update=updates)
        asyncio.run(_sample_and_score(run, engine_settings, prompts, samples_file, done))
        # Free the engine now, while the modules its finalizers need are alive (and its memory, on a GPU,
        # before training): vLLM's AsyncLLM is otherwise collected at exit, where its __del__ fails noisily.
        gc.collect()
        records = read_work_file(samples_file)
    by_id = {r["id"]: r for r in records}
    return [by_id[p.id] for p in prompts]


def _selected_pairs(run: DPORun, pairs: list[PreferencePair], partial: Path) -> tuple[list[PreferencePair], dict]:
    """The pairs of the subset ``run.select`` picks, and the selection's record for the manifest."""
    # S2L needs a target text per example: a pair is selected by its chosen answer. The pairs are
    # written out as a preference-pair file, the input `alignd select` reads.
    from alignd.train.data import append_work_records
    from alignd.train.select import select_for_training

    pairs_file = partial / "pairs.jsonl"
    pairs_file.unlink(missing_ok=True)
    append_work_records(pairs_file, [asdict(p) for p in pairs])
    ids, selection = select_for_training(
        run.settings, pairs_file, run.select, partial, seed=run.training.seed, progress=run.progress
    )
    keep = set(ids)
    return [p for p in pairs if p.id in keep], selection


def _dpo_manifest(
    run: DPORun,
    base: BaseModel,
    workspace: Workspace,
    result: TrainResult,
    selection: dict | None,
    data: dict,
    reward_stats: dict,
    sampling_s: float,
    started: float,
) -> dict:
    """alignd_adapter.json of the finished adapter: the target reward, the data, the training's metrics."""
    return {
        **manifest_header("dpo", base.manifest_entry(), run.training, run.command),
        "reward": run.reward,
        "selection": selection,
        "data": data,
        "metrics": {
            **result.metrics,
            "target_reward": reward_stats,
            "sampling_s": sampling_s,
            "total_wall_s_this_process": round(time.perf_counter() - started, 3),
        },
        "dpo_config": result.dpo_config,
        "lora_config": result.lora_config,
        "resumed": {"notes": workspace.notes, "training_checkpoint": result.resumed_from},
        "notes": [
            "reference model: the base (SFT) model, i.e. the adapter disabled (TRL with a peft_config)",
            f"implicit reward of this adapter: {run.training.beta} * log(pi_adapter(y|x) / pi_base(y|x)), "
            f"aligned to '{run.reward}'",
        ],
    }
