"""Dense-prediction metrics on torchmetrics: accumulated over an evaluation, synced across DDP processes.

- :class:`SegmentationMetrics`: a confusion matrix -> ``miou``, per-class ``iou``, pixel accuracy ``acc``
  and mean class accuracy ``macc``.
- :class:`DetectionMetrics`: COCO's box and mask mAP (torchmetrics' MeanAveragePrecision with the
  pycocotools backend) -> ``map``, ``map_50``, ``map_75`` ... and ``mask_map``, ``mask_map_50`` ...

Every figure is a percentage rounded to 4 decimals, as openmae's top-1 accuracy is and as the papers
report mIoU and AP (ViT-B: 48.1 mIoU, 50.3 box AP), so metrics.json reads against them directly.
A figure with nothing to measure (no labelled pixel; no object of a size range) is None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.detection import MeanAveragePrecision

from openmae.dense.data import IGNORE_INDEX


def _percent(value: float | Tensor) -> float | None:
    value = float(value)
    return None if not math.isfinite(value) else round(100.0 * value, 4)


class SegmentationMetrics(MulticlassConfusionMatrix):
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix summed over every batch (and process).

    ``update(preds, target)``: ``preds`` (N, H, W) class ids or (N, K, H, W) scores (argmax taken),
    ``target`` (N, H, W) class ids; pixels where ``target == ignore_index`` are not counted.

    ``compute()`` returns:

    - ``miou``: the mean IoU over the classes with a non-empty union (present in the ground truth or
      predicted somewhere in the evaluation), as mmsegmentation computes it: a class that is
      predicted but never present counts as 0, a class absent from both is left out.
    - ``iou``: {class name: IoU, or None when the class has an empty union}.
    - ``acc``: correctly classified labelled pixels / labelled pixels.
    - ``macc``: mean over the classes present in the ground truth of each class's pixel accuracy.

    Args:
        num_classes: K, background included where the dataset has one.
        class_names: K names (default ``class 0`` ...).
        ignore_index: the target value to skip.
    """

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        # validate_args would run torch.unique over every target: a sort of millions of pixels a batch.
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)
        names = list(class_names) if class_names is not None else [f"class {k}" for k in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.class_names = names

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        confmat = super().compute().double()  # (K, K): row = ground truth, column = prediction
        hits = confmat.diag()
        truth, predicted = confmat.sum(1), confmat.sum(0)
        union = truth + predicted - hits
        iou = hits / union  # NaN where the union is empty
        seen = union > 0
        present = truth > 0
        return {
            "miou": _percent(iou[seen].mean()) if seen.any() else None,
            "acc": _percent(hits.sum() / confmat.sum()) if confmat.sum() > 0 else None,
            "macc": _percent((hits[present] / truth[present]).mean()) if present.any() else None,
            "iou": {name: _percent(v) for name, v in zip(self.class_names, iou.tolist())},
        }


# torchmetrics' key (less its "bbox_" / "segm_" prefix) -> ours; the mask figures get a "mask_" prefix.
_DETECTION_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class DetectionMetrics(MeanAveragePrecision):
    """COCO mAP@[.5:.95] (and at IoU .5 and .75, by object size, recall) for boxes and, optionally, masks.

    ``update(preds, targets)`` takes torchvision detection outputs and targets as they are: lists of
    dicts with ``boxes`` (n, 4) xyxy, ``labels`` (n,), ``scores`` (n,) in predictions, and
    ``masks``: (n, 1, H, W) probabilities from Mask R-CNN (thresholded at ``mask_threshold``) or
    (n, H, W) bool/uint8.

    ``compute()`` returns ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``,
    ``map_large``, ``mar_1``, ``mar_10``, ``mar_100`` for boxes and the same with a ``mask_`` prefix
    for masks (when ``masks``), in percent; with ``class_names`` also ``ap`` (and ``mask_ap``):
    {class name: AP} (needs ``class_metrics``; slower).

    Args:
        masks: also score instance masks (Mask R-CNN).
        class_names: names of label ids 0..K (0 = background, never scored).
        class_metrics: compute per-class AP too.
        mask_threshold: probability above which a predicted mask pixel is foreground.
    """

    def __init__(
        self,
        masks: bool = True,
        class_names: Sequence[str] | None = None,
        class_metrics: bool = False,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__(
            iou_type=("bbox", "segm") if masks else "bbox", backend="pycocotools", class_metrics=class_metrics
        )
        self.with_masks = masks
        self.class_names = list(class_names) if class_names is not None else None
        self.mask_threshold = mask_threshold

    def _prepare(self, entries: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        out = []
        for entry in entries:
            item = {k: v.detach() for k, v in entry.items() if k in ("boxes", "labels", "scores")}
            if self.with_masks:
                if "masks" not in entry:
                    raise ValueError(
                        "mask AP needs instance masks in every prediction and target; for boxes-only data "
                        "(or Faster R-CNN) build DetectionMetrics(masks=False)"
                    )
                m = entry["masks"].detach()
                if m.dim() == 4:  # Mask R-CNN: (n, 1, H, W) probabilities
                    m = m[:, 0]
                item["masks"] = m > self.mask_threshold if m.is_floating_point() else m.bool()
            out.append(item)
        return out

    def update(self, preds: Sequence[dict[str, Tensor]], target: Sequence[dict[str, Tensor]]) -> None:  # type: ignore[override]
        super().update(self._prepare(preds), self._prepare(target))

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        raw = super().compute()
        kinds = [("bbox", ""), ("segm", "mask_")] if self.with_masks else [("bbox", "")]
        out: dict[str, Any] = {}
        for kind, prefix in kinds:
            lead = f"{kind}_" if self.with_masks else ""
            for key in _DETECTION_KEYS:
                value = float(raw[lead + key])
                out[prefix + key] = None if value < 0 else _percent(value)  # torchmetrics: -1 = nothing to score
            per_class = raw.get(lead + "map_per_class")
            if self.class_metrics and per_class is not None and per_class.numel() == len(raw["classes"]):
                names = self.class_names
                out[prefix + "ap"] = {
                    (names[c] if names is not None and c < len(names) else str(c)): None if v < 0 else _percent(v)
                    for c, v in zip(raw["classes"].tolist(), per_class.reshape(-1).tolist())
                }
        return out
