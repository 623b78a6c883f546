"""Dense-prediction data: three sources, paired transforms, one dataset, two collates.

Sources (each ``load(index)`` gives a :class:`RawSample` of uint8 pixels and exact annotations):

- :class:`FashionScenes` (``fashion-scenes``): built in, no download. Canvases of 1-4 Fashion-MNIST
  items from the matching split (train scenes from train images, val scenes from t10k), each
  scene a pure function of (scene seed, split, index); class mask, instance masks, boxes, labels.
- :class:`CocoDetection` (``coco``): an images folder and a COCO instances JSON.
- :class:`ADE20KSegmentation` (``ade20k``): ADE20K's layout, images and same-named PNG label maps.

Conventions:

- Semantic masks hold one class per pixel; ``IGNORE_INDEX`` (255) marks pixels that neither the
  loss nor the metrics count (padding, ADE20K's "other").
- Class 0 is "background" in fashion-scenes and COCO, as torchvision's detectors expect; objects
  are 1..K. ADE20K's 150 classes are 0..149 once its "other" is ignored (``reduce_zero_label``).
- Boxes are float ``(x1, y1, x2, y2)`` in pixels, continuous coordinates as in COCO: a mask that
  covers columns 3..5 has ``x1 = 3`` and ``x2 = 6``. Where a sample has instance masks, its boxes
  are the masks' tight boxes after every transform, so boxes, masks and labels always agree.
- Determinism, as in openmae.data: sample ``i`` of epoch ``e`` is transformed under a CPU RNG seeded
  from ``(seed, e, i)``; a scene's content depends on its own (fixed) scene seed, not the run's,
  so every run is evaluated on the same val scenes.

Bad annotations raise ``ValueError`` naming the file and the entry: the JSON's structure, boxes and
category ids when a :class:`CocoDetection` is built; pixel-level problems (a label map's size, its
class ids, an image whose size differs from its JSON entry) when the sample is loaded. Missing
files raise ``FileNotFoundError`` when the source is built. An image that cannot be decoded does not
stop training: as in openmae.data its sample comes back with image ``None`` and the collate
functions drop it and list its index in ``failed``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from openmae import data as image_data
from openmae.data import DATASET_NORMALIZATION, FASHION_MNIST_CLASSES, Batch, find_images, load_image, sample_seed
from openmae.patches import to_2tuple

Task = Literal["segment", "detect"]
TASKS = ("segment", "detect")
DENSE_DATASETS = ("fashion-scenes", "coco", "ade20k")
DATASET_TASKS = {"fashion-scenes": ("segment", "detect"), "coco": ("detect",), "ade20k": ("segment",)}
SPLITS = ("train", "val")
IGNORE_INDEX = 255

FASHION_SCENES_CLASSES = ["background", *FASHION_MNIST_CLASSES]  # mask value k = Fashion-MNIST label k - 1
FASHION_SCENES_LENGTH = {"train": 10000, "val": 2000}
FASHION_SCENES_SEED = 0  # fixed: the scenes must not move with the run seed
# Seeds of the scene draws (openmae.data.sample_seed streams 0 and 1 are a sample's transform and mask).
FASHION_SCENES_STREAM = {"train": 2, "val": 3}
# An item pixel is foreground where its resized intensity exceeds this (Fashion-MNIST items sit on black).
FASHION_SCENES_THRESHOLD = 24
# An item that later items cover so much that less than MIN_VISIBLE_FRACTION of its pixels, or fewer
# than MIN_VISIBLE_PIXELS, stay visible is left out of the scene (not drawn): a sliver is no object.
MIN_VISIBLE_FRACTION = 0.2
MIN_VISIBLE_PIXELS = 8

# A COCO box may overhang its image by this many pixels (rounding in the tools that wrote it); it is clipped.
COCO_BOX_TOLERANCE = 1.0
ADE20K_NUM_CLASSES = 150


def _split(split: str) -> str:
    """ "train" or "val"; "test" (openmae's name for the held-out split) means "val"."""
    if split == "test":
        return "val"
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


class RawSample(NamedTuple):
    """One untransformed sample: pixels and whatever annotations its source has (None: it has none)."""

    image: Tensor | None  # (C, H, W) uint8; None when the file cannot be decoded
    semantic: Tensor | None = None  # (H, W) int64 class per pixel, IGNORE_INDEX = unlabelled
    boxes: Tensor | None = None  # (N, 4) float32 xyxy pixels
    labels: Tensor | None = None  # (N,) int64 in 1..K
    masks: Tensor | None = None  # (N, H, W) bool


class DenseSource(Protocol):
    """What :class:`DenseDataset` needs of a source."""

    tasks: tuple[str, ...]  # which of TASKS its annotations serve
    classes: list[str]  # index = class id
    channels: int
    mean: tuple[float, ...]  # default normalisation, per channel
    std: tuple[float, ...]
    paths: list[str] | None  # image files (for bad-image reports), None for in-memory sources

    def __len__(self) -> int: ...

    def load(self, index: int) -> RawSample: ...


def mask_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) bool, none empty -> (N, 4) float32 tight xyxy boxes, x2 and y2 one past the last pixel."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    boxes = masks_to_boxes(masks.bool()).float()  # x2, y2 = last covered column and row
    boxes[:, 2:] += 1
    return boxes


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Stored-channel statistics for ``channels`` channels: one value repeated, or RGB averaged to gray."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"need 1 or {channels} normalisation values (one per channel), got {list(values)}")


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return channels


