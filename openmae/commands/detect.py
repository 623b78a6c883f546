"""``openmae detect``: fine-tune a pretrained encoder for object detection and instance segmentation
(torchvision's Faster / Mask R-CNN on its feature pyramid through an FPN)."""

from __future__ import annotations

from typing import Any

from openmae.commands import dense_summary
from openmae.config import check_output_dir
from openmae.dense.config import DetectConfig

DESCRIPTION = (
    "Fine-tune a pretrained encoder for object detection (Faster R-CNN) or detection and instance segmentation "
    "(Mask R-CNN), torchvision's detectors on the encoder's feature pyramid through an FPN, with AdamW, layer-wise lr "
    "decay and paired augmentation. Reports COCO box (and mask) mAP@[.5:.95] and AP50 on the held-out split in "
    "OUTPUT/metrics.json (map, map_50, mask_map, ...) and draws boxes and masks in OUTPUT/predictions.png."
)
EXAMPLES = """examples:
  openmae detect --checkpoint runs/pretrain                 # fashion-scenes, 64 px, a few minutes on 2 CPU cores
  openmae detect --model vit_micro_patch4 --output runs/detect_random    # the same encoder, random init
  openmae detect --checkpoint runs/pretrain --detector mask_rcnn         # boxes and instance masks
  openmae detect --eval-only --checkpoint runs/detect --output runs/detect_eval
  torchrun --nproc_per_node=8 -m openmae detect --checkpoint mae_pretrain_vit_base.pth --dataset coco \\
      --data /datasets/coco --img-size 1024 --detector mask_rcnn --detect.fpn_channels 256 \\
      --detect.representation_size 1024 --detect.rois_per_image 512 --detect.detections_per_image 100 \\
      --detect.anchor_scale 8 --data.limit null --data.val_limit null --batch-size 2 --optim.layer_decay 0.7
"""


def run_detect(cfg: DetectConfig) -> dict[str, Any]:
    """Fine-tune (or with ``cfg.eval.only`` evaluate) as configured; returns the metrics written to
    ``metrics.json``: held-out box ``map``, ``map_50``, ... (and ``mask_map`` ... for Mask R-CNN), in percent."""
    from openmae.dense.runs import run_dense

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    return run_dense("detect", cfg)


def run(cfg: DetectConfig) -> str:
    return dense_summary("detect", run_detect(cfg), cfg.train.output_dir)
