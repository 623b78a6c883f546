"""``openmae linprobe``: linear probing of a frozen encoder (BatchNorm + linear head, LARS)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from openmae.config import ConfigError, add_config_args, config_from_args
from openmae.eval_config import LinprobeConfig

EXAMPLES = """examples:
  openmae linprobe --checkpoint runs/pretrain            # Fashion-MNIST, a few minutes on 2 CPU cores
  openmae linprobe --checkpoint runs/pretrain --pool avg # mean patch token instead of the cls token
  openmae linprobe --eval-only --checkpoint runs/linprobe/model.safetensors
  torchrun --nproc_per_node=8 -m openmae linprobe --config linprobe_vit_base_in1k \\
      --checkpoint mae_pretrain_vit_base.pth --data /datasets/imagenet
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "linprobe",
        help="linear probe of a frozen encoder on labelled images",
        description="Train a linear classifier (BatchNorm without affine + linear, LARS) on the frozen features "
        "of a pretrained encoder; reports top-1/top-5 on the held-out split in OUTPUT/metrics.json. "
        "Settings: dataclass defaults < --config recipe < flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, LinprobeConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, LinprobeConfig)
    metrics = run_linprobe(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"linprobe: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} held-out "
            f"images; {cfg.train.output_dir}/metrics.json",
            file=sys.stderr,
        )
    return 0


def run_linprobe(cfg: LinprobeConfig) -> dict[str, Any]:
    """Linear-probe (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics
    written to ``metrics.json``."""
    from openmae.runs import run_protocol

    if cfg.model.drop_path_rate:
        raise ConfigError("linear probing keeps the encoder frozen: drop --model.drop_path_rate")
    return run_protocol("linprobe", cfg)
