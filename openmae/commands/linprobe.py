"""``openmae linprobe``: linear probing of a frozen encoder (BatchNorm + linear head, LARS)."""

from __future__ import annotations

from typing import Any

from openmae.commands import accuracy_summary
from openmae.config import check_output_dir
from openmae.eval_config import LinprobeConfig

DESCRIPTION = (
    "Train a linear classifier (BatchNorm without affine + linear, LARS) on the frozen features of a pretrained "
    "encoder; reports top-1/top-5 on the held-out split in OUTPUT/metrics.json."
)
EXAMPLES = """examples:
  openmae linprobe --checkpoint runs/pretrain            # Fashion-MNIST, a few minutes on 2 CPU cores
  openmae linprobe --checkpoint runs/pretrain --pool avg # mean patch token instead of the cls token
  openmae linprobe --eval-only --checkpoint runs/linprobe/model.safetensors
  torchrun --nproc_per_node=8 -m openmae linprobe --config linprobe_vit_base_in1k \\
      --checkpoint mae_pretrain_vit_base.pth --data /datasets/imagenet
"""


def run_linprobe(cfg: LinprobeConfig) -> dict[str, Any]:
    """Linear-probe (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics
    written to ``metrics.json``."""
    from openmae.runs import run_protocol

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    return run_protocol("linprobe", cfg)


def run(cfg: LinprobeConfig) -> str:
    return accuracy_summary("linprobe", run_linprobe(cfg), cfg.train.output_dir)