# -- fashion-scenes ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _fashion_items(path: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's (N, 28, 28) uint8 images and (N,) labels of one split, read once per process."""
    source = image_data._fashion_mnist(path, "train" if split == "train" else "test", None)
    images, labels = source.images, source.labels
    images.flags.writeable = False  # shared by every scene dataset of this process
    labels.flags.writeable = False
    return images, labels


class FashionScenes:
    """Scenes of 1-4 Fashion-MNIST items on a black canvas, with exact per-pixel annotations.

    Scene ``i`` is a pure function of ``(seed, split, i)``: the number of items, which items (drawn
    from the split's own Fashion-MNIST images: train scenes from train, val scenes from t10k), their
    sizes (a fraction ``item_scale`` of the canvas's shorter side, square, bilinear) and positions.
    Items are drawn in order, so later ones occlude earlier ones. An item's pixels are those where
    its resized intensity exceeds ``threshold``; only those are painted, so the image, the class mask
    and the instance masks agree exactly. An item left with less than ``MIN_VISIBLE_FRACTION`` of
    its pixels (or fewer than ``MIN_VISIBLE_PIXELS``) visible is left out of the scene altogether.

    Class mask values: 0 = background, k = Fashion-MNIST class k - 1 (``classes[k]``: 1 "T-shirt/top"
    ... 10 "Ankle boot"). Instance labels use the same ids (1..10).

    Args:
        split: "train" or "val" ("test" means "val").
        length: number of scenes; default 10000 (train) or 2000 (val).
        size: canvas (H, W) or side in pixels.
        channels: 1, or 3 (the gray repeated).
        seed: the scene seed (``FASHION_SCENES_SEED`` by default; not the run seed).
        items: (fewest, most) items per scene.
        item_scale: (smallest, largest) item side as a fraction of the canvas's shorter side
            (16-40 px on the default 64 px canvas).
        threshold: uint8 intensity above which an item pixel is foreground.
        path: a folder of Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist).
        source: ``(images, labels)`` to draw items from instead of Fashion-MNIST: (M, h, w) uint8
            arrays on black and (M,) int labels in 0..len(item_classes)-1.
        item_classes: the items' class names (Fashion-MNIST's by default).
    """

    tasks = TASKS

    def __init__(
        self,
        split: str = "train",
        *,
        length: int | None = None,
        size: int | tuple[int, int] = 64,
        channels: int = 1,
        seed: int = FASHION_SCENES_SEED,
        items: tuple[int, int] = (1, 4),
        item_scale: tuple[float, float] = (0.25, 0.625),
        threshold: int = FASHION_SCENES_THRESHOLD,
        path: str | os.PathLike | None = None,
        source: tuple[np.ndarray, np.ndarray] | None = None,
        item_classes: Sequence[str] = FASHION_MNIST_CLASSES,
    ) -> None:
        self.split = _split(split)
        self.size = to_2tuple(size)
        self.channels = _check_channels(channels)
        self.length = FASHION_SCENES_LENGTH[self.split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"fashion-scenes needs at least one scene, got length {self.length}")
        if min(self.size) < 4:
            raise ValueError(f"fashion-scenes canvas must be at least 4 px a side, got {self.size}")
        if not 1 <= items[0] <= items[1]:
            raise ValueError(f"items must be (fewest, most) with 1 <= fewest <= most, got {items}")
        if not 0 < item_scale[0] <= item_scale[1] <= 1:
            raise ValueError(f"item_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {item_scale}")
        self.seed, self.items, self.item_scale, self.threshold = seed, tuple(items), tuple(item_scale), threshold
        if source is None:
            self.item_images, self.item_labels = _fashion_items(None if path is None else str(path), self.split)
        else:
            self.item_images, self.item_labels = np.asarray(source[0]), np.asarray(source[1]).astype(np.int64)
            if self.item_images.dtype != np.uint8 or self.item_images.ndim != 3 or len(self.item_images) == 0:
                raise ValueError(
                    f"source images must be a non-empty (M, h, w) uint8 array, got {self.item_images.dtype} {self.item_images.shape}"
                )
            if len(self.item_labels) != len(self.item_images):
                raise ValueError(f"{len(self.item_labels)} source labels for {len(self.item_images)} images")
            if self.item_labels.min() < 0 or self.item_labels.max() >= len(item_classes):
                raise ValueError(f"source labels must lie in 0..{len(item_classes) - 1} (one per item class)")
        self.classes = ["background", *item_classes]
        mean, std = DATASET_NORMALIZATION["fashion-mnist"]  # the pretraining runs' statistics
        self.mean, self.std = _per_channel(mean, channels), _per_channel(std, channels)
        self.paths = None

    def __len__(self) -> int:
        return self.length

    def _item(self, index: int, side: int) -> Tensor:
        """Item ``index`` resized to (side, side), uint8."""
        item = torch.from_numpy(self.item_images[index].astype(np.float32))[None, None]  # (1, 1, h, w)
        resized = F.interpolate(item, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return resized[0, 0].round().clamp(0, 255).to(torch.uint8)

    def load(self, index: int) -> RawSample:
        """Scene ``index``: image (C, H, W) uint8, class mask, and N instances (masks, tight boxes, labels)."""
        if not 0 <= index < self.length:
            raise IndexError(f"scene {index} of {self.length}")
        rng = np.random.default_rng(sample_seed(self.seed, 0, index, stream=FASHION_SCENES_STREAM[self.split]))
        h, w = self.size
        short = min(h, w)
        lo = max(2, round(self.item_scale[0] * short))
        hi = max(lo, round(self.item_scale[1] * short))
        placed = []  # (pixels (s, s) uint8, foreground (s, s) bool, top, left, label)
        for _ in range(int(rng.integers(self.items[0], self.items[1] + 1))):
            k = int(rng.integers(len(self.item_images)))
            side = int(rng.integers(lo, hi + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            pixels = self._item(k, side)
            placed.append((pixels, pixels > self.threshold, top, left, int(self.item_labels[k]) + 1))

        def owners(kept: list[int]) -> Tensor:
            """(H, W) int64: which placed item shows at each pixel, -1 = background."""
            owner = torch.full((h, w), -1, dtype=torch.int64)
            for i in kept:
                _, fg, top, left, _ = placed[i]
                owner[top : top + fg.shape[0], left : left + fg.shape[1]][fg] = i
            return owner

        kept = list(range(len(placed)))
        owner = owners(kept)
        visible = [int((owner == i).sum()) for i in kept]
        # Removing an item only uncovers others, so one pass leaves every kept item visible enough.
        kept = [
            i for i in kept if visible[i] >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * int(placed[i][1].sum()))
        ]
        owner = owners(kept)
        image = torch.zeros(h, w, dtype=torch.uint8)
        semantic = torch.zeros(h, w, dtype=torch.int64)
        for i in kept:
            pixels, _, top, left, label = placed[i]
            layer = torch.zeros(h, w, dtype=torch.uint8)
            layer[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
            mine = owner == i
            image[mine] = layer[mine]
            semantic[mine] = label
        masks = torch.stack([owner == i for i in kept]) if kept else torch.zeros(0, h, w, dtype=torch.bool)
        labels = torch.tensor([placed[i][4] for i in kept], dtype=torch.int64)
        return RawSample(image[None].expand(self.channels, h, w).clone(), semantic, mask_boxes(masks), labels, masks)


# -- COCO --------------------------------------------------------------------------------------


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(images folder, instances JSON) of a split: ROOT/train + ROOT/annotations/instances_train.json
    (val likewise), or COCO's own names ROOT/train2017 + ROOT/annotations/instances_train2017.json."""
    root, split = Path(root), _split(split)
    for name in (split, f"{split}2017"):
        images, annotations = root / name, root / "annotations" / f"instances_{name}.json"
        if images.is_dir() and annotations.is_file():
            return images, annotations
    raise FileNotFoundError(
        f"no COCO {split} split under {root}: expected the images in {root / split}/ and their annotations in "
        f"{root / 'annotations' / f'instances_{split}.json'} (or COCO's names {split}2017/ and "
        f"instances_{split}2017.json); lay the folder out so, or pass both paths to CocoDetection(images_dir, annotation_file)"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); a COCO instances file is one JSON object") from None


@dataclass
class _CocoImage:
    entry: str  # "images[i] (id N)", for messages
    path: Path
    width: int
    height: int
    boxes: list[list[float]] = dataclasses.field(default_factory=list)  # xyxy, clipped to the image
    labels: list[int] = dataclasses.field(default_factory=list)  # 1..K
    segmentations: list[Any] = dataclasses.field(default_factory=list)  # polygons, RLE or None
    entries: list[str] = dataclasses.field(default_factory=list)  # "annotations[j] (id N)" per box


class CocoDetection:
    """Detection and instance segmentation from a COCO instances JSON and its images folder.

    Category ids become contiguous labels 1..K in increasing id order (``category_ids[k - 1]`` is
    label k's COCO id; ``classes[k]`` its name; ``classes[0]`` = "background"). Crowd annotations
    (``iscrowd: 1``) are skipped. Images without annotations are kept (they teach "nothing here").
    Segmentations may be polygons, RLE or compressed RLE; ``has_masks`` is True when every kept
    annotation has one (then samples carry instance masks for Mask R-CNN), else samples carry boxes only.

    The JSON is checked when the dataset is built (structure, ids, boxes inside their images, the
    segmentation formats, every referenced image file present); decoded pixels when a sample is loaded.

    Args:
        images_dir: the folder the JSON's ``file_name`` entries are relative to.
        annotation_file: the instances JSON.
        channels: 3 (RGB) or 1 (gray).
        limit: keep only the first ``limit`` images of the JSON.
    """

    tasks = ("detect",)

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        *,
        channels: int = 3,
        limit: int | None = None,
    ) -> None:
        self.images_dir, self.annotation_file = Path(images_dir), Path(annotation_file)
        self.channels = _check_channels(channels)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.annotation_file} not found; pass the instances JSON")
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"COCO images folder {self.images_dir} not found; pass the folder of the JSON's images"
            )
        doc = _read_json(self.annotation_file)
        self._check_sections(doc)
        names = self._read_categories(doc["categories"])
        self.category_ids = sorted(names)
        self.classes = ["background", *(names[i] for i in self.category_ids)]
        records = self._read_images(doc["images"])
        self._read_annotations(doc["annotations"], records, {cid: k + 1 for k, cid in enumerate(self.category_ids)})
        self.records = list(records.values())[:limit]
        segs = [s for r in self.records for s in r.segmentations]
        self.has_masks = bool(segs) and all(s is not None for s in segs)
        missing = [r.path for r in self.records if not r.path.is_file()]
        if missing:
            listing = ", ".join(str(p) for p in missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.annotation_file} are missing: {listing}; the JSON's file_name "
                f"entries are read relative to {self.images_dir}, so point the images folder at where they are"
            )
        self.paths = [str(r.path) for r in self.records]
        mean, std = DATASET_NORMALIZATION["folder"]
        self.mean, self.std = _per_channel(mean, channels), _per_channel(std, channels)

    def _fail(self, entry: str, problem: str, fix: str) -> ValueError:
        return ValueError(f"{self.annotation_file}: {entry} {problem}; {fix}")

    def _check_sections(self, doc: Any) -> None:
        expected = '"images", "annotations" and "categories" lists, as COCO\'s tools write them'
        if not isinstance(doc, dict):
            raise ValueError(
                f"{self.annotation_file} is not a COCO instances file: its top level is a JSON "
                f"{type(doc).__name__}, not an object; it needs {expected}"
            )
        missing = [k for k in ("images", "annotations", "categories") if k not in doc]
        if missing:
            raise ValueError(
                f"{self.annotation_file} is not a COCO instances file: no {', '.join(repr(k) for k in missing)} "
                f"(its keys: {', '.join(sorted(map(str, doc))[:8]) or 'none'}); it needs {expected}"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc[key], list):
                raise ValueError(
                    f"{self.annotation_file}: {key!r} is a JSON {type(doc[key]).__name__}, not a list; it needs {expected}"
                )

    def _read_categories(self, categories: list) -> dict[int, str]:
        names: dict[int, str] = {}
        for i, cat in enumerate(categories):
            entry = f"categories[{i}]"
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise self._fail(
                    entry, f'= {_short(cat)} has no integer "id"', 'give each category an integer "id" and a "name"'
                )
            if cat["id"] in names:
                raise self._fail(entry, f"repeats category id {cat['id']}", "category ids must be unique")
            names[cat["id"]] = str(cat.get("name", f"category {cat['id']}"))
        if not names:
            raise ValueError(
                f"{self.annotation_file} lists no categories; a detection dataset needs at least one class"
            )
        return names

    def _read_images(self, images: list) -> dict[int, _CocoImage]:
        records: dict[int, _CocoImage] = {}
        for i, im in enumerate(images):
            entry = f"images[{i}]" + (f" (id {im['id']})" if isinstance(im, dict) and "id" in im else "")
            if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
                raise self._fail(entry, f'= {_short(im)} lacks an integer "id" or a "file_name"', "fix the entry")
            if not (_is_int(im.get("width")) and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0):
                raise self._fail(
                    entry,
                    f"({im['file_name']}) has width {im.get('width')!r} and height {im.get('height')!r}",
                    "give its size in pixels as positive integers",
                )
            if im["id"] in records:
                raise self._fail(entry, f"repeats image id {im['id']}", "image ids must be unique")
            records[im["id"]] = _CocoImage(entry, self.images_dir / im["file_name"], im["width"], im["height"])
        return records

    def _read_annotations(self, annotations: list, records: dict[int, _CocoImage], label_of: dict[int, int]) -> None:
        for j, ann in enumerate(annotations):
            entry = f"annotations[{j}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
            if not isinstance(ann, dict):
                raise self._fail(entry, f"= {_short(ann)} is not an object", "each annotation is a JSON object")
            if ann.get("iscrowd", 0):
                continue  # a crowd region is not an instance to detect
            record = records.get(ann.get("image_id"))
            if record is None:
                raise self._fail(
                    entry,
                    f'refers to image_id {ann.get("image_id")!r}, which "images" does not list',
                    "fix its image_id or add the image",
                )
            category = ann.get("category_id")
            if category not in label_of:
                known = ", ".join(map(str, list(label_of)[:10])) + (" ..." if len(label_of) > 10 else "")
                raise self._fail(
                    entry,
                    f'has category_id {category!r}, which is not in "categories" (ids {known})',
                    "fix its category_id or add the category",
                )
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
                raise self._fail(entry, f"has bbox {_short(box)}", "a COCO bbox is [x, y, width, height] in pixels")
            x, y, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0:
                raise self._fail(
                    entry, f"has box {box} (x, y, width, height) of non-positive size", "fix or remove the entry"
                )
            tol = COCO_BOX_TOLERANCE
            if x < -tol or y < -tol or x + w > record.width + tol or y + h > record.height + tol:
                raise self._fail(
                    entry,
                    f"has box {box} (x, y, width, height) outside its image {record.path.name} "
                    f"({record.width}x{record.height} px)",
                    "fix the box, or the image's width and height",
                )
            record.boxes.append([max(x, 0.0), max(y, 0.0), min(x + w, record.width), min(y + h, record.height)])
            record.labels.append(label_of[category])
            record.segmentations.append(self._check_segmentation(ann.get("segmentation"), entry, record))
            record.entries.append(entry)

    def _check_segmentation(self, seg: Any, entry: str, record: _CocoImage) -> Any:
        if seg is None or seg == [] or seg == {}:
            return None
        if isinstance(seg, list):
            if all(
                isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p) for p in seg
            ):
                return seg
            raise self._fail(
                entry,
                f"has segmentation {_short(seg)}",
                "a polygon is a list of [x1, y1, x2, y2, ...] with at least 3 points",
            )
        if isinstance(seg, dict) and isinstance(seg.get("counts"), (list, str)) and "size" in seg:
            if list(seg["size"]) != [record.height, record.width]:
                raise self._fail(
                    entry,
                    f"has an RLE segmentation of size {seg['size']} for a {record.height}x{record.width} image "
                    f"({record.path.name})",
                    "RLE size is [height, width] of the image",
                )
            return seg
        raise self._fail(
            entry, f"has segmentation {_short(seg)}", 'use polygons or RLE ({"counts": ..., "size": [h, w]})'
        )

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> RawSample:
        """Image ``index`` with its boxes, labels and (when ``has_masks``) instance masks."""
        from pycocotools import mask as mask_utils

        record = self.records[index]
        image = load_image(record.path, self.channels)
        if image is None:
            return RawSample(None)
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise ValueError(
                f"{record.path} is {image.shape[-1]}x{image.shape[-2]} px but {self.annotation_file} ({record.entry}) "
                f"gives {record.width}x{record.height}; fix the entry's width and height"
            )
        boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(record.labels, dtype=torch.int64)
        if not self.has_masks:
            return RawSample(image, boxes=boxes, labels=labels)
        masks = torch.zeros(len(labels), record.height, record.width, dtype=torch.bool)
        for k, (seg, entry) in enumerate(zip(record.segmentations, record.entries)):
            try:
                if isinstance(seg, list):  # polygons: one RLE each, merged
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, record.height, record.width))
                elif isinstance(seg["counts"], list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, record.height, record.width)
                else:
                    rle = seg
                masks[k] = torch.from_numpy(mask_utils.decode(rle).astype(bool))
            except (ValueError, TypeError) as e:
                raise self._fail(
                    entry, f"has a segmentation pycocotools cannot decode ({e})", "re-export the mask"
                ) from None
        return RawSample(image, boxes=boxes, labels=labels, masks=masks)


