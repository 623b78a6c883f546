"""Model registry: ``@register_model`` on a factory, then ``create_model(name, **overrides)``."""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def _ensure_loaded() -> None:
    # model modules register themselves on import
    from openmae import models  # noqa: F401


def list_models(pattern: str = "") -> list[str]:
    """Registered model names, sorted; ``pattern`` filters by substring."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if pattern in n)


def model_factory(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (openmae.list_models() lists all {len(_MODELS)})")
    return _MODELS[name]


def create_model(name: str, pretrained: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model, with constructor overrides (``img_size=32, in_chans=1, ...``).

    Args:
        name: a name from :func:`list_models`.
        pretrained: optional path to weights to load into the built model.
        overrides: constructor arguments that replace the variant's defaults.
    """
    model = model_factory(name)(**overrides)
    if pretrained is not None:
        from openmae.checkpoint import load_weights_into

        load_weights_into(model, pretrained)
    return model
