"""``openmae finetune``: fine-tune a pretrained encoder end to end, or its last blocks only."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from openmae.config import add_config_args, config_from_args
from openmae.eval_config import FinetuneConfig

EXAMPLES = """examples:
  openmae finetune --checkpoint runs/pretrain                  # Fashion-MNIST, a few minutes on 2 CPU cores
  openmae finetune --checkpoint runs/pretrain --tune-blocks 1  # partial: the last block + head
  openmae finetune --checkpoint runs/pretrain --tune-blocks mlp
  openmae finetune --eval-only --checkpoint runs/finetune/model.safetensors
  torchrun --nproc_per_node=8 -m openmae finetune --config finetune_vit_base_in1k \\
      --checkpoint mae_pretrain_vit_base.pth --data /datasets/imagenet
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder on labelled images",
        description="Fine-tune a pretrained encoder (or its last K blocks) on labelled images with the paper's "
        "recipe; reports top-1/top-5 on the held-out split in OUTPUT/metrics.json. "
        "Settings: dataclass defaults < --config recipe < flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, FinetuneConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, FinetuneConfig)
    metrics = run_finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"finetune: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} held-out "
            f"images; {cfg.train.output_dir}/metrics.json",
            file=sys.stderr,
        )
    return 0


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics written
    to ``metrics.json``: held-out top-1 / top-5 (%), loss, images, and the run's description."""
    from openmae.runs import run_protocol

    return run_protocol("finetune", cfg)
