"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip: Iterable[str] = (),
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW groups: no decay on biases, norms, any 1-D parameter and tokens named in ``skip``.

    ``lr_scale(name)`` (for layer-wise decay) splits groups further by scale; each group gets an
    ``lr_scale`` entry that the schedule multiplies in.
    """
    skip = set(skip)
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = lr_scale(name) if lr_scale else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # a stable order, so optimizer state lines up across runs and resumes
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    # The fused kernel does the whole update in one vectorised pass: on CPU it is ~9x faster than
    # foreach for ViT-B's 111M parameters (0.29 s vs 2.6 s a step, benchmarks/optimizer_step.py).
    params = [p for g in clean for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), fused=fused, foreach=None if fused else True)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cycle cosine to ``floor``.

    Evaluated per iteration (the reference updates per iteration, at fractional epochs).
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
