"""``openmae recipes``: list or print the shipped YAML recipes."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list shipped YAML recipes, or print one")
    p.add_argument("name", nargs="?", help="recipe to print")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openmae.config import CONFIG_DIR, resolve_recipe

    if args.name:
        print(resolve_recipe(args.name).read_text(), end="")
        return 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ") if path.read_text() else ""
        print(f"{path.stem:24s} {first}")
    return 0