# -- ADE20K layout -----------------------------------------------------------------------------


def ade20k_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(images folder, label-map folder) of a split: ROOT/images/training and ROOT/annotations/training
    for train, .../validation for val (ADEChallengeData2016's layout)."""
    root, split = Path(root), _split(split)
    name = "training" if split == "train" else "validation"
    images, labels = root / "images" / name, root / "annotations" / name
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} not found: an ADE20K-layout dataset keeps images in ROOT/images/{{training,validation}} and "
                "same-named PNG label maps in ROOT/annotations/{training,validation}; lay the folder out so"
            )
    return images, labels


def ade20k_classes(root: str | os.PathLike, reduce_zero_label: bool = True) -> list[str]:
    """Class names, index = the class id a model predicts.

    From ROOT/classes.txt (one name per line, in that order) if present; else ADEChallengeData2016's
    ROOT/objectInfo150.txt (tab-separated, a header, the name last; first synonym kept); else
    ``class 1`` ... ``class 150``. Without ``reduce_zero_label`` label 0 ("other") is a class too and
    comes first when the names are ADE's own.
    """
    root = Path(root)
    listed = root / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{listed} lists no class names; write one name per line, in class-id order")
        return names
    info = root / "objectInfo150.txt"
    if info.is_file():
        names = []
        for n, line in enumerate(info.read_text().splitlines()[1:], start=2):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or not fields[0].strip().isdigit():
                raise ValueError(
                    f"{info} line {n}: expected 'Idx<TAB>...<TAB>Name', got {line!r}; fix or delete the file"
                )
            names.append(re.split("[;,]", fields[-1])[0].strip())
    else:
        names = [f"class {k}" for k in range(1, ADE20K_NUM_CLASSES + 1)]
    return names if reduce_zero_label else ["other", *names]


