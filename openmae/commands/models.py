"""``openmae models``: list the registered architectures."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="", help="substring filter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openmae.models import list_models, model_factory

    for name in list_models(args.pattern):
        print(f"{name:28s} {model_factory(name).__doc__ or ''}")
    return 0
