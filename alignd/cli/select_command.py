"""`alignd select s2l|random`: its parsers (the data and budget, S2L's proxy and clustering, the output folder,
the settings flags) and its run, a selection of a training set written for `alignd train --select`."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignd.cli.exits import command_errors
from alignd.cli.settings_flags import add_settings_flags, command_settings
from alignd.cli.train_options import add_output_options


def _budget(text: str):
    from alignd.train.data import TrainingInputError
    from alignd.train.select import Budget

    try:
        return Budget.parse(text)
    except TrainingInputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def select_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    select = sub.add_parser(
        "select",
        help="select a subset of a training set (S2L, or random), docs/TRAINING.md",
        description="Select training data for `alignd train`. See docs/TRAINING.md.",
    )
    verbs = select.add_subparsers(dest="select_command", required=True, metavar="{s2l,random}")
    s2l = verbs.add_parser(
        "s2l",
        help="S2L: cluster the loss trajectories of a small proxy, spread the budget over the clusters",
        description="Train a proxy (a LoRA adapter of --proxy) on the whole set, record every example's loss at "
        "--checkpoints checkpoints, K-means the trajectories into --clusters clusters, and sample the budget "
        "evenly across them, smallest first. Interrupt at any time; the same command resumes.",
    )
    rand = verbs.add_parser(
        "random",
        help="a uniform random subset (the baseline S2L is compared with)",
        description="A uniform random subset of the set, seeded by --seed.",
    )
    for parser in (s2l, rand):
        _add_data_options(parser)
    _add_proxy_options(s2l)
    for parser in (s2l, rand):
        add_output_options(parser, "selection")
        own = frozenset(a.dest for a in parser._actions)
        add_settings_flags(
            parser.add_argument_group("settings (each also ALIGND_<NAME>; --seed seeds the selection)"), skip=own
        )
    return {"s2l": s2l, "random": rand}


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="FILE",
        help='JSONL demonstrations {"id", "prompt", "response"} or preference pairs '
        '{"id", "prompt", "chosen", "rejected"} (pairs are selected by their chosen answer)',
    )
    data.add_argument(
        "--budget",
        required=True,
        type=_budget,
        metavar="B",
        help="examples to select: a count (100), a fraction (0.3) or a percentage (30%%)",
    )


def _add_proxy_options(s2l: argparse.ArgumentParser) -> None:
    from alignd.train.select import ProxyOptions

    d = ProxyOptions()
    proxy = s2l.add_argument_group("proxy and clustering")
    proxy.add_argument(
        "--proxy",
        default=None,
        metavar="MODEL",
        help="the proxy model: 'embedded' or a local model folder (default: --model, the embedded model)",
    )
    proxy.add_argument(
        "--checkpoints",
        type=int,
        default=d.checkpoints,
        help="C: checkpoints of the proxy's training at which losses are taken (%(default)s)",
    )
    proxy.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="K of K-means (default: 100 as in the paper, at most a tenth of the set)",
    )
    proxy.add_argument(
        "--proxy-epochs", type=float, default=d.epochs, help="passes of the proxy over the set (%(default)s)"
    )
    proxy.add_argument("--proxy-learning-rate", type=float, default=d.learning_rate, help="(%(default)s)")
    proxy.add_argument("--proxy-batch-size", type=int, default=d.batch_size, help="examples per step (%(default)s)")
    proxy.add_argument("--proxy-lora-rank", type=int, default=d.lora_rank, help="(%(default)s)")
    proxy.add_argument(
        "--max-length", type=int, default=d.max_length, help="longest prompt + answer, tokens (%(default)s)"
    )
    proxy.add_argument(
        "--loss-batch-size",
        type=int,
        default=d.loss_batch_size,
        help="examples per forward pass when taking losses (%(default)s)",
    )


def run_select(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> None:
    from alignd.train.select import ProxyOptions, SelectionRun, run_selection

    if getattr(args, "proxy", None):
        args.model = args.proxy
    settings = command_settings(args, parser)
    s2l = args.select_command == "s2l"
    proxy = ProxyOptions(seed=settings.seed)
    if s2l:
        proxy = ProxyOptions(
            checkpoints=args.checkpoints,
            epochs=args.proxy_epochs,
            learning_rate=args.proxy_learning_rate,
            batch_size=args.proxy_batch_size,
            lora_rank=args.proxy_lora_rank,
            max_length=args.max_length,
            loss_batch_size=args.loss_batch_size,
            seed=settings.seed,
        )
    run = SelectionRun(
        settings=settings,
        data_file=args.data,
        out=args.out,
        budget=args.budget,
        method=args.select_command,
        clusters=args.clusters if s2l else None,
        proxy=proxy,
        overwrite=args.overwrite,
        restart=args.restart,
        command=command,
    )
    with command_errors(parser, args.out):
        out = run_selection(run)
    print(f"selection written to {out}")
