"""``openmae segment``: fine-tune a pretrained encoder for semantic segmentation (pyramid + UperNet / FPN head)."""

from __future__ import annotations

from typing import Any

from openmae.commands import dense_summary
from openmae.config import check_output_dir
from openmae.dense.config import SegmentConfig

DESCRIPTION = (
    "Fine-tune a pretrained encoder for semantic segmentation: its feature pyramid (ViTDet's simple pyramid for a "
    "plain ViT, the stages of ConvViT and Swin) and a UperNet or FPN head, AdamW with layer-wise lr decay, warmup + "
    "cosine, paired scale-jitter / crop / flip augmentation. Reports miou, acc and per-class iou on the held-out "
    "split in OUTPUT/metrics.json and draws predicted masks over held-out images in OUTPUT/predictions.png."
)
EXAMPLES = """examples:
  openmae segment --checkpoint runs/pretrain                # fashion-scenes, 64 px, a few minutes on 2 CPU cores
  openmae segment --model vit_micro_patch4 --output runs/segment_random   # the same encoder, random init
  openmae segment --checkpoint runs/pretrain --head fpn     # the lighter Semantic FPN head
  openmae segment --eval-only --checkpoint runs/segment --output runs/segment_eval
  torchrun --nproc_per_node=8 -m openmae segment --checkpoint mae_pretrain_vit_base.pth --dataset ade20k \\
      --data /datasets/ADEChallengeData2016 --img-size 512 --segment.channels 512 --data.limit null \\
      --data.val_limit null --batch-size 2 --epochs 127 --optim.layer_decay 0.65
"""


def run_segment(cfg: SegmentConfig) -> dict[str, Any]:
    """Fine-tune (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics written to
    ``metrics.json``: held-out ``miou``, ``acc``, ``macc`` and per-class ``iou`` (%), and the run's description."""
    from openmae.dense.runs import run_dense

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    return run_dense("segment", cfg)


def run(cfg: SegmentConfig) -> str:
    return dense_summary("segment", run_segment(cfg), cfg.train.output_dir)
