"""The ``alignd`` command line.

    alignd serve [--host H] [--port P] [--model M] [...]   serve the model over HTTP
    alignd prepare-model [--model M]                       convert / locate the model, then exit

Every setting is a flag (``--max-model-len 4096``) and an environment variable
(``ALIGND_MAX_MODEL_LEN=4096``); flags win.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from alignd.settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        # Values stay strings here; the settings model parses and validates them (same as env vars).
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        sys.exit("alignd: invalid settings:\n" + "\n".join(lines))


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignd", description="Inference server for aligned decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible and native API)")
    _add_settings_flags(serve)
    prepare = sub.add_parser("prepare-model", help="prepare the configured model (convert the embedded one) and exit")
    _add_settings_flags(prepare)
    args = parser.parse_args(argv)
    settings = load_settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        _serve(settings)
    elif args.command == "prepare-model":
        _prepare(settings)


if __name__ == "__main__":
    main()