class ADE20KSegmentation:
    """Semantic segmentation from images and same-named PNG label maps (ADE20K's layout).

    Label maps hold one class index per pixel (PNG mode L, P or I). With ``reduce_zero_label``
    (the default, ADE20K's benchmark convention) 0 means "other" and is ignored (-> 255) and class k
    in 1..K becomes k - 1, so a model predicts K classes; 255 stays ignored. Without it the values
    are the classes themselves (0..K-1), 255 ignored. Any other value is an error naming the file.

    Args:
        images_dir: the images (searched recursively).
        annotations_dir: the label maps, at the same relative path with a .png suffix.
        classes: names of the K classes a model predicts (see :func:`ade20k_classes`); default ADE's 150.
        reduce_zero_label: ignore 0 and shift the others down by one.
        channels: 3 (RGB) or 1 (gray).
        limit: keep only the first ``limit`` images (sorted by path).
    """

    tasks = ("segment",)

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_dir: str | os.PathLike,
        *,
        classes: Sequence[str] | None = None,
        reduce_zero_label: bool = True,
        channels: int = 3,
        limit: int | None = None,
    ) -> None:
        self.images_dir, self.annotations_dir = Path(images_dir), Path(annotations_dir)
        for folder in (self.images_dir, self.annotations_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found or not a folder; pass the images and label-map folders")
        self.channels = _check_channels(channels)
        self.reduce_zero_label = reduce_zero_label
        if classes is None:
            classes = [f"class {k}" for k in range(1, ADE20K_NUM_CLASSES + 1)]
            classes = classes if reduce_zero_label else ["other", *classes]
        self.classes = list(classes)
        if not 0 < len(self.classes) < IGNORE_INDEX:
            raise ValueError(f"need 1 to {IGNORE_INDEX - 1} classes (255 is the ignore index), got {len(self.classes)}")
        images = find_images(self.images_dir)[:limit]
        if not images:
            raise FileNotFoundError(f"no images under {self.images_dir}")
        self.label_paths = [self.annotations_dir / p.relative_to(self.images_dir).with_suffix(".png") for p in images]
        missing = [(i, p) for i, p in zip(images, self.label_paths) if not p.is_file()]
        if missing:
            listing = ", ".join(f"{p}" for _, p in missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} images under {self.images_dir} have no label map: {listing} "
                f"(first: {missing[0][0]}); give each image a same-named PNG under {self.annotations_dir}, or remove it"
            )
        self.paths = [str(p) for p in images]
        mean, std = DATASET_NORMALIZATION["folder"]
        self.mean, self.std = _per_channel(mean, channels), _per_channel(std, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def read_label_map(self, index: int, size: tuple[int, int]) -> Tensor:
        """Label map ``index`` as (H, W) int64 class ids (``IGNORE_INDEX`` = ignored), checked against
        its image's (H, W) ``size``."""
        path = self.label_paths[index]
        try:
            with Image.open(path) as im:
                im.load()
                mode, values = im.mode, np.array(im)
        except Exception as e:  # decoders raise OSError, ValueError, SyntaxError ...
            raise ValueError(
                f"label map {path} cannot be read ({type(e).__name__}: {e}); re-save it as a PNG"
            ) from None
        if values.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"label map {path} is an image of mode {mode}; label maps hold one class index per pixel (PNG mode L or P), "
                "so convert colour-coded maps to indices"
            )
        if values.shape != tuple(size):
            raise ValueError(
                f"label map {path} is {values.shape[1]}x{values.shape[0]} px but its image {self.paths[index]} is "
                f"{size[1]}x{size[0]}; a label map must match its image pixel for pixel"
            )
        values = values.astype(np.int64)
        num = len(self.classes)
        top = num if self.reduce_zero_label else num - 1  # the largest valid stored value
        bad = np.unique(values[((values < 0) | (values > top)) & (values != IGNORE_INDEX)])
        if bad.size:
            shown = ", ".join(map(str, bad[:5].tolist())) + (" ..." if bad.size > 5 else "")
            raise ValueError(
                f"label map {path} holds class id(s) {shown} outside 0..{top} ({num} classes"
                f"{', 0 = other' if self.reduce_zero_label else ''}; {IGNORE_INDEX} = ignored); "
                "fix the map or give the dataset its full class list (ROOT/classes.txt)"
            )
        if self.reduce_zero_label:
            values = np.where((values == 0) | (values == IGNORE_INDEX), IGNORE_INDEX, values - 1)
        return torch.from_numpy(values)

    def load(self, index: int) -> RawSample:
        """Image ``index`` and its class mask."""
        image = load_image(self.paths[index], self.channels)
        if image is None:
            return RawSample(None)
        return RawSample(image, semantic=self.read_label_map(index, tuple(image.shape[-2:])))


