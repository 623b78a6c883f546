"""CLI commands, one module each (see the table in openmae.cli). A command module holds its
settings dataclass (unless openmae.config or openmae.eval_config does) and ``run(settings)``, which
does the work and returns the command's one-line result."""

from __future__ import annotations

from typing import Any


def accuracy_summary(name: str, metrics: dict[str, Any], output_dir: str) -> str:
    """The one-line result of a classification protocol (finetune, linprobe, knn)."""
    return (
        f"{name}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} held-out "
        f"images; {output_dir}/metrics.json"
    )
