"""``openmae <command>``: each command lives in ``openmae/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) and the function it sets."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# one module per command under openmae/commands/
COMMANDS = ["pretrain", "models", "recipes", "reconstruct", "convert", "inspect", "finetune", "linprobe", "knn", "embed"]


def build_parser() -> argparse.ArgumentParser:
    from openmae.io import openmae_version

    parser = argparse.ArgumentParser(
        prog="openmae",
        description="Masked-autoencoder pretraining and evaluation for vision models.",
    )
    parser.add_argument("--version", action="version", version=f"openmae {openmae_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"openmae.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # user-facing errors (ConfigError, unsafe pickles, shape mismatches, missing decoder, ...)
        # say what to change; OPENMAE_DEBUG=1 shows the traceback
        if os.environ.get("OPENMAE_DEBUG"):
            raise
        print(f"openmae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
