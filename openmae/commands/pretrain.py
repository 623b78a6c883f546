"""``openmae pretrain``: MAE pretraining from a recipe and flags; ``run_pretrain`` from Python."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


from openmae.config import PretrainConfig, add_config_args, config_from_args

EXAMPLES = """examples:
  openmae pretrain                                   # small MAE on built-in Fashion-MNIST, ~5 min on 2 CPU cores
  openmae pretrain --data ~/photos --img-size 64 --model mae_vit_tiny_patch16 --output runs/photos
  openmae pretrain --config mae_vit_base_in1k --data /datasets/imagenet/train
  torchrun --nproc_per_node=8 -m openmae pretrain --config mae_vit_large_in1k --data /datasets/imagenet/train
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a masked autoencoder",
        description="Pretrain a masked autoencoder. Settings: dataclass defaults < --config recipe < flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=run)


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain as configured; returns the run summary (also written to ``summary.json``)."""
    from openmae.runs import run_pretrain as run

    return run(cfg)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, PretrainConfig)
    summary = run_pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['images_per_s']:.0f} images/s; outputs in {cfg.train.output_dir}",
            file=sys.stderr,
        )
    return 0
