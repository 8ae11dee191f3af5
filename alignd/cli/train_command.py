"""`alignd train dpo|irft|value-head` run: the parsed command line turned into the run of alignd.train it
names, that run, and how the command ends (alignd.cli.exits)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignd.cli.exits import command_errors
from alignd.cli.settings_flags import command_settings
from alignd.cli.value_head_parser import value_head_states
from alignd.settings import Settings


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> None:
    settings = command_settings(args, parser)
    what = "adapter"
    # The runs are built inside command_errors too: a bad option value (a --shard, say) is bad input.
    with command_errors(parser, args.out):
        if args.train_command == "value-head":
            what, out = _train_value_head(args, settings, command)
        elif args.train_command == "dpo":
            out = _train_dpo(args, settings, command)
        else:
            out = _train_irft(args, settings, command)
    print(f"{what} written to {out}")


def _training_options(args: argparse.Namespace, settings: Settings):
    from alignd.train.tuning import TrainingOptions

    return TrainingOptions(
        beta=args.beta,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=settings.seed,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _train_value_head(args: argparse.Namespace, settings: Settings, command: list[str]) -> tuple[str, Path]:
    """Runs `alignd train value-head`; returns what was written (the head, or one shard's states) and where."""
    from alignd.train.value_head import HeadTrainingOptions, Shard, TargetOptions, ValueHeadRun, run_value_head

    run = ValueHeadRun(
        shard=Shard.parse(args.shard) if args.shard else None,
        settings=settings,
        prompts_file=args.prompts,
        reward=args.reward,
        out=args.out,
        baseline=args.baseline,
        eval_prompts_file=args.eval_prompts,
        overwrite=args.overwrite,
        restart=args.restart,
        command=command,
        targets=TargetOptions(
            states=value_head_states(args),
            top_k=args.top_k,
            kind=args.targets,
            answers=args.answers,
            rollout_len=args.rollout_len,
            num_rollouts=args.num_rollouts,
            answer_len=args.answer_len,
            sample_temperature=args.sample_temperature,
            concurrency=args.concurrency,
        ),
        training=HeadTrainingOptions(
            rank=args.rank,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            ranking_weight=args.ranking_weight,
            holdout_fraction=args.holdout_fraction,
            curve_fractions=tuple(args.curve_fractions),
            alpha=args.alpha if args.alpha is not None else settings.decoding_alpha,
            seed=settings.seed,
        ),
    )
    out = run_value_head(run)
    if run.shard is not None:
        return f"the states of shard {run.shard} (the same command without --shard trains)", out
    return "value head", out


def _train_dpo(args: argparse.Namespace, settings: Settings, command: list[str]) -> Path:
    from alignd.train.dpo import DPORun, SamplingOptions, run_dpo

    training = _training_options(args, settings)
    run = DPORun(
        settings=settings,
        prompts_file=args.prompts,
        reward=args.reward or settings.target_reward,
        out=args.out,
        training=training,
        overwrite=args.overwrite,
        restart=args.restart,
        command=command,
        select=args.select,
        sampling=SamplingOptions(
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.sample_temperature,
            batch_size=args.sample_batch_size,
            tie_margin=args.tie_margin,
        ),
    )
    return run_dpo(run)


def _train_irft(args: argparse.Namespace, settings: Settings, command: list[str]) -> Path:
    from alignd.train.irft import GenerationOptions, IRFTRun, run_irft

    run = IRFTRun(
        settings=settings,
        demonstrations_file=args.demonstrations,
        out=args.out,
        rounds=args.rounds,
        training=_training_options(args, settings),
        overwrite=args.overwrite,
        restart=args.restart,
        command=command,
        select=args.select,
        generation=GenerationOptions(
            max_new_tokens=args.max_new_tokens,
            temperature=args.sample_temperature,
            batch_size=args.generation_batch_size,
        ),
    )
    return run_irft(run)
