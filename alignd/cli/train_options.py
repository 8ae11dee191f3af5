"""Option groups that `alignd train` and `alignd select` share: the output folder and its resumption, and the
LoRA/DPO training options of the adapter commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def default_data_file(name: str) -> Path:
    """A data file shipped with alignd.train (train/data/), the default of a --prompts or --demonstrations."""
    import alignd.train

    return Path(alignd.train.__file__).resolve().parent / "data" / name


def add_prompts_option(group: argparse._ArgumentGroup) -> None:
    """--prompts of the commands that train on prompts (dpo, irft, value-head)."""
    group.add_argument(
        "--prompts",
        type=Path,
        default=default_data_file("prompts.jsonl"),
        metavar="FILE",
        help='JSONL of {"id", "prompt"} lines (default: train/data/prompts.jsonl)',
    )


def _modules(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_output_options(parser: argparse.ArgumentParser, artefact: str) -> None:
    out = parser.add_argument_group("output and resumption")
    out.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"the {artefact} folder to write; work in progress is kept in DIR.partial/ and resumed by "
        "the same command",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists (only once the new one is done)"
    )
    out.add_argument(
        "--restart", action="store_true", help="discard earlier work in DIR.partial/ instead of resuming it"
    )


def add_training_options(parser: argparse.ArgumentParser) -> None:
    from alignd.train.tuning import DEFAULT_TARGET_MODULES, MAX_LORA_RANK, TrainingOptions

    d = TrainingOptions()
    add_output_options(parser, "adapter")
    dpo = parser.add_argument_group("training (TRL DPOConfig / PEFT LoraConfig)")
    dpo.add_argument("--beta", type=float, default=d.beta, help="DPO beta: KL strength to the SFT model (%(default)s)")
    dpo.add_argument(
        "--lora-rank",
        type=int,
        default=d.lora_rank,
        help=f"LoRA rank, at most ALIGND_MAX_LORA_RANK (else {MAX_LORA_RANK}) (%(default)s)",
    )
    dpo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    dpo.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (%(default)s)")
    dpo.add_argument(
        "--target-modules",
        type=_modules,
        default=DEFAULT_TARGET_MODULES,
        metavar="A,B,...",
        help=f"layers that get an adapter ({','.join(DEFAULT_TARGET_MODULES)})",
    )
    dpo.add_argument("--epochs", type=float, default=d.epochs, help="passes over the pairs (%(default)s)")
    dpo.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; > 0 overrides --epochs")
    dpo.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate (%(default)s)")
    dpo.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per device step (%(default)s)")
    dpo.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    dpo.add_argument("--save-steps", type=int, default=d.save_steps, help="TRL checkpoint every N steps (%(default)s)")
    dpo.add_argument("--logging-steps", type=int, default=d.logging_steps, help="TRL log every N steps (%(default)s)")
    dpo.add_argument(
        "--max-length", type=int, default=d.max_length, help="longest prompt + answer, tokens (%(default)s)"
    )
    dpo.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (large models)")
