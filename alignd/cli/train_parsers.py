"""The parsers of `alignd train`: its `dpo` and `irft` adapter commands (their data, generation and training
options) beside `value-head` (alignd.cli.value_head_parser), each with the settings flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignd.cli.settings_flags import add_settings_flags
from alignd.cli.train_options import add_prompts_option, add_training_options, default_data_file
from alignd.cli.value_head_parser import value_head_parser


def train_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    train = sub.add_parser(
        "train",
        help="train a baseline or a learned reward as a LoRA adapter, or a value head (docs/TRAINING.md)",
        description="Train a LoRA adapter of the served (SFT) model, or a value head for it. See docs/TRAINING.md.",
    )
    verbs = train.add_subparsers(dest="train_command", required=True, metavar="{dpo,irft,value-head}")
    dpo = _dpo_parser(verbs)
    irft = _irft_parser(verbs)
    value_head = value_head_parser(verbs)
    for parser in (dpo, irft, value_head):
        own = frozenset(a.dest for a in parser._actions)
        add_settings_flags(
            parser.add_argument_group(
                "settings (each also ALIGND_<NAME>; --model, --engine and --seed matter here: --seed seeds sampling "
                "and training)"
            ),
            skip=own,
        )
    return {"dpo": dpo, "irft": irft, "value-head": value_head}


def _dpo_parser(verbs) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "dpo",
        help="a baseline aligned to a target reward, by DPO on the model's own scored samples",
        description="Sample --samples-per-prompt answers per prompt from the model (on the engine of --engine), "
        "score them with --reward, pair each prompt's best and worst, and train a LoRA adapter with TRL's "
        "DPOTrainer against the SFT model. Interrupt at any time; the same command resumes.",
    )
    data = parser.add_argument_group("data and sampling")
    add_prompts_option(data)
    data.add_argument(
        "--reward",
        default=None,
        metavar="NAME",
        help="the target reward, any reward of the registry (default: ALIGND_TARGET_REWARD)",
    )
    data.add_argument("--samples-per-prompt", type=int, default=4, help="answers sampled per prompt (%(default)s)")
    data.add_argument("--max-new-tokens", type=int, default=48, help="longest sampled answer (%(default)s)")
    data.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    data.add_argument(
        "--sample-batch-size", type=int, default=32, help="prompts per engine call and per saved batch (%(default)s)"
    )
    data.add_argument(
        "--tie-margin",
        type=float,
        default=1e-6,
        help="skip a prompt whose best and worst rewards differ by at most this (%(default)s)",
    )
    _add_adapter_options(parser)
    return parser


def _irft_parser(verbs) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "irft",
        help="a reward learned from demonstrations (IRFT: implicit reward, negatives regenerated)",
        description="Learn the implicit reward beta*log(pi/pi_sft) from demonstrations: DPO's loss with the "
        "demonstration as chosen and the current policy's own generation as rejected, the generations "
        "regenerated at the start of each of --rounds rounds; the reference stays the SFT model.",
    )
    data = parser.add_argument_group("data and generation")
    data.add_argument(
        "--demonstrations",
        type=Path,
        default=default_data_file("demonstrations.jsonl"),
        metavar="FILE",
        help='JSONL of {"id", "prompt", "response"} lines (default: train/data/demonstrations.jsonl)',
    )
    data.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="T: negatives regenerated T times over the run (1 = one SPIN round) (%(default)s)",
    )
    data.add_argument(
        "--max-new-tokens",
        type=int,
        default=96,
        help="longest generated negative; keep it above the demonstrations' length (%(default)s)",
    )
    data.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    data.add_argument("--generation-batch-size", type=int, default=16, help="prompts per generate call (%(default)s)")
    _add_adapter_options(parser)
    return parser


def _add_adapter_options(parser: argparse.ArgumentParser) -> None:
    """What the adapter commands share: the output folder, the training options and --select."""
    add_training_options(parser)
    parser.add_argument(
        "--select",
        type=_select_spec,
        default=None,
        metavar="s2l:B|random:B",
        help="train on a subset: S2L data selection (docs/TRAINING.md) or a uniform random one, of budget B "
        "(a count like 100 or a fraction like 0.3); DPO selects its pairs by their chosen answer, IRFT its "
        "demonstrations; the proxy is --model. Recorded in the adapter's manifest",
    )


def _select_spec(text: str):
    from alignd.train.data import TrainingInputError
    from alignd.train.select import parse_select_option

    try:
        return parse_select_option(text)
    except TrainingInputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