# -- paired transforms -------------------------------------------------------------------------


class ResizePad(v2.Transform):
    """Resize to fit inside ``size`` (aspect kept), then pad the bottom and right up to ``size``.

    Args:
        size: (H, W) or side of the output.
        fill: padding value per tv_tensor type, e.g. ``{tv_tensors.Image: 0, tv_tensors.Mask: 255}``.
    """

    def __init__(self, size: int | tuple[int, int], fill: dict[type, int]) -> None:
        super().__init__()
        self.size = to_2tuple(size)
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        (h, w), (th, tw) = image.shape[-2:], self.size
        scale = min(th / h, tw / w)
        new = (min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale))))
        return {"resized": list(new), "padding": [0, 0, tw - new[1], th - new[0]]}  # left, top, right, bottom

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = next((v for t, v in self.fill.items() if isinstance(inpt, t)), 0)
        out = v2.functional.resize(inpt, params["resized"], antialias=True)
        return v2.functional.pad(out, params["padding"], fill=fill)


class PairedTransform:
    """A :class:`RawSample` -> model inputs, image and annotations moved together (torchvision v2).

    Training: scale jitter (resize so the image fits ``size``, times a factor drawn from
    ``scale_range``: large-scale jitter as in ViTDet), a random crop of ``size`` (padded where the
    image is smaller: zeros in the image, ``IGNORE_INDEX`` in a class mask, 0 in instance masks) and
    a horizontal flip with probability ``hflip``. Evaluation: :class:`ResizePad` to ``size``.
    Then the image becomes float and is normalised.

    Detection samples keep the instances that still show after the crop (a non-empty mask, or a box
    of at least 1 px when there are no masks); where there are masks the boxes are their tight boxes.

    Args:
        task: "segment" -> ``(image (C, H, W) float, mask (H, W) int64)``; "detect" -> ``(image,
            {"boxes": (N, 4) float32 xyxy, "labels": (N,) int64, "masks": (N, H, W) uint8})``, masks
            only when the sample has them (torchvision's detection target format).
        size: output (H, W) or side.
        train: the random recipe, else the deterministic evaluation resize.
        mean, std: per-channel normalisation.
        scale_range: the jitter factors.
        hflip: flip probability.
    """

    def __init__(
        self,
        task: Task,
        size: int | tuple[int, int],
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range}")
        self.task, self.size, self.train = task, to_2tuple(size), train
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX if task == "segment" else 0}
        if train:
            steps: list[Any] = [
                v2.ScaleJitter(self.size, scale_range=tuple(scale_range), antialias=True),
                v2.RandomCrop(self.size, pad_if_needed=True, fill=fill),
                v2.RandomHorizontalFlip(hflip),
            ]
        else:
            steps = [ResizePad(self.size, fill)]
        self.geometry = v2.Compose(steps)

    def __call__(self, raw: RawSample) -> tuple[Tensor, Any]:
        image = tv_tensors.Image(raw.image)
        if self.task == "segment":
            if raw.semantic is None:
                raise ValueError("this sample has no class mask, so it cannot serve segmentation")
            image, mask = self.geometry(image, tv_tensors.Mask(raw.semantic))
            return self._normalise(image), mask.as_subclass(Tensor).long()
        if raw.boxes is None:
            raise ValueError("this sample has no boxes, so it cannot serve detection")
        h, w = raw.image.shape[-2:]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(raw.boxes, format="XYXY", canvas_size=(h, w)),
            "labels": raw.labels,
        }
        if raw.masks is not None:
            target["masks"] = tv_tensors.Mask(raw.masks.to(torch.uint8))  # resize/pad need a numeric dtype
        image, target = self.geometry(image, target)
        out_h, out_w = image.shape[-2:]
        boxes, labels = target["boxes"].as_subclass(Tensor).float(), target["labels"]
        if "masks" in target:
            masks = target["masks"].as_subclass(Tensor)
            keep = masks.flatten(1).any(1).bool()  # any() of uint8 is uint8
            masks, labels = masks[keep], labels[keep]
            out = {"boxes": mask_boxes(masks), "labels": labels, "masks": masks}
        else:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            out = {"boxes": boxes[keep], "labels": labels[keep]}
        return self._normalise(image), out

    def _normalise(self, image: Tensor) -> Tensor:
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        return v2.functional.normalize(image, self.mean, self.std).as_subclass(Tensor)


