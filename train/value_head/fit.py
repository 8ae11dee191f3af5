"""Fitting heads with Adam: one head (:func:`fit_head`), one per data size for the learning curve
(:func:`train_with_learning_curve`, the full-data one being the result), and a run's whole fit, its
split by prompt and its metrics (:func:`fit_and_evaluate`)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignd.train.data import TrainingError
from alignd.train.value_head.dataset import HeadData, split_by_prompt, target_scale
from alignd.train.value_head.loss import head_loss
from alignd.train.value_head.metrics import evaluate, predict
from alignd.train.value_head.options import HeadTrainingOptions

if TYPE_CHECKING:
    from alignd.models.value_head import ValueHead

logger = logging.getLogger(__name__)


@dataclass
class FittedHead:
    head: ValueHead
    steps: int
    history: list[dict]
    final_train_loss: float
    seconds: float


def fit_head(
    train: HeadData,
    heldout: HeadData | None,
    opts: HeadTrainingOptions,
    *,
    steps: int,
    scale: float,
    vocab_size: int,
    eval_every: int | None = None,
) -> FittedHead:
    """A fresh :class:`ValueHead` trained with Adam for ``steps`` steps of ``batch_size`` states (the
    training states reshuffled at each pass); with ``eval_every``, the held-out metrics every so many
    steps go into the history."""
    import torch

    from alignd.models.value_head import ValueHead, ValueHeadConfig

    began = time.perf_counter()
    torch.manual_seed(opts.seed)
    head = ValueHead(ValueHeadConfig(hidden_size=train.hidden.shape[1], vocab_size=vocab_size, rank=opts.rank))
    optimizer = torch.optim.Adam(head.parameters(), lr=opts.learning_rate)
    shuffle = torch.Generator().manual_seed(opts.seed)
    queue = torch.empty(0, dtype=torch.long)
    history: list[dict] = []
    running: list[float] = []
    for step in range(1, steps + 1):
        while len(queue) < min(opts.batch_size, len(train)):
            queue = torch.cat([queue, torch.randperm(len(train), generator=shuffle)])
        rows, queue = queue[: opts.batch_size], queue[opts.batch_size :]
        head.train()
        values = head(train.hidden[rows], train.candidate_embeddings(rows))
        loss, _ = head_loss(values, train.targets[rows], scale, opts.ranking_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        if eval_every and heldout is not None and (step % eval_every == 0 or step == steps):
            head.eval()
            held = evaluate(head, heldout, alpha=opts.alpha, scale=scale, ranking_weight=opts.ranking_weight)
            history.append(
                {
                    "step": step,
                    "epoch": round(step * opts.batch_size / len(train), 3),
                    "train_loss": round(sum(running) / len(running), 6),
                    "heldout_loss": round(held["loss"], 6),
                    "heldout_spearman": held["spearman_mean"],
                    "heldout_top1_agreement": held["top1_agreement"],
                }
            )
            running = []
    head.eval()
    final = float(head_loss(predict(head, train), train.targets, scale, opts.ranking_weight)[0])
    return FittedHead(head, steps, history, final, time.perf_counter() - began)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: the head's matrices are small, so thread hand-offs cost more than they save
    (7x slower with two threads on a 2-core machine shared with other work, measured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_with_learning_curve(
    data: HeadData, train_rows: list[int], heldout_rows: list[int], opts: HeadTrainingOptions, vocab_size: int
) -> tuple[FittedHead, list[dict], dict]:
    """One head per data size (nested random subsets of the training states, ``curve_fractions`` of
    them), each trained for the same number of Adam steps (``epochs`` passes over the full training set)
    so that the sizes differ by data only. The full-data head is the result. Returns it, the curve and
    the loss's scale."""
    train, heldout = data.subset(train_rows), data.subset(heldout_rows)
    scale = target_scale(train.targets)
    if not scale > 0:
        raise TrainingError(
            "every state's candidates have the same rollout value: the reward does not tell them "
            "apart (a longer --rollout-len or another reward may)"
        )
    steps = max(1, math.ceil(opts.epochs * len(train) / opts.batch_size))
    per_epoch = max(1, math.ceil(len(train) / opts.batch_size))
    order = random.Random(opts.seed + 1).sample(range(len(train)), len(train))
    with _one_thread():
        return _fit_sizes(train, heldout, opts, vocab_size, scale=scale, steps=steps, per_epoch=per_epoch, order=order)


def _fit_sizes(
    train: HeadData,
    heldout: HeadData,
    opts: HeadTrainingOptions,
    vocab_size: int,
    *,
    scale: float,
    steps: int,
    per_epoch: int,
    order: list[int],
) -> tuple[FittedHead, list[dict], dict]:
    """The heads of :func:`train_with_learning_curve`, smallest data size first."""
    curve: list[dict] = []
    final: FittedHead | None = None
    for fraction in sorted(set(opts.curve_fractions)):
        size = max(1, math.ceil(fraction * len(train)))
        part = train.subset(sorted(order[:size]))
        full = fraction == 1.0
        fitted = fit_head(
            part, heldout, opts, steps=steps, scale=scale, vocab_size=vocab_size, eval_every=per_epoch if full else None
        )
        held = evaluate(fitted.head, heldout, alpha=opts.alpha, scale=scale, ranking_weight=opts.ranking_weight)
        curve.append(
            {
                "fraction": fraction,
                "train_states": size,
                "train_prompts": len(set(part.prompt_ids)),
                "steps": steps,
                "seconds": round(fitted.seconds, 3),
                "heldout": held,
            }
        )
        logger.info(
            "value head on %d states: held-out Spearman %s, top-1 agreement %.3f",
            size,
            held["spearman_mean"],
            held["top1_agreement"],
        )
        if full:
            final = fitted
    assert final is not None  # 1.0 is among the fractions (checked)
    return final, curve, {"scale": scale, "steps": steps, "steps_per_epoch": per_epoch}


@dataclass
class TrainedHead:
    """A run's full-data head, its learning curve, and its metrics on its own training states."""

    fitted: FittedHead
    curve: list[dict]
    fit: dict  # the loss's scale, the steps and the steps per epoch
    train_metrics: dict
    split: dict  # the split by prompt (the manifest's data.split)
    seconds: float  # fitting the learning curve's heads


def fit_and_evaluate(data: HeadData, opts: HeadTrainingOptions, vocab_size: int, seed: int) -> TrainedHead:
    """Split ``data`` by prompt (seeded by ``seed``), fit the heads of the learning curve, and measure the
    full-data head on the states it was trained on."""
    train_rows, heldout_rows = split_by_prompt(data.prompt_ids, opts.holdout_fraction, seed)
    began = time.perf_counter()
    fitted, curve, fit = train_with_learning_curve(data, train_rows, heldout_rows, opts, vocab_size)
    training_s = time.perf_counter() - began
    train_metrics = evaluate(
        fitted.head, data.subset(train_rows), alpha=opts.alpha, scale=fit["scale"], ranking_weight=opts.ranking_weight
    )
    split = {
        "by": "prompt",
        "holdout_fraction": opts.holdout_fraction,
        "train_states": len(train_rows),
        "heldout_states": len(heldout_rows),
        "train_prompts": len({data.prompt_ids[i] for i in train_rows}),
        "heldout_prompts": len({data.prompt_ids[i] for i in heldout_rows}),
    }
    return TrainedHead(fitted, curve, fit, train_metrics, split, training_s)
