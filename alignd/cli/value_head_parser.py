"""The parser of `alignd train value-head`: where the states and their target values come from, how they
are made, and how the head is trained on them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from alignd.cli.train_options import add_output_options, add_prompts_option

if TYPE_CHECKING:
    from alignd.train.value_head import HeadTrainingOptions, TargetOptions


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.25,0.5,1, got {text!r}") from None


def value_head_parser(verbs) -> argparse.ArgumentParser:
    from alignd.train.value_head import HeadTrainingOptions, TargetOptions

    t, h = TargetOptions(), HeadTrainingOptions()
    parser = verbs.add_parser(
        "value-head",
        help="a value head: Q^BL(s, z) of the baseline's rollouts distilled into a small head on the "
        "SFT model's hidden state",
        description="Sample SFT answers to --prompts, cut them into states, compute the SFT model's top-k "
        "candidates at each and their rollout values Q^BL(s, z) with transfer_q's own estimator (baseline "
        "--baseline, reward --reward), then train a value head on the SFT model's final hidden state and the "
        "candidates' embeddings. Interrupt at any time; the same command resumes.",
    )
    data = parser.add_argument_group("states and targets")
    _add_target_source_options(data, t)
    _add_state_options(data, t)
    _add_head_training_options(parser, h)
    add_output_options(parser, "value head")
    return parser


def _add_target_source_options(data: argparse._ArgumentGroup, t: TargetOptions) -> None:
    """The prompts, and whose answers and which reward give the targets."""
    from alignd.train.value_head import DEFAULT_EVAL_PROMPTS, TARGET_KINDS

    add_prompts_option(data)
    data.add_argument(
        "--eval-prompts",
        type=Path,
        default=DEFAULT_EVAL_PROMPTS,
        metavar="FILE",
        help="evaluation prompts the training pool must not share a prompt with (default: eval/prompts.jsonl)",
    )
    data.add_argument(
        "--reward",
        default=None,
        metavar="NAME",
        help="the target reward, any reward of the registry (default: ALIGND_TARGET_REWARD)",
    )
    data.add_argument(
        "--baseline",
        default="default",
        metavar="NAME",
        help="whose rollouts give Q: 'default' (the server's default baseline: the committed DPO "
        "adapter on the embedded model), 'prompted', a name of ALIGND_BASELINES, or an adapter or "
        "model folder (%(default)s)",
    )
    data.add_argument(
        "--targets",
        choices=TARGET_KINDS,
        default=t.kind,
        help="what the head learns: 'rollouts', Q^BL from the baseline's rollouts scored by --reward "
        "(any baseline, any reward), or 'implicit', the exact token-level Q of a baseline trained by "
        "'alignd train dpo|irft' from this model, beta * (log pi_BL - log pi_SFT), at every position of "
        "sampled answers from one teacher-forced pass of each model (its own reward only) (%(default)s)",
    )


def _add_state_options(data: argparse._ArgumentGroup, t: TargetOptions) -> None:
    """How many states are made, and how: candidates, rollouts, sampled answers, concurrency, shards."""
    data.add_argument(
        "--states",
        type=int,
        default=None,
        help=f"states s to make (rollouts: {t.states}; implicit: every state of the --answers)",
    )
    data.add_argument(
        "--answers",
        type=int,
        default=None,
        help="implicit targets: SFT answers to sample, each giving a state at every position "
        "(default: one per training prompt)",
    )
    data.add_argument("--top-k", type=int, default=t.top_k, help="candidates per state (%(default)s)")
    data.add_argument("--rollout-len", type=int, default=t.rollout_len, help="tokens per rollout (%(default)s)")
    data.add_argument(
        "--num-rollouts",
        type=int,
        default=t.num_rollouts,
        help="rollouts per candidate; 1 = greedy, more = sampled at temperature 1 (%(default)s)",
    )
    data.add_argument(
        "--answer-len",
        type=int,
        default=t.answer_len,
        help="longest sampled SFT answer that states are cut from (%(default)s)",
    )
    data.add_argument(
        "--sample-temperature",
        type=float,
        default=t.sample_temperature,
        help="temperature of the sampled answers (%(default)s)",
    )
    data.add_argument(
        "--concurrency",
        type=int,
        default=t.concurrency,
        help="states in flight at once; their engine calls batch together (%(default)s)",
    )
    data.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="make only the states of slots K modulo N, then stop: N such processes make the states "
        "together (one per core, VLLM_CPU_OMP_THREADS_BIND=K on the CPU backend); the same command "
        "without --shard then merges them and trains",
    )


def _add_head_training_options(parser: argparse.ArgumentParser, h: HeadTrainingOptions) -> None:
    fit = parser.add_argument_group("training the head (Adam)")
    fit.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the alpha of the top-1 agreement metric, recorded in the manifest (default: ALIGND_DECODING_ALPHA)",
    )
    fit.add_argument("--rank", type=int, default=h.rank, help="the head's width (%(default)s)")
    fit.add_argument("--epochs", type=float, default=h.epochs, help="passes over the training states (%(default)s)")
    fit.add_argument("--learning-rate", type=float, default=h.learning_rate, help="Adam's learning rate (%(default)s)")
    fit.add_argument("--batch-size", type=int, default=h.batch_size, help="states per step (%(default)s)")
    fit.add_argument(
        "--ranking-weight",
        type=float,
        default=h.ranking_weight,
        help="weight of the pairwise ranking term of the loss (%(default)s)",
    )
    fit.add_argument(
        "--holdout-fraction",
        type=float,
        default=h.holdout_fraction,
        help="fraction of the prompts whose states are held out (%(default)s)",
    )
    fit.add_argument(
        "--curve-fractions",
        type=_fractions,
        default=h.curve_fractions,
        metavar="F,F,F",
        help="data sizes of the learning curve, fractions of the training states, 1 among them (0.25,0.5,1)",
    )


def value_head_states(args: argparse.Namespace) -> int | None:
    """--states as the run takes it: the rollout targets' default when not given; implicit targets take every
    state of their answers when not given."""
    from alignd.train.value_head import TargetOptions

    if args.states is not None or args.targets == "implicit":
        return args.states
    return TargetOptions().states
