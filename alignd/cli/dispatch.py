"""``alignd``'s top-level parser and its dispatch to the command named: serve and prepare-model
(alignd.cli.serve), train (alignd.cli.train_command) and select (alignd.cli.select_command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignd.cli.exits import interrupt_on_sigterm
from alignd.cli.select_command import run_select, select_parsers
from alignd.cli.serve import add_server_parsers, run_server_command
from alignd.cli.train_command import run_train
from alignd.cli.train_parsers import train_parsers


def main(argv: list[str] | None = None) -> None:
    command = list(sys.argv) if argv is None else ["alignd", *argv]
    parser = argparse.ArgumentParser(prog="alignd", description="Inference server for aligned decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_server_parsers(sub)
    train = train_parsers(sub)
    select = select_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("train", "select"):
        interrupt_on_sigterm(
            f"{Path(args.out).expanduser().absolute()}.partial/ (run the same command again to resume)"
        )
    if args.command == "train":
        run_train(args, train[args.train_command], command)
        return
    if args.command == "select":
        run_select(args, select[args.select_command], command)
        return
    run_server_command(args)