# -- dataset, collates -------------------------------------------------------------------------


class DenseDataset(Dataset):
    """A source's samples, transformed for one task.

    ``dataset[i]`` is ``(image, mask, i)`` for "segment" and ``(image, target, i)`` for "detect"
    (see :class:`PairedTransform`); ``(None, None, i)`` when the image file cannot be decoded.
    The transform of sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``.

    Attributes:
        source: the :class:`DenseSource`.
        classes: class names, index = class id (``num_classes`` of them, background included where there is one).
        paths: the image files (bad-image reports), or None.
        mean, std: the normalisation.
    """

    def __init__(self, source: DenseSource, task: Task, transform: PairedTransform, seed: int = 0) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task not in source.tasks:
            kind = type(source).__name__
            raise ValueError(
                f"{kind} has no annotations for {task!r} (it serves {', '.join(source.tasks)}); "
                f"use {'an ADE20K-layout dataset or fashion-scenes' if task == 'segment' else 'COCO or fashion-scenes'}"
            )
        self.source, self.task, self.transform, self.seed = source, task, transform, seed
        self.epoch = 0
        self.classes = list(source.classes)
        self.paths = source.paths
        self.mean, self.std = tuple(transform.mean), tuple(transform.std)
        self.ignore_index = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; call before the loader starts its workers."""
        self.epoch = epoch

    def failure_reason(self, index: int) -> str:
        """Why sample ``index``'s image failed to load, found by decoding its file again (for
        openmae.data's BadImageTracker, as its own datasets do)."""
        if self.paths is None:
            return "could not be loaded"
        try:
            image_data.decode_image(self.paths[index], self.source.channels)
        except ValueError as e:  # openmae.data.BadImageError: the file and why
            return str(e)
        return "failed once, loads now (a transient read error?)"

    def __getitem__(self, index: int) -> tuple[Tensor | None, Any, int]:
        index = int(index)
        raw = self.source.load(index)
        if raw.image is None:
            return None, None, index
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, as in openmae.data
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            image, target = self.transform(raw)
        return image, target, index


