"""Typed settings of ``openmae segment`` and ``openmae detect``, read like every protocol's
(``--section.field`` flags, YAML recipes with overrides only, defaults < recipe < flags).

Both commands share the sections ``model`` (the encoder and its pyramid), ``data`` (a dense dataset
and its paired augmentation), ``optim`` (AdamW with layer-wise lr decay, warmup + cosine), ``train``
(pretraining's section with the command's defaults) and ``eval``; ``segment`` holds the head,
``detect`` the detector. The defaults are the built-in CPU runs: the default pretraining run's
encoder (vit_micro_patch4) on 64 px fashion-scenes, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openmae.config import ConfigError, TrainConfig, check_choices, check_types, opt
from openmae.dense.data import DATASET_TASKS, DENSE_DATASETS, IGNORE_INDEX
from openmae.dense.heads import HEADS, NORMS
from openmae.eval_config import FinetuneOptim, HeldOutEval

DETECTORS = ("faster_rcnn", "mask_rcnn")  # openmae.dense.models.DETECTORS, without importing torchvision's detectors
DEFAULT_IMG_SIZE = 64  # the fashion-scenes canvas; an ADE20K / COCO image is resized and padded to it


# -- shared sections -------------------------------------------------------------------------


@dataclass
class DenseEncoderConfig:
    checkpoint: str | None = opt(
        None,
        "the pretrained encoder: an openmae run folder or file, an official MAE / ConvMAE .pth, a Hugging Face or "
        "timm checkpoint (anything openmae.load_pretrained reads); unset = random initialisation. With "
        "--eval-only: a model saved by this command (OUTPUT/model.safetensors or its run folder)",
        alias="--checkpoint",
    )
    name: str | None = opt(
        None,
        "encoder architecture: vit_*, convvit_* or swin_* (`openmae models`; a pretraining name picks its encoder); "
        "default: the checkpoint's, else vit_micro_patch4",
        alias="--model",
    )
    kwargs: dict = opt(
        {}, "encoder constructor overrides, repeatable: depth=2 or {embed_dim: 32} (ConvViT: window_size=7)"
    )
    drop_path_rate: float = opt(
        0.1, "stochastic depth rate of the last block (the papers: 0.1-0.3)", alias="--drop-path"
    )
    strides: list[float] | None = opt(
        None,
        "ViT pyramid: the levels' strides in pixels, made from the last map by deconvolutions and max-pooling "
        "(ViTDet); patch / stride must be a power of 2. Default 4 8 16 32 (the papers'), or for a patch that does "
        "not divide them ViTDet's patch/4 ... 2 x patch (patch 14: 3.5 7 14 28). ConvViT and Swin have their own",
    )
    window_size: int = opt(0, "ViT pyramid: ViTDet window attention of this many tokens a side in the blocks not in "
                           "global_blocks (0: global attention everywhere)")
    global_blocks: list[int] | None = opt(None, "ViT pyramid: blocks that keep global attention (default: the last "
                                          "of each quarter)")

    def __post_init__(self) -> None:
        check_types(self, "model")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        strides = self.strides
        if strides is not None and (not strides or min(strides) <= 0 or len(set(strides)) != len(strides)):
            raise ConfigError(
                f"model.strides must be distinct positive strides in pixels, like 4 8 16 32, got {self.strides}"
            )
        if self.window_size < 0:
            raise ConfigError(
                f"model.window_size must be >= 0 (0: global attention everywhere), got {self.window_size}"
            )
        if self.global_blocks is not None and any(b < 0 for b in self.global_blocks):
            raise ConfigError(f"model.global_blocks are block indices >= 0, got {self.global_blocks}")
        if self.name is not None:
            from openmae.models import list_models
            from openmae.models.classifier import classifier_name

            if classifier_name(self.name) is None:
                names = ", ".join(n for n in list_models() if n.startswith(("vit_", "convvit_", "swin_")))
                raise ConfigError(
                    f"model.name {self.name!r} has no encoder for dense prediction; choose one of {names}"
                )


@dataclass
class DenseData:
    """A dense dataset; ``name``'s choices are the command's (segment: fashion-scenes, ade20k; detect:
    fashion-scenes, coco)."""

    name: str = opt(
        "fashion-scenes", "dataset (fashion-scenes is built in; the others need --data ROOT)", choices=DENSE_DATASETS,
        alias="--dataset",
    )
    path: str | None = opt(
        None, "dataset root: COCO (ROOT/train, ROOT/annotations/instances_train.json, ...) or ADE20K "
        "(ROOT/images/training, ROOT/annotations/training, ...); fashion-scenes: a folder of Fashion-MNIST IDX files",
        alias="--data",
    )
    img_size: int | None = opt(
        None,
        f"images are resized and padded (evaluation) or jittered and cropped (training) to this square size; "
        f"default {DEFAULT_IMG_SIZE} (the fashion-scenes canvas), with --eval-only the saved model's",
        alias="--img-size",
    )
    channels: int | None = opt(
        None, "image channels, 1 or 3; default the encoder's (a 1-channel encoder reads RGB as gray)"
    )
    limit: int | None = opt(2000, "train on the first N scenes / images (null: all; fashion-scenes has 10000)")
    val_limit: int | None = opt(
        500, "evaluate on the first N held-out scenes / images (null: all; fashion-scenes has 2000)"
    )
    augment: str = opt(
        "jitter", "jitter: scale jitter (scale_range), random crop and horizontal flip, masks and boxes moved with "
        "the pixels; none: resize and pad as in evaluation", choices=("jitter", "none"),
    )
    scale_range: list[float] = opt(
        [0.8, 1.25], "scale jitter factors [lo, hi] (mild, for minutes of training; ViTDet's long schedules: 0.1 2.0)"
    )
    hflip: float = opt(0.5, "horizontal flip probability")
    mean: list[float] | None = opt(None, "per-channel normalisation mean (default: the dataset's; fashion-scenes: "
                                   "Fashion-MNIST's, as pretraining)")
    std: list[float] | None = opt(None, "per-channel normalisation std (default: the dataset's)")
    reduce_zero_label: bool = opt(
        True, "ade20k: label 0 (other) is ignored and 1..150 become 0..149, as mmsegmentation"
    )
    num_workers: int = opt(2, "data-loading processes per rank")
    max_bad_fraction: float = opt(0.05, "stop when more than this fraction of images fail to load")

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_choices(self, "data")
        if self.name in ("coco", "ade20k") and self.path is None:
            raise ConfigError(
                f"data.name={self.name} needs its files: pass --data ROOT (the folder holding its splits)"
            )
        if self.path is not None and not Path(self.path).is_dir():
            what = "is a file, not a folder" if Path(self.path).exists() else "does not exist"
            raise ConfigError(f"data.path {self.path} {what}; pass --data the dataset's root folder")
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError(f"data.img_size must be at least 8 px, got {self.img_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        for name in ("limit", "val_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1 (null: all), got {getattr(self, name)}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"data.scale_range must be [lo, hi] with 0 < lo <= hi, got {self.scale_range}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"data.hflip is a probability in [0, 1], got {self.hflip}")
        for stat in ("mean", "std"):
            values = getattr(self, stat)
            if values is not None and len(values) not in (1, 3):
                raise ConfigError(f"data.{stat} needs one value per channel (1 or 3), got {values}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std must be positive (it divides the pixels), got {self.std}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class DenseOptim(FinetuneOptim):
    """Fine-tuning's AdamW (its betas and lr floor), with the dense runs' lr, warmup and layer decay."""

    base_lr: float = opt(1.6e-2, "lr = base_lr * effective batch / 256 (1e-3 at the default batch 16)", alias="--blr")
    warmup_epochs: float = opt(0.25, "linear warmup length in epochs, then cosine to min_lr (per step)",
                               alias="--warmup-epochs")
    layer_decay: float = opt(
        0.75, "layer-wise lr decay of the encoder: block i of D gets lr x decay^(D - i), the patch embedding "
        "decay^(D + 1); the pyramid and heads the full lr; 1 = off (the papers: 0.65-0.9)", alias="--layer-decay",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class DenseEval(HeldOutEval):
    only: bool = opt(False, "evaluate model.checkpoint (a model saved by this command) and exit", alias="--eval-only")
    batch_size: int = opt(32, "images per evaluation batch")
    draw: int = opt(8, "held-out images drawn with their predictions in OUTPUT/predictions.png (0: none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draw < 0:
            raise ConfigError(f"eval.draw must be >= 0 (0: no figure), got {self.draw}")


def _default_size(data: DenseData, evaluation: DenseEval) -> None:
    """Training defaults to the fashion-scenes canvas; --eval-only to the saved model's size (known once it is read)."""
    if data.img_size is None and not evaluation.only:
        data.img_size = DEFAULT_IMG_SIZE


