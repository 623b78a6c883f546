"""``openmae recipes``: list or print the shipped YAML recipes."""

from __future__ import annotations

from dataclasses import dataclass

from openmae.config import CONFIG_DIR, opt, resolve_recipe


@dataclass
class RecipesSettings:
    """Settings of ``openmae recipes``."""

    name: str | None = opt(None, "recipe to print", positional=True)


def run(s: RecipesSettings) -> None:
    if s.name:
        print(resolve_recipe(s.name).read_text(), end="")
        return
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ") if path.read_text() else ""
        print(f"{path.stem:24s} {first}")