def collate_segmentation(samples: Sequence[tuple[Tensor | None, Tensor | None, int]]) -> Batch:
    """Stack segmentation samples into an openmae ``Batch`` whose ``labels`` are the (N, H, W) int64
    masks; samples whose image failed to decode are dropped and listed in ``failed``."""
    good = [s for s in samples if s[0] is not None]
    failed = [int(s[2]) for s in samples if s[0] is None]
    if not good:
        return Batch(
            torch.empty(0, 0, 0, 0), torch.empty(0, 0, 0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), failed
        )
    return Batch(
        images=torch.stack([s[0] for s in good]),
        labels=torch.stack([s[1] for s in good]),
        indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
        failed=failed,
    )


@dataclass
class DetectionBatch:
    """Collated detection samples; ``targets`` as torchvision's detectors take them."""

    images: Tensor  # (N, C, H, W) float32, normalised
    targets: list[dict[str, Tensor]]  # per image: boxes (n, 4) xyxy, labels (n,), masks (n, H, W) uint8
    indices: Tensor  # (N,) int64 dataset indices
    failed: list[int]  # dataset indices whose file could not be decoded; not in the tensors

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
            indices=self.indices.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> DetectionBatch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return dataclasses.replace(
            self,
            images=self.images.pin_memory(),
            targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
            indices=self.indices.pin_memory(),
        )


