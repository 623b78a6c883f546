"""``openmae finetune``: fine-tune a pretrained encoder end to end, or its last blocks only."""

from __future__ import annotations

from typing import Any

from openmae.commands import accuracy_summary
from openmae.config import check_output_dir
from openmae.eval_config import FinetuneConfig

DESCRIPTION = (
    "Fine-tune a pretrained encoder (or its last K blocks) on labelled images with the paper's recipe; reports "
    "top-1/top-5 on the held-out split in OUTPUT/metrics.json."
)
EXAMPLES = """examples:
  openmae finetune --checkpoint runs/pretrain                  # Fashion-MNIST, a few minutes on 2 CPU cores
  openmae finetune --checkpoint runs/pretrain --tune-blocks 1  # partial: the last block + head
  openmae finetune --checkpoint runs/pretrain --tune-blocks mlp
  openmae finetune --eval-only --checkpoint runs/finetune/model.safetensors
  torchrun --nproc_per_node=8 -m openmae finetune --config finetune_vit_base_in1k \\
      --checkpoint mae_pretrain_vit_base.pth --data /datasets/imagenet
"""


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics written
    to ``metrics.json``: held-out top-1 / top-5 (%), loss, images, and the run's description."""
    from openmae.runs import run_protocol

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    return run_protocol("finetune", cfg)


def run(cfg: FinetuneConfig) -> str:
    return accuracy_summary("finetune", run_finetune(cfg), cfg.train.output_dir)
