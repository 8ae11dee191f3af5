"""The head's manifest (alignd_value_head.json): what it was trained for, on which data, how, and how
well it ranks the held-out states."""

from __future__ import annotations

import time

from alignd.train.manifest import created_now, peak_rss_mib, versions
from alignd.train.value_head.context import _MadeData, _RunContext
from alignd.train.value_head.dataset import HeadData, target_scale
from alignd.train.value_head.fit import TrainedHead
from alignd.train.value_head.options import KIND


def head_manifest(ctx: _RunContext, made: _MadeData, data: HeadData, trained: TrainedHead) -> dict:
    """The manifest of the head ``trained`` on ``data`` (the states ``made`` for the run ``ctx``)."""
    opts, fit, curve = ctx.run.training, trained.fit, trained.curve
    return {
        "kind": KIND,
        "created": created_now(),
        "base_model": {"name": ctx.model_name, "path": str(ctx.model_dir), "weights_digest": ctx.digest},
        "baseline": ctx.baseline.manifest_entry(),
        "reward": ctx.inputs["reward"],
        "reward_spec": ctx.inputs["reward_spec"],
        **made.manifest,
        "alpha": opts.alpha,
        "features": {
            "state": "final normalised hidden state at the last token of s (the LM head's input; vLLM's "
            "compute_logits row)",
            "candidate": "input embedding of the candidate token",
            "computed_with": "transformers, float32, the base model's weights",
            "check": made.features_check,
        },
        "data": _data_entry(ctx, made, data, trained.split),
        "training": {
            "rank": opts.rank,
            "epochs": opts.epochs,
            "steps": fit["steps"],
            "steps_per_epoch": fit["steps_per_epoch"],
            "learning_rate": opts.learning_rate,
            "batch_size": opts.batch_size,
            "optimizer": "Adam",
            "ranking_weight": opts.ranking_weight,
            "target_scale": fit["scale"],
            "loss": "mean((q_c - t_c)^2)/scale^2 + ranking_weight * mean_{i<j} KL(sigmoid(dt/scale) || "
            "sigmoid(dq/scale)); c = centred within the state",
        },
        "metrics": {
            "heldout": curve[-1]["heldout"],
            "train": trained.train_metrics,
            "final_train_loss": trained.fitted.final_train_loss,
            "history": trained.fitted.history,
        },
        "learning_curve": [_curve_point(c) for c in curve],
        "command": ctx.run.command,
        "seed": ctx.inputs["seed"],
        "versions": versions(),
        "wall_s": {
            **made.wall_s,
            "training": round(trained.seconds, 3),
            "total_this_process": round(time.perf_counter() - ctx.started, 3),
        },
        "peak_rss_mib": peak_rss_mib(),
        "resumed": {"notes": ctx.workspace.notes},
        "notes": [
            *made.notes,
            "the head's Q is fitted up to a constant per state (the rule only uses differences within a state)",
        ],
    }


def _data_entry(ctx: _RunContext, made: _MadeData, data: HeadData, split: dict) -> dict:
    run, records = ctx.run, made.records
    return {
        "file": str(ctx.prompts_file),
        "sha256": ctx.inputs["prompts_sha256"],
        "prompts": len(ctx.prompts),
        "prompts_used": len(set(data.prompt_ids)),
        "eval_prompts": ctx.eval_check,
        "states": len(records),
        "sampling": {
            "engine": ctx.settings.engine,
            "dtype": ctx.inputs["dtype"],
            "answer_len": run.targets.answer_len,
            "temperature": run.targets.sample_temperature,
            "seed": ctx.inputs["seed"],
            "cut": made.data.get("cut"),
        },
        "split": split,
        **{k: v for k, v in made.data.items() if k not in ("cut",)},
        "targets": {
            "mean": float(data.targets.mean()),
            "std_within_state": target_scale(data.targets),
            "states_all_equal": int(sum(1 for r in records if len(set(r["values"])) == 1)),
        },
        "kept_in": str(ctx.cache),
    }


def _curve_point(c: dict) -> dict:
    return {
        "fraction": c["fraction"],
        "train_states": c["train_states"],
        "train_prompts": c["train_prompts"],
        "heldout_spearman": c["heldout"]["spearman_mean"],
        "heldout_top1_agreement": c["heldout"]["top1_agreement"],
        "heldout_pairwise_accuracy": c["heldout"]["pairwise_accuracy"],
        "heldout_mse_centred": c["heldout"]["mse_centred"],
    }
