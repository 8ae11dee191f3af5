"""Opening a run: its inputs checked (before any engine starts), its workspace opened, cached or sharded
states restored; :class:`_RunContext` is what every kind of target then shares, :class:`_MadeData` what
each kind hands to the training."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alignd.settings import Settings
from alignd.train.data import PromptRecord, TrainingInputError, file_sha256, read_prompts, require
from alignd.train.manifest import jsonable
from alignd.train.value_head.cache import data_cache, restore_data
from alignd.train.value_head.features import Features
from alignd.train.value_head.inputs import BaselineChoice, check_disjoint, resolve_baseline
from alignd.train.value_head.options import KIND, MAX_HEAD_BYTES, ValueHeadRun
from alignd.train.value_head.shards import locked, merge_shards
from alignd.train.workspace import Workspace

logger = logging.getLogger(__name__)


def _model_shape(model_dir: Path) -> tuple[int, int]:
    """(hidden size, vocabulary size) of the model's text part."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    return int(config.hidden_size), int(config.vocab_size)


def _check_head_size(hidden_size: int, rank: int) -> None:
    # ValueHead's tensors: state d x r + r, token d x r, out r + 1 (float32)
    size = 4 * (2 * hidden_size * rank + 2 * rank + 1)
    if size > MAX_HEAD_BYTES - 2**20:  # a mebibyte left for the manifest and the plot
        raise TrainingInputError(
            f"--rank {rank} makes a head of {size / 2**20:.1f} MiB on hidden size {hidden_size}, "
            "above the 10 MiB a head may have: lower --rank"
        )


def _engine_dtype(settings: Settings) -> str:
    if settings.engine != "vllm":
        return "float32"  # the transformers engine runs float32
    from alignd.models.platform import engine_dtype

    return engine_dtype(settings.dtype)


@dataclass
class _RunContext:
    """What every kind of target shares: the checked inputs, the open workspace and the data cache."""

    run: ValueHeadRun
    settings: Settings
    workspace: Workspace
    prompts_file: Path
    prompts: list[PromptRecord]
    eval_check: dict
    model_dir: Path
    model_name: str
    vocab_size: int
    baseline: BaselineChoice
    digest: str
    inputs: dict
    cache: Path
    started: float


@dataclass
class _MadeData:
    """The states, their features, and what the manifest says of how they were made."""

    records: list[dict]
    features: Features
    manifest: dict  # top-level entries of the targets' kind (top_k, rollout_len, ... or beta)
    features_check: dict
    data: dict  # entries of the manifest's "data"
    notes: list[str]
    wall_s: dict


def open_run(run: ValueHeadRun) -> _RunContext:
    """Check the inputs (before any engine starts), open the workspace, restore cached or sharded states."""
    from alignd.models.weights import weights_digest
    from alignd.train.dpo import precheck_reward
    from alignd.train.tuning import resolve_base_model

    started = time.perf_counter()
    settings = run.settings
    workspace = Workspace(run.out, overwrite=run.overwrite, restart=run.restart)
    workspace.check_output()
    run.targets.check(settings)
    run.training.check()
    require(
        [
            (
                run.shard is None or run.targets.kind == "rollouts",
                "--shard is for rollout targets: implicit targets cost one teacher-forced pass a sampled answer",
            )
        ]
    )
    prompts_file = Path(run.prompts_file).expanduser().absolute()
    prompts = read_prompts(prompts_file)
    eval_check = check_disjoint(prompts, prompts_file, run.eval_prompts_file)
    model_dir, model_name = resolve_base_model(settings, progress=run.progress)
    hidden_size, vocab_size = _model_shape(model_dir)
    _check_head_size(hidden_size, run.training.rank)
    baseline = resolve_baseline(settings, run.baseline, model_dir)
    reward = _target_reward(run, baseline)
    if run.targets.kind == "rollouts":  # (an implicit target's reward is the baseline's, not one to compute)
        precheck_reward(settings, reward)
    digest = weights_digest(model_dir)
    inputs = {
        "kind": KIND,
        "base_weights": digest,
        "prompts_sha256": file_sha256(prompts_file),
        "reward": reward,
        "reward_spec": settings.rewards.get(reward),
        "baseline": baseline.identity(),
        "engine": settings.engine,
        "dtype": _engine_dtype(settings),
        "targets": run.targets.identity(),
        "seed": run.training.seed,
    }
    cache = data_cache(settings, inputs)
    _open_workspace(run, workspace, inputs, cache)
    run = replace(run, reward=reward)
    return _RunContext(
        run,
        settings,
        workspace,
        prompts_file,
        prompts,
        eval_check,
        model_dir,
        model_name,
        vocab_size,
        baseline,
        digest,
        inputs,
        cache,
        started,
    )


def _target_reward(run: ValueHeadRun, baseline: BaselineChoice) -> str:
    """The reward the head's values are the Q of: ``--reward`` (default ALIGND_TARGET_REWARD) for rollout
    targets; for implicit targets the baseline's own, and another ``--reward`` is an error."""
    if run.targets.kind == "rollouts":
        return run.reward or run.settings.target_reward
    from alignd.train.implicit_targets import implicit_baseline

    form = implicit_baseline(baseline.name, baseline.kind, baseline.source, baseline.adapter_manifest)
    if run.reward is not None and run.reward != form.reward:
        raise TrainingInputError(
            f"--targets implicit gives the Q of the baseline's own reward, '{form.reward}', not of "
            f"'{run.reward}': leave --reward unset, or use --targets rollouts for another reward"
        )
    return form.reward


def _open_workspace(run: ValueHeadRun, workspace: Workspace, inputs: dict, cache: Path) -> None:
    training_identity = {**jsonable(asdict(run.training)), "states": run.targets.states}
    # Shards of one run open its partial folder at about the same time: one at a time.
    open_lock = workspace.partial.with_name(workspace.partial.name + ".lock")
    with locked(open_lock):
        workspace.open(inputs, training_identity)
        if run.restart and run.shard is None:
            shutil.rmtree(cache, ignore_errors=True)
        elif restored := restore_data(cache, workspace.partial):
            workspace.notes.append(
                f"reused {restored} finished states of an earlier run with the same inputs ({cache})"
            )
        if run.shard is None and (merged := merge_shards(workspace.partial)):
            workspace.notes.append(f"merged {merged} states made by --shard runs")
    if run.shard is None:
        open_lock.unlink(missing_ok=True)  # only shards running side by side need it
    for note in workspace.notes:
        logger.warning("%s", note)
