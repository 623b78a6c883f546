"""``openmae finetune``: fine-tune a pretrained encoder end to end, or its last blocks only."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from openmae.config import add_config_args, config_from_args, to_dict
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
    from openmae.evaluate import (
        FinetuneTask,
        HeldOutEvaluation,
        build_classifier,
        evaluate_checkpoint,
        finetune_transform,
        labelled_splits,
        read_encoder,
        train_protocol,
    )

    if cfg.eval.only:
        return evaluate_checkpoint("finetune", cfg, head_norm=False)
    weights = read_encoder(cfg.model.checkpoint)
    train, test = labelled_splits(cfg.data, cfg.train.seed, "finetune", cfg.eval.crop_pct)
    train.transform = finetune_transform(cfg.data, cfg.finetune, train.mean, train.std)
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(
        cfg.model, weights, num_classes=train.num_classes, img_size=cfg.data.img_size, in_chans=train.channels,
        verbose=int(os.environ.get("RANK", "0")) == 0,
    )
    evaluation = HeldOutEvaluation(test, cfg.eval, cfg.train.epochs, cfg.data.num_workers)
    task = FinetuneTask(model, cfg.finetune, cfg.train.seed, evaluation)
    config = to_dict(cfg)
    config["data"]["mean"], config["data"]["std"] = list(train.mean), list(train.std)
    return train_protocol("finetune", task, train, cfg, config)
