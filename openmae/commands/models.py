"""``openmae models``: list the registered architectures."""

from __future__ import annotations

from dataclasses import dataclass

from openmae.config import opt


@dataclass
class ModelsSettings:
    """Settings of ``openmae models``."""

    pattern: str = opt("", "substring filter", positional=True)


def run(s: ModelsSettings) -> None:
    from openmae.models import list_models, model_factory

    for name in list_models(s.pattern):
        print(f"{name:28s} {model_factory(name).__doc__ or ''}")
