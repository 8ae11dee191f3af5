"""Every setting of :class:`alignd.settings.Settings` as a command-line flag, and the settings a command
line gives: flags win over environment variables, and are parsed and validated as those are."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from alignd.cli.exits import EXIT_BAD_INPUT
from alignd.settings import Settings


def add_settings_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: frozenset[str] = frozenset()
) -> None:
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")
        # Values stay strings here; the settings model parses and validates them (same as env vars).
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _takes_text(annotation) -> bool:
    """Whether a settings field holds text (str or a path), so a flag's value is taken as it is."""
    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(annotation))
    return False


def _flag_value(name: str, raw: str):
    """A flag's string as the settings model should see it: decoded as JSON for non-text fields (a
    dict like --rewards, a number of a Literal like --max-lora-rank 32), as environment variables are;
    the raw string when it is not JSON (pydantic then parses it, e.g. 'True' or 'vllm')."""
    if _takes_text(Settings.model_fields[name].annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        name: _flag_value(name, value)
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    return Settings(**overrides)


def settings_errors(exc: ValidationError) -> list[str]:
    return [f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]


def load_settings(args: argparse.Namespace) -> Settings:
    try:
        return settings_from_args(args)
    except ValidationError as exc:
        sys.exit("alignd: invalid settings:\n" + "\n".join("  " + line for line in settings_errors(exc)))


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def command_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """The settings of an `alignd train` or `alignd select` command line, logging configured by them; invalid
    settings end the command as argparse ends a bad command line (one line, exit status 2)."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: invalid settings: {'; '.join(settings_errors(exc))}\n")
    configure_logging(settings)
    return settings
