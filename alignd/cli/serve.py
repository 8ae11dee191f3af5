"""`alignd serve` (the model over HTTP) and `alignd prepare-model` (convert or locate the model, then exit):
the two commands configured by the settings flags alone."""

from __future__ import annotations

import argparse
import sys

from alignd.cli.settings_flags import add_settings_flags, configure_logging, load_settings
from alignd.settings import Settings


def add_server_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible and native API)")
    add_settings_flags(serve)
    prepare = sub.add_parser("prepare-model", help="prepare the configured model (convert the embedded one) and exit")
    add_settings_flags(prepare)


def run_server_command(args: argparse.Namespace) -> None:
    settings = load_settings(args)
    configure_logging(settings)
    if args.command == "serve":
        _serve(settings)
    elif args.command == "prepare-model":
        _prepare(settings)


def _serve(settings: Settings) -> None:
    import uvicorn

    from alignd.server.app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)


def _prepare(settings: Settings) -> None:
    from alignd.errors import AligndError
    from alignd.models.loading import resolve_model_path

    try:
        print(resolve_model_path(settings))
    except AligndError as exc:
        sys.exit(f"alignd: {exc.message}")
