"""``openmae recipes``: list or print the shipped YAML recipes."""

from __future__ import annotations

from dataclasses import dataclass

from openmae.config import CONFIG_DIR, ConfigError, opt, resolve_recipe


@dataclass
class RecipesSettings:
    """Settings of ``openmae recipes``."""

    name: str | None = opt(None, "recipe to print", positional=True)


def run(s: RecipesSettings) -> None:
    if s.name:
        path = resolve_recipe(s.name)
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder; give a YAML file or a shipped recipe's name")
        print(path.read_text(), end="")
        return
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ") if path.read_text() else ""
        print(f"{path.stem:24s} {first}")