def collate_detection(samples: Sequence[tuple[Tensor | None, dict[str, Tensor] | None, int]]) -> DetectionBatch:
    """Stack detection samples (all of one size after :class:`PairedTransform`) into a :class:`DetectionBatch`."""
    good = [s for s in samples if s[0] is not None]
    failed = [int(s[2]) for s in samples if s[0] is None]
    images = torch.stack([s[0] for s in good]) if good else torch.empty(0, 0, 0, 0)
    return DetectionBatch(images, [s[1] for s in good], torch.tensor([s[2] for s in good], dtype=torch.int64), failed)


def collate_fn(task: Task):
    """The collate function of ``task``."""
    return collate_segmentation if task == "segment" else collate_detection


def build_dense_source(
    name: str,
    split: str,
    *,
    path: str | os.PathLike | None = None,
    img_size: int | tuple[int, int] = 64,
    channels: int | None = None,
    limit: int | None = None,
    length: int | None = None,
    reduce_zero_label: bool = True,
) -> DenseSource:
    """The untransformed source ``name`` names, for one split.

    Args:
        name: "fashion-scenes", "coco" (``path`` = ROOT, see :func:`coco_paths`) or "ade20k"
            (``path`` = ROOT, see :func:`ade20k_paths` and :func:`ade20k_classes`).
        split: "train" or "val".
        path: the dataset root; for fashion-scenes an optional folder of Fashion-MNIST IDX files.
        img_size: the fashion-scenes canvas.
        channels: default 1 for fashion-scenes, 3 for the others.
        limit: use only the first ``limit`` scenes or images.
        length: fashion-scenes only: scenes in the split (default 10000 train, 2000 val).
        reduce_zero_label: ade20k only (see :class:`ADE20KSegmentation`).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if name == "fashion-scenes":
        length = FASHION_SCENES_LENGTH[_split(split)] if length is None else length
        length = min(length, limit) if limit is not None else length
        return FashionScenes(split, length=length, size=img_size, channels=channels or 1, path=path)
    if name in ("coco", "ade20k") and path is None:
        raise ValueError(f"dataset {name} needs a path: pass --data ROOT (the folder holding its splits)")
    if name == "coco":
        images, annotations = coco_paths(path, split)
        return CocoDetection(images, annotations, channels=channels or 3, limit=limit)
    if name == "ade20k":
        images, labels = ade20k_paths(path, split)
        return ADE20KSegmentation(
            images,
            labels,
            classes=ade20k_classes(path, reduce_zero_label),
            reduce_zero_label=reduce_zero_label,
            channels=channels or 3,
            limit=limit,
        )
    raise ValueError(f"unknown dense dataset {name!r}; expected one of {', '.join(DENSE_DATASETS)}")


def build_dense_dataset(
    name: str,
    split: str,
    task: Task,
    *,
    path: str | os.PathLike | None = None,
    img_size: int | tuple[int, int] = 64,
    channels: int | None = None,
    augment: bool = True,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    limit: int | None = None,
    length: int | None = None,
    reduce_zero_label: bool = True,
) -> DenseDataset:
    """The :class:`DenseDataset` of ``name``, ``split`` and ``task``: :func:`build_dense_source`
    wrapped in a :class:`PairedTransform` to ``img_size`` (random when ``augment``).

    Args:
        name, split, path, channels, limit, length, reduce_zero_label: see :func:`build_dense_source`.
        task: "segment" or "detect".
        img_size: the model's input (H, W) or side (and the fashion-scenes canvas).
        augment: the training recipe (scale jitter, crop, flip); False: resize and pad.
        scale_range, hflip: the recipe's jitter factors and flip probability.
        mean, std: normalisation; default the source's (Fashion-MNIST's for fashion-scenes, as in
            pretraining; ImageNet's for COCO and ADE20K).
        seed: the run seed, which with the epoch and index seeds each sample's transform.
    """
    serves = DATASET_TASKS.get(name)
    if serves is not None and task not in serves:
        raise ValueError(
            f"dataset {name} has no annotations for {task!r} (it serves {', '.join(serves)}); use "
            f"{' or '.join(n for n, ts in DATASET_TASKS.items() if task in ts)}"
        )
    source = build_dense_source(
        name,
        split,
        path=path,
        img_size=img_size,
        channels=channels,
        limit=limit,
        length=length,
        reduce_zero_label=reduce_zero_label,
    )
    mean = _per_channel(mean, source.channels) if mean is not None else source.mean
    std = _per_channel(std, source.channels) if std is not None else source.std
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")
    transform = PairedTransform(task, img_size, augment, mean, std, scale_range=scale_range, hflip=hflip)
    return DenseDataset(source, task, transform, seed=seed)
