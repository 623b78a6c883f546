"""Dense predictions drawn over their images, saved as PNG grids (torchvision's drawing utilities).

- :func:`save_segmentation_grid`: one row per image: the image, the ground truth over it (when
  given), the prediction over it; each class in its :func:`palette` colour.
- :func:`save_detection_grid`: one row per image: ground-truth instances (when given), then the
  predicted ones above a score threshold: masks, boxes, class names (and scores).

Small images are enlarged (nearest neighbour, by a whole factor) so that labels stay legible.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from openmae.dense.data import IGNORE_INDEX
from openmae.io import atomic_write

DRAW_MIN_SIDE = 192  # images are enlarged by the largest whole factor that keeps them at most about this
GRID_PADDING = 2
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949  # hue step: successive classes land far apart on the colour wheel


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed colour per class id: well-separated hues, alternating in brightness."""
    colours = []
    for k in range(num_classes):
        hue = (k * GOLDEN_RATIO_CONJUGATE) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0 if k % 2 == 0 else 0.75)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return colours


def to_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised (N, C, H, W) float images -> (N, 3, H, W) uint8 (gray repeated to RGB)."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    pixels = (pixels * 255).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def _scale_factor(size: Sequence[int], scale: int | None) -> int:
    return scale if scale is not None else max(1, DRAW_MIN_SIDE // max(size))


def _enlarge(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour enlargement of the last two dimensions."""
    return x if factor == 1 else x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def overlay_classes(
    image: Tensor, mask: Tensor, num_classes: int, skip: Sequence[int] = (), alpha: float = 0.5
) -> Tensor:
    """Colour each class of ``mask`` (H, W) over ``image`` (3, H, W) uint8; ``skip`` ids (and ids
    outside 0..num_classes-1, such as the ignore index) are left undrawn."""
    ids = [k for k in mask.unique().tolist() if 0 <= k < num_classes and k not in skip]
    if not ids:
        return image
    colours = palette(num_classes)
    masks = torch.stack([mask == k for k in ids])  # (n, H, W)
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[colours[k] for k in ids])


def draw_instances(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    scores: Tensor | None = None,
    masks: Tensor | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """Instances over ``image`` (3, H, W) uint8: masks (n, H, W) bool, then boxes (n, 4) xyxy
    captioned with the class name (and score), in the class's palette colour."""
    if boxes.shape[0] == 0:
        return image
    colours = palette(len(class_names))
    ids = labels.tolist()
    colour = [colours[k] if 0 <= k < len(colours) else (255, 255, 255) for k in ids]
    if masks is not None and masks.shape[0]:
        image = draw_segmentation_masks(image, masks.bool(), alpha=alpha, colors=colour)
    names = [class_names[k] if 0 <= k < len(class_names) else str(k) for k in ids]
    if scores is not None:
        names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
    return draw_bounding_boxes(image, boxes, labels=names, colors=colour, width=1, fill_labels=True)


def _save_grid(path: str | os.PathLike, panels: list[Tensor], columns: int) -> Path:
    grid = make_grid(panels, nrow=columns, padding=GRID_PADDING, pad_value=255)  # (3, H', W') uint8
    path = Path(path)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def save_segmentation_grid(
    path: str | os.PathLike,
    images: Tensor,
    predictions: Tensor,
    targets: Tensor | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    max_images: int = 8,
    scale: int | None = None,
    alpha: float = 0.5,
) -> Path:
    """Write a PNG: per image (a row) the image, its ground truth (if ``targets``) and the prediction.

    A class named "background" is left undrawn, and so are ignored pixels.

    Args:
        path: the PNG to write (atomically).
        images: (N, C, H, W) normalised float images.
        predictions: (N, H, W) class ids or (N, K, H, W) scores.
        targets: (N, H, W) class ids, ``IGNORE_INDEX`` = unlabelled.
        mean, std: the images' normalisation.
        class_names: K names, index = class id.
        max_images: draw at most this many rows.
        scale: enlargement factor; default the largest whole factor keeping a side near ``DRAW_MIN_SIDE`` px.
        alpha: opacity of the class colours.

    Returns the path. The PNG is ``columns * (W * scale + 2) + 2`` px wide and ``rows * (H * scale + 2)
    + 2`` high, with 2 columns, or 3 with ``targets``.
    """
    n = min(max_images, images.shape[0])
    if predictions.dim() == 4:
        predictions = predictions.argmax(1)
    factor = _scale_factor(images.shape[-2:], scale)
    pixels = _enlarge(to_uint8(images[:n], mean, std), factor)
    skip = [k for k, name in enumerate(class_names) if name == "background"] + [IGNORE_INDEX]
    panels = []
    for i in range(n):
        panels.append(pixels[i])
        if targets is not None:
            panels.append(overlay_classes(pixels[i], _enlarge(targets[i].cpu(), factor), len(class_names), skip, alpha))
        panels.append(overlay_classes(pixels[i], _enlarge(predictions[i].cpu(), factor), len(class_names), skip, alpha))
    return _save_grid(path, panels, 3 if targets is not None else 2)


def _instances(entry: dict[str, Tensor], factor: int, threshold: float | None) -> dict[str, Tensor]:
    """One image's instances on the CPU, enlarged, masks as bool, those under the score threshold dropped."""
    keep = torch.ones(entry["boxes"].shape[0], dtype=torch.bool)
    if threshold is not None and "scores" in entry:
        keep = entry["scores"].detach().cpu() >= threshold
    out = {
        "boxes": entry["boxes"].detach().cpu().float()[keep] * factor,
        "labels": entry["labels"].detach().cpu()[keep],
        "scores": entry["scores"].detach().cpu()[keep] if "scores" in entry else None,
        "masks": None,
    }
    if "masks" in entry:
        masks = entry["masks"].detach().cpu()[keep]
        if masks.dim() == 4:  # Mask R-CNN: (n, 1, H, W) probabilities
            masks = masks[:, 0]
        masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
        out["masks"] = _enlarge(masks, factor)
    return out


def save_detection_grid(
    path: str | os.PathLike,
    images: Tensor,
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]] | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    max_images: int = 8,
    scale: int | None = None,
) -> Path:
    """Write a PNG: per image (a row) its ground-truth instances (if ``targets``) and the predicted
    ones scoring at least ``score_threshold``.

    Args:
        path: the PNG to write (atomically).
        images: (N, C, H, W) normalised float images.
        predictions: torchvision detector outputs (``boxes``, ``labels``, ``scores``, optional ``masks``).
        targets: torchvision detection targets (``boxes``, ``labels``, optional ``masks``).
        mean, std: the images' normalisation.
        class_names: names of label ids (0 = background).
        score_threshold: the lowest score drawn.
        max_images: draw at most this many rows.
        scale: enlargement factor (see :func:`save_segmentation_grid`).
    """
    n = min(max_images, images.shape[0])
    factor = _scale_factor(images.shape[-2:], scale)
    pixels = _enlarge(to_uint8(images[:n], mean, std), factor)
    panels = []
    for i in range(n):
        if targets is not None:
            gt = _instances(targets[i], factor, None)
            panels.append(draw_instances(pixels[i], gt["boxes"], gt["labels"], class_names, masks=gt["masks"]))
        pred = _instances(predictions[i], factor, score_threshold)
        panels.append(
            draw_instances(pixels[i], pred["boxes"], pred["labels"], class_names, pred["scores"], pred["masks"])
        )
    return _save_grid(path, panels, 2 if targets is not None else 1)
