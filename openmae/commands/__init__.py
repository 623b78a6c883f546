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


def dense_summary(task: str, metrics: dict[str, Any], output_dir: str) -> str:
    """The one-line result of a dense command: segment's mIoU and pixel accuracy (%), detect's box (and
    mask) mAP and AP50."""

    def value(key: str, unit: str = "") -> str:
        return "n/a" if metrics.get(key) is None else f"{metrics[key]:.2f}{unit}"

    if task == "segment":
        figures = f"mIoU {value('miou', '%')}, pixel accuracy {value('acc', '%')}"
    else:
        figures = f"box mAP {value('map')} (AP50 {value('map_50')})"
        if "mask_map" in metrics:
            figures += f", mask mAP {value('mask_map')} (AP50 {value('mask_map_50')})"
    return f"{task}: {figures} on {metrics['images']} held-out images; {output_dir}/metrics.json"
