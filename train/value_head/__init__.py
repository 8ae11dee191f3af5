"""``alignd train value-head``: distil the baseline's rollout values ``Q^BL(s, z)`` into a value head.

    training prompts --(SFT engine, temperature 1)--> one answer per state slot, cut at a random length
        --> state s = (prompt, partial answer)
        --> the SFT model's top-k candidates z (Engine.top_k_next) and Q^BL(s, z) for each, from the
            rollout estimator transfer_q decoding builds (Generation.value_estimator): the same code, so the
            targets are exactly the values rollout TQ* would use at s
        --> <out>.partial/states.jsonl, one line per finished state (resumable)
    then, in transformers (float32, the same weights):
        h(s)  the final normalised hidden state at the last token of s (what the LM head reads)
        e(z)  the input embedding of each candidate
    then a ValueHead (alignd.models.value_head) fitted with Adam on a split by prompt, a learning curve
    over data sizes, and the head folder (weights + manifest + learning_curve.png).

The package, by what each module does (each says why it does it so):

    options    the run's options and the names of its files
    shards     ``--shard K/N``: states made by several processes, merged by the plain command
    inputs     the evaluation prompts kept apart, the baseline resolved
    slots      state slots and their seeds
    rollouts   rollout targets (why these targets; the one module here that uses alignd.decoding)
    features   h(s) and e(z) in transformers (why transformers)
    dataset    the states as tensors, the split by prompt
    loss       the loss (why this loss)
    metrics    Spearman, top-1 agreement, pairwise accuracy
    fit        Adam, the learning curve
    plot       learning_curve.png
    cache      finished states kept for later runs with the same inputs
    context    a run opened: inputs checked, workspace opened
    manifest   the head's manifest
    command    the command: data, fit, publish

Implicit targets (``--targets implicit``) are train/implicit_targets.py.
"""

from __future__ import annotations

from alignd.train.value_head.cache import data_cache, keep_data, restore_data
from alignd.train.value_head.command import run_value_head
from alignd.train.value_head.context import _MadeData, _RunContext
from alignd.train.value_head.dataset import HeadData, head_data, split_by_prompt, target_scale
from alignd.train.value_head.features import Features, compute_features, final_hidden_states
from alignd.train.value_head.fit import FittedHead, TrainedHead, fit_and_evaluate, fit_head, train_with_learning_curve
from alignd.train.value_head.inputs import BaselineChoice, check_disjoint, resolve_baseline
from alignd.train.value_head.loss import head_loss
from alignd.train.value_head.metrics import evaluate, per_state_spearman, predict
from alignd.train.value_head.options import (
    AGREEMENT_ALPHAS,
    ANSWERS_FILE,
    DEFAULT_EVAL_PROMPTS,
    DENSE_STAMP,
    FEATURES_FILE,
    KIND,
    MAX_HEAD_BYTES,
    PLOT_FILE,
    STATES_FILE,
    TARGET_KINDS,
    HeadTrainingOptions,
    TargetOptions,
    ValueHeadRun,
)
from alignd.train.value_head.plot import plot_learning_curve
from alignd.train.value_head.rollouts import StateTargets, TargetMaker
from alignd.train.value_head.shards import SHARD_GLOB, Shard, merge_shards
from alignd.train.value_head.slots import StateSlot, state_slots

__all__ = [
    "AGREEMENT_ALPHAS",
    "ANSWERS_FILE",
    "DEFAULT_EVAL_PROMPTS",
    "DENSE_STAMP",
    "FEATURES_FILE",
    "KIND",
    "MAX_HEAD_BYTES",
    "PLOT_FILE",
    "SHARD_GLOB",
    "STATES_FILE",
    "TARGET_KINDS",
    "BaselineChoice",
    "Features",
    "FittedHead",
    "HeadData",
    "HeadTrainingOptions",
    "Shard",
    "StateSlot",
    "StateTargets",
    "TargetMaker",
    "TargetOptions",
    "TrainedHead",
    "ValueHeadRun",
    "_MadeData",
    "_RunContext",
    "check_disjoint",
    "compute_features",
    "data_cache",
    "evaluate",
    "final_hidden_states",
    "fit_and_evaluate",
    "fit_head",
    "head_data",
    "head_loss",
    "keep_data",
    "merge_shards",
    "per_state_spearman",
    "plot_learning_curve",
    "predict",
    "resolve_baseline",
    "restore_data",
    "run_value_head",
    "split_by_prompt",
    "state_slots",
    "target_scale",
    "train_with_learning_curve",
]