def _datasets(task: str) -> tuple[str, ...]:
    """The dense datasets with annotations for ``task``."""
    return tuple(name for name, tasks in DATASET_TASKS.items() if task in tasks)


# -- segment ----------------------------------------------------------------------------------


@dataclass
class SegmentData(DenseData):
    name: str = opt(
        "fashion-scenes", "dataset: fashion-scenes (built in) or ade20k (ADE20K's layout, --data ROOT)",
        choices=_datasets("segment"), alias="--dataset",
    )


@dataclass
class SegmentTrain(TrainConfig):
    epochs: int = opt(4, "number of epochs (ADE20K recipes: 160k iterations)", alias="--epochs")
    batch_size: int = opt(16, "images per process per step (ADE20K recipes: 16 in all)", alias="--batch-size")
    log_every: int = opt(10, "log scalars every N steps")
    output_dir: str = opt("runs/segment", "where logs, checkpoints, metrics.json, predictions.png and the model go",
                          alias="--output")


@dataclass
class SegmentSettings:
    head: str = opt("upernet", "upernet: PPM + FPN fusion (the papers'); fpn: the lighter Semantic FPN head",
                    choices=tuple(HEADS), alias="--head")
    channels: int = opt(64, "the head's width (the papers: 512; 64 trains in minutes on a CPU)")
    norm: str = opt(
        "gn", "the head's normalisation: gn (GroupNorm, any batch size) or bn (large batches)", choices=NORMS
    )
    dropout: float = opt(0.1, "Dropout2d before the classifier")

    def __post_init__(self) -> None:
        check_types(self, "segment")
        check_choices(self, "segment")
        if self.channels < 8:
            raise ConfigError(f"segment.channels must be >= 8, got {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"segment.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SegmentConfig:
    model: DenseEncoderConfig = field(default_factory=DenseEncoderConfig)
    data: SegmentData = field(default_factory=SegmentData)
    optim: DenseOptim = field(default_factory=DenseOptim)
    train: SegmentTrain = field(default_factory=SegmentTrain)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    eval: DenseEval = field(default_factory=DenseEval)

    def __post_init__(self) -> None:
        _default_size(self.data, self.eval)


# -- detect -----------------------------------------------------------------------------------


@dataclass
class DetectData(DenseData):
    name: str = opt(
        "fashion-scenes", "dataset: fashion-scenes (built in) or coco (a COCO instances JSON and images, --data ROOT)",
        choices=_datasets("detect"), alias="--dataset",
    )
    limit: int | None = opt(1000, "train on the first N scenes / images (null: all; fashion-scenes has 10000)")
    val_limit: int | None = opt(
        200, "evaluate on the first N held-out scenes / images (null: all; fashion-scenes has 2000)"
    )


@dataclass
class DetectTrain(TrainConfig):
    epochs: int = opt(3, "number of epochs (COCO recipes: 12-100)", alias="--epochs")
    batch_size: int = opt(8, "images per process per step (COCO recipes: 16-64 in all)", alias="--batch-size")
    log_every: int = opt(10, "log scalars every N steps")
    output_dir: str = opt("runs/detect", "where logs, checkpoints, metrics.json, predictions.png and the model go",
                          alias="--output")


@dataclass
class DetectSettings:
    detector: str = opt(
        "faster_rcnn", "torchvision's faster_rcnn (boxes; half mask_rcnn's cost on a CPU) or mask_rcnn (boxes and "
        "instance masks, the papers')",
        choices=DETECTORS, alias="--detector",
    )
    fpn_channels: int = opt(64, "width of the FPN and the mask head (torchvision: 256)")
    representation_size: int = opt(256, "width of the box head's two fully connected layers (torchvision: 1024)")
    anchor_scale: float = opt(4.0, "anchor side / level stride, one size per FPN level (torchvision's COCO: 8)")
    rois_per_image: int = opt(128, "RoIs sampled per image to train the box head (torchvision: 512)")
    detections_per_image: int = opt(
        20,
        "detections kept per image, the highest scoring (COCO's mAP reads up to 100; a scene holds at most 4 objects)",
    )
    score_threshold: float = opt(0.5, "the lowest score drawn in predictions.png (metrics use every detection)")

    def __post_init__(self) -> None:
        check_types(self, "detect")
        check_choices(self, "detect")
        for name in ("fpn_channels", "representation_size", "rois_per_image", "detections_per_image"):
            if getattr(self, name) < 1:
                raise ConfigError(f"detect.{name} must be >= 1, got {getattr(self, name)}")
        if self.anchor_scale <= 0:
            raise ConfigError(f"detect.anchor_scale must be positive, got {self.anchor_scale}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"detect.score_threshold must be in [0, 1], got {self.score_threshold}")


@dataclass
class DetectConfig:
    model: DenseEncoderConfig = field(default_factory=DenseEncoderConfig)
    data: DetectData = field(default_factory=DetectData)
    optim: DenseOptim = field(default_factory=DenseOptim)
    train: DetectTrain = field(default_factory=DetectTrain)
    detect: DetectSettings = field(default_factory=DetectSettings)
    eval: DenseEval = field(default_factory=DenseEval)

    def __post_init__(self) -> None:
        _default_size(self.data, self.eval)


__all__ = [
    "DEFAULT_IMG_SIZE",
    "DETECTORS",
    "IGNORE_INDEX",
    "DenseData",
    "DenseEncoderConfig",
    "DenseEval",
    "DenseOptim",
    "DetectConfig",
    "DetectData",
    "DetectSettings",
    "SegmentConfig",
    "SegmentData",
    "SegmentSettings",
]
