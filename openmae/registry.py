"""Model registry: ``register_variant(cls, name, **defaults)`` (or ``@register_model`` on a factory),
then ``create_model(name, **overrides)``.

A leaf: it imports nothing of openmae. The model families register themselves when
``openmae.models`` is imported, so code above the models imports these names from there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_NAMES_BY_CLASS: dict[type[nn.Module], list[str]] = {}  # in registration order


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def register_variant(
    cls: type[nn.Module], name: str, *, ignore: Iterable[str] = (), **defaults: Any
) -> Callable[..., nn.Module]:
    """Register ``name`` as ``cls`` built with ``defaults``; returns the factory.

    The factory takes constructor overrides, drops the arguments named in ``ignore`` (those of a
    related model with no place in ``cls``, so that ``create_model("vit_base_patch16",
    **mae.config)`` builds an MAE's classifier) and sets ``model.arch = name``. It carries
    ``defaults``, its class (``cls``) and a one-line ``__doc__`` (what ``openmae models`` prints).

    Args:
        cls: the model class; its constructor takes keyword arguments only from here.
        name: the registered name, unique.
        ignore: constructor arguments the factory silently drops.
        defaults: the variant's constructor arguments.
    """
    ignored = frozenset(ignore)

    def factory(**overrides: Any) -> nn.Module:
        kwargs = {k: v for k, v in {**defaults, **overrides}.items() if k not in ignored}
        model = cls(**kwargs)
        model.arch = name
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{cls.__name__} {name}: " + ", ".join(f"{k}={v}" for k, v in defaults.items())
    factory.defaults = dict(defaults)
    factory.cls = cls
    register_model(factory)
    _NAMES_BY_CLASS.setdefault(cls, []).append(name)
    return factory


def arch_of(model: nn.Module) -> str:
    """The registered name that rebuilds ``model`` with ``create_model(arch_of(model), **model.config)``.

    The name a factory built it under (``model.arch``); for a model built from its class, the first
    name registered for that class: its ``config`` holds every constructor argument, so any
    registered name of the class rebuilds it exactly.
    """
    arch = getattr(model, "arch", None)
    if isinstance(arch, str) and arch in _MODELS:
        return arch
    names = _NAMES_BY_CLASS.get(type(model))
    if not names:
        raise ValueError(
            f"{type(model).__name__} is not a registered model class, so it cannot be rebuilt by name; "
            f"register it with openmae.registry.register_variant or build a registered model with create_model"
        )
    return names[0]


def list_models(pattern: str = "") -> list[str]:
    """Registered model names, sorted; ``pattern`` filters by substring."""
    return sorted(n for n in _MODELS if pattern in n)


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under ``name``; a ValueError with close names for an unknown one."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (openmae.list_models() lists all {len(_MODELS)})")
    return _MODELS[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, with constructor overrides (``img_size=32, in_chans=1, ...``).

    Args:
        name: a name from :func:`list_models`.
        overrides: constructor arguments that replace the variant's defaults.
    """
    return model_factory(name)(**overrides)
