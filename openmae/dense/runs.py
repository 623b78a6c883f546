"""Semantic segmentation and detection as runs on the one training engine, and their evaluation.

Both commands share one path (:func:`run_dense`): the encoder (pretrained or random, at the dense
task's image size), the dataset's train and held-out splits with paired augmentation, the model
(:class:`~openmae.dense.models.Segmentor` or torchvision's R-CNN), a task, the engine (checkpoints,
resume, DDP, precision, logging), held-out evaluation beside training (:class:`DenseEvaluation`),
metrics.json and predictions.png; ``--eval-only`` evaluates a saved dense model instead
(:func:`evaluate_saved`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from openmae.config import ConfigError, to_dict
from openmae.dense.config import DenseData, DenseEncoderConfig, DetectConfig, SegmentConfig
from openmae.dense.data import DenseDataset, build_dense_dataset, collate_fn
from openmae.dense.draw import save_detection_grid, save_segmentation_grid
from openmae.dense.metrics import DetectionMetrics, SegmentationMetrics
from openmae.dense.models import Segmentor, build_dense_encoder, build_detector
from openmae.dense.pyramid import VIT_SCALE_FACTORS
from openmae.dense.tasks import DetectTask, SegmentTask, dense_record, load_dense_model, read_dense_record
from openmae.distributed import DistInfo, all_reduce_sum, barrier
from openmae.engine import RunContext, Trainer, write_run_files
from openmae.hooks import LossCurvePlot
from openmae.interop.classifier import DEFAULT_CLASSIFIER
from openmae.models.vit import ViTEncoder
from openmae.run_folder import RunFolder
from openmae.runs import fit_and_report, write_metrics
from openmae.runtime import Runtime

PREDICTIONS = "predictions.png"


# -- building blocks --------------------------------------------------------------------------------


def build_encoder(model_cfg: DenseEncoderConfig, img_size: int, channels: int | None) -> nn.Module:
    """The headless encoder at ``img_size``: from ``model_cfg.checkpoint`` (its position table fitted
    to the new grid), else ``model_cfg.name`` (default vit_micro_patch4) at random initialisation."""
    checkpoint = model_cfg.checkpoint
    if checkpoint is not None and read_dense_record(checkpoint) is not None:
        raise ConfigError(
            f"{checkpoint} is a dense model saved by openmae segment / detect, not a pretrained encoder; evaluate it "
            "with --eval-only, or fine-tune from a pretraining run or file"
        )
    source = checkpoint if checkpoint is not None else (model_cfg.name or DEFAULT_CLASSIFIER)
    options: dict[str, Any] = dict(drop_path_rate=model_cfg.drop_path_rate, **model_cfg.kwargs)
    if checkpoint is not None:
        options["arch"] = model_cfg.name
    try:
        return build_dense_encoder(source, img_size, channels, **options)
    except TypeError as e:  # a constructor argument the encoder does not take
        raise ConfigError(f"cannot build the encoder {source}: {e}; check --model.kwargs") from None


def pyramid_args(model_cfg: DenseEncoderConfig, encoder: nn.Module) -> dict[str, Any]:
    """The ViT pyramid's arguments (scale factors from ``model.strides``, window attention); none for
    ConvViT and Swin, which have their own stages."""
    if not isinstance(encoder, ViTEncoder):
        given = [f"model.{k}" for k in ("strides", "window_size", "global_blocks") if getattr(model_cfg, k)]
        if given:
            hint = " (ConvViT: pass --model.kwargs window_size=N for its stage-3 windows)"
            raise ConfigError(
                f"{', '.join(given)} shape the ViT pyramid; a {type(encoder).__name__} has its own stages: drop them"
                + (hint if "model.window_size" in given else "")
            )
        return {}
    patch = encoder.patch_size
    if model_cfg.strides is None:
        default = [patch / s for s in (4.0, 8.0, 16.0, 32.0)]
        scales = default if all(_power_of_two(s) for s in default) else list(VIT_SCALE_FACTORS)
    else:
        scales = [patch / s for s in model_cfg.strides]
        if not all(_power_of_two(s) for s in scales):
            example = " ".join(f"{patch * 2**k:g}" for k in (-2, -1, 0, 1))
            raise ConfigError(
                f"model.strides {model_cfg.strides}: the ViT pyramid resamples the patch grid (stride {patch}) by "
                f"powers of 2, so patch / stride must be one; e.g. {example}"
            )
    depth = len(encoder.blocks)
    if model_cfg.global_blocks is not None and any(b >= depth for b in model_cfg.global_blocks):
        raise ConfigError(
            f"model.global_blocks {model_cfg.global_blocks} must index the encoder's {depth} blocks (0..{depth - 1})"
        )
    return {"scale_factors": scales, "window_size": model_cfg.window_size, "global_blocks": model_cfg.global_blocks}


def _power_of_two(x: float) -> bool:
    return x > 0 and math.log2(x) % 1 == 0


def dense_splits(
    task: str, data: DenseData, seed: int, *, img_size: int, channels: int, mean=None, std=None
) -> tuple[DenseDataset, DenseDataset]:
    """(train, held-out) of ``data`` for ``task``: training samples jittered, cropped and flipped (or
    resized like the held-out ones with ``data.augment`` none), held-out ones resized and padded."""
    common = dict(
        path=data.path, img_size=img_size, channels=channels, mean=mean or data.mean, std=std or data.std,
        reduce_zero_label=data.reduce_zero_label, seed=seed,
    )
    train = build_dense_dataset(
        data.name, "train", task, augment=data.augment == "jitter", scale_range=tuple(data.scale_range),
        hflip=data.hflip, limit=data.limit, **common,
    )
    val = build_dense_dataset(data.name, "val", task, augment=False, limit=data.val_limit, **common)
    return train, val


def model_args(task: str, cfg: SegmentConfig | DetectConfig, encoder: nn.Module, num_classes: int) -> dict[str, Any]:
    """:class:`Segmentor`'s or :func:`build_detector`'s arguments besides the encoder (JSON: the record holds them)."""
    pyramid = pyramid_args(cfg.model, encoder)
    if task == "segment":
        s = cfg.segment
        return dict(
            num_classes=num_classes, head=s.head, channels=s.channels, norm=s.norm, dropout=s.dropout, **pyramid
        )
    d = cfg.detect
    return dict(
        kind=d.detector, num_classes=num_classes, fpn_channels=d.fpn_channels,
        representation_size=d.representation_size, anchor_scale=d.anchor_scale,
        box_batch_size_per_image=d.rois_per_image, box_detections_per_img=d.detections_per_image, **pyramid,
    )


def build_model(task: str, encoder: nn.Module, args: dict[str, Any]) -> nn.Module:
    if task == "segment":
        return Segmentor(encoder, **args)
    return build_detector(encoder, **args)


# -- evaluation -------------------------------------------------------------------------------------


def eval_loader(dataset: DenseDataset, batch_size: int, dist: DistInfo, num_workers: int = 0) -> DataLoader:
    """Every held-out sample once, in index order, rank r taking indices r, r + W, ... (nothing dropped)."""
    dataset.set_epoch(0)
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate_fn(dataset.task)
    )


def _float(entries: list[dict[str, torch.Tensor]], device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Detector outputs or targets in fp32 (autocast may leave boxes in bf16), on ``device``."""
    return [{k: (v.float() if v.is_floating_point() else v).to(device) for k, v in e.items()} for e in entries]


@torch.no_grad()
def evaluate_dense(
    model: nn.Module,
    dataset: DenseDataset,
    runtime: Runtime,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    masks: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out metrics of a segmentor (``miou``, ``acc``, ``macc``, per-class ``iou``) or a detector
    (``map``, ``map_50``, ... and with ``masks`` ``mask_map``, ...), in percent, plus ``images``; the
    same on 1 or N processes (each evaluates its share; torchmetrics sums the states over ranks).

    Args:
        model: the plain model, on ``runtime.device``; its train/eval mode is restored afterwards.
        dataset: the held-out :class:`DenseDataset`.
        masks: score Mask R-CNN's instance masks too.
    """
    if dataset.task == "segment":
        metric = SegmentationMetrics(dataset.num_classes, dataset.classes, dataset.ignore_index)
    else:
        metric = DetectionMetrics(masks=masks, class_names=dataset.classes)
    metric = metric.to(runtime.device)  # its states are gathered over ranks where the process group reduces
    was_training = model.training
    model.eval()
    batches: Any = eval_loader(dataset, batch_size, runtime.dist, num_workers)
    if progress and runtime.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", dynamic_ncols=True, leave=False)
    seen = 0
    try:
        for batch in batches:
            if not len(batch):
                continue
            batch = batch.to(runtime.device)
            seen += len(batch)
            with runtime.autocast():
                if dataset.task == "segment":
                    metric.update(model(batch.images).argmax(1), batch.labels)  # (N, H, W) class ids
                else:
                    predictions = model(list(batch.images))
                    metric.update(_float(predictions, runtime.device), _float(batch.targets, runtime.device))
    finally:
        model.train(was_training)
    result = metric.compute()
    images = all_reduce_sum(torch.tensor([seen], device=runtime.device), runtime.dist)
    return {**result, "images": int(images.item())}


@torch.no_grad()
def draw_predictions(
    model: nn.Module,
    dataset: DenseDataset,
    path: str | Path,
    runtime: Runtime,
    *,
    images: int = 8,
    score_threshold: float = 0.5,
) -> Path | None:
    """``path`` (a PNG): the first ``images`` held-out samples with their ground truth and the model's
    predictions drawn over them; None when there is nothing to draw."""
    samples = [dataset[i] for i in range(min(images, len(dataset)))]
    batch = collate_fn(dataset.task)(samples)
    if not len(batch):
        return None
    batch = batch.to(runtime.device)
    was_training = model.training
    model.eval()
    try:
        with runtime.autocast():
            if dataset.task == "segment":
                predictions = model(batch.images).argmax(1).cpu()
            else:
                predictions = _float(model(list(batch.images)))
    finally:
        model.train(was_training)
    shown = dict(mean=dataset.mean, std=dataset.std, class_names=dataset.classes, max_images=images)
    if dataset.task == "segment":
        return save_segmentation_grid(path, batch.images.cpu(), predictions, batch.labels.cpu(), **shown)
    return save_detection_grid(
        path, batch.images.cpu(), predictions, _float(batch.targets), score_threshold=score_threshold, **shown
    )


def scalars(metrics: dict[str, Any], prefix: str = "val/") -> dict[str, float]:
    """The numbers of a metrics dict (not the per-class tables), for metrics.jsonl and TensorBoard."""
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "images"}


class DenseEvaluation:
    """A hook: held-out metrics every ``every`` epochs (``val/miou``, ``val/map`` ... in metrics.jsonl and
    TensorBoard) and after the last; at the end, ``predictions.png`` from the first ``draw`` held-out images.

    Args:
        dataset: the held-out :class:`DenseDataset`.
        epochs: the run's epochs (the last one is evaluated once, at the end).
        every: evaluate every N epochs (0: only at the end).
        batch_size, num_workers: the evaluation loader's.
        masks: score instance masks too (Mask R-CNN).
        draw: images in predictions.png (0: none).
        score_threshold: the lowest detection score drawn.
        progress: a progress bar over the evaluation batches.
    """

    def __init__(
        self,
        dataset: DenseDataset,
        epochs: int,
        *,
        every: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        masks: bool = False,
        draw: int = 8,
        score_threshold: float = 0.5,
        progress: bool = False,
    ) -> None:
        self.dataset, self.epochs, self.every = dataset, epochs, every
        self.loop = dict(batch_size=batch_size, num_workers=num_workers, masks=masks, progress=progress)
        self.draw, self.score_threshold = draw, score_threshold

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return evaluate_dense(ctx.model, self.dataset, ctx.runtime, **self.loop)

    def on_epoch_end(self, ctx: RunContext) -> dict[str, float] | None:
        if self.every == 0 or (ctx.epoch + 1) % self.every or ctx.epoch + 1 == self.epochs:
            return None  # the last epoch is evaluated by on_train_end
        return scalars(self.run(ctx))

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        metrics = self.run(ctx)
        if ctx.runtime.is_main:
            if ctx.writer is not None:
                for key, value in scalars(metrics).items():
                    ctx.writer.add_scalar(key, value, ctx.step)
            if self.draw:
                draw_predictions(ctx.model, self.dataset, ctx.out_dir / PREDICTIONS, ctx.runtime, images=self.draw,
                                 score_threshold=self.score_threshold)
        return {"val": metrics}


# -- the runs ---------------------------------------------------------------------------------------


def run_dense(task: str, cfg: SegmentConfig | DetectConfig) -> dict[str, Any]:
    """Fine-tune for ``task`` ("segment" or "detect"), or with ``cfg.eval.only`` evaluate a saved model;
    returns the metrics written to ``metrics.json``: the held-out figures and the run's description."""
    runtime = Runtime.create(cfg.train.device, cfg.train.precision)
    if cfg.eval.only:
        return evaluate_saved(task, cfg, runtime)
    torch.manual_seed(cfg.train.seed)  # the random parts of the model: a random encoder, the pyramid, the head
    encoder = build_encoder(cfg.model, cfg.data.img_size, cfg.data.channels)
    if getattr(encoder, "load_report", None) is not None and runtime.is_main:
        print(encoder.load_report.summary(), file=sys.stderr)
    train, val = dense_splits(task, cfg.data, cfg.train.seed, img_size=cfg.data.img_size, channels=encoder.in_chans)
    masks = task == "detect" and cfg.detect.detector == "mask_rcnn"
    if masks and not getattr(train.source, "has_masks", True):
        raise ConfigError(
            f"{cfg.data.path}: its annotations have no instance masks (segmentation) for every object, which "
            "Mask R-CNN learns from; pass --detector faster_rcnn"
        )
    args = model_args(task, cfg, encoder, train.num_classes)
    model = build_model(task, encoder, args)
    record = dense_record(
        task, encoder, args, train.classes, img_size=cfg.data.img_size, channels=encoder.in_chans,
        mean=list(train.mean), std=list(train.std),
    )
    task_cls = SegmentTask if task == "segment" else DetectTask
    dense_task = task_cls(model, encoder, record, cfg.optim.layer_decay)
    evaluation = DenseEvaluation(
        val, cfg.train.epochs, every=cfg.eval.every, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
        masks=masks, draw=cfg.eval.draw, score_threshold=cfg.detect.score_threshold if task == "detect" else 0.5,
        progress=cfg.train.progress,
    )
    config = to_dict(cfg)
    config["data"].update(channels=encoder.in_chans, mean=list(train.mean), std=list(train.std))
    trainer = Trainer(
        dense_task, train, runtime, train=cfg.train, optim=cfg.optim, data=cfg.data, config=config,
        hooks=[evaluation, LossCurvePlot()], collate_fn=collate_fn(task),
    )
    return fit_and_report(trainer, lambda summary: {
        "task": task,
        **summary["val"],
        **describe(task, record, cfg.model.checkpoint, cfg.data),
        "train_images": len(train),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    })


def describe(task: str, record: dict[str, Any], checkpoint: str | None, data: DenseData) -> dict[str, Any]:
    """The model and data a metrics.json is about."""
    out: dict[str, Any] = {"checkpoint": checkpoint, "encoder": record["encoder"]["arch"]}
    if task == "segment":
        out["head"] = record["model"]["head"]
    else:
        out["detector"] = record["model"]["kind"]
    return {**out, "dataset": data.path or data.name, "img_size": record["img_size"], "classes": record["classes"]}


def evaluate_saved(task: str, cfg: SegmentConfig | DetectConfig, runtime: Runtime) -> dict[str, Any]:
    """``--eval-only``: the held-out metrics of a model saved by this command, in metrics.json (and
    predictions.png), at the size, channels and normalisation it was trained with."""
    if cfg.model.checkpoint is None:
        raise ConfigError(f"--eval-only needs --checkpoint: a model saved by openmae {task} (OUTPUT/model.safetensors "
                          "or its run folder)")
    out = Path(cfg.train.output_dir)
    RunFolder(out).check_evaluation_output()
    model, record = load_dense_model(cfg.model.checkpoint)
    if record["task"] != task:
        raise ConfigError(
            f"{cfg.model.checkpoint} holds a {record['task']} model; evaluate it with "
            f"openmae {record['task']} --eval-only"
        )
    for name in ("img_size", "channels"):
        given = getattr(cfg.data, name)
        if given is not None and given != record[name]:
            raise ConfigError(
                f"data.{name} {given}: {cfg.model.checkpoint} was trained with {name} {record[name]}, which "
                f"--eval-only keeps; drop --data.{name}"
            )
    _, val = dense_splits(task, cfg.data, cfg.train.seed, img_size=record["img_size"], channels=record["channels"],
                          mean=record["mean"], std=record["std"])
    if val.classes != record["classes"]:
        raise ConfigError(
            f"{cfg.model.checkpoint} was trained on {len(record['classes'])} classes "
            f"({', '.join(record['classes'][:4])}...), the {cfg.data.name} data has {len(val.classes)} "
            f"({', '.join(val.classes[:4])}...); evaluate it on the dataset it was trained on"
        )
    model = model.to(runtime.device)
    masks = record["task"] == "detect" and record["model"]["kind"] == "mask_rcnn"
    result = evaluate_dense(
        model, val, runtime, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, masks=masks,
        progress=cfg.train.progress,
    )
    metrics = {"task": task, **result, **describe(task, record, cfg.model.checkpoint, cfg.data), "eval_only": True}
    if runtime.is_main:
        write_run_files(out, to_dict(cfg), runtime.dist)
        if cfg.eval.draw:
            threshold = cfg.detect.score_threshold if task == "detect" else 0.5
            draw_predictions(model, val, out / PREDICTIONS, runtime, images=cfg.eval.draw, score_threshold=threshold)
        write_metrics(out, metrics)
    barrier(runtime.dist)
    return metrics


__all__ = [
    "DenseEvaluation",
    "draw_predictions",
    "evaluate_dense",
    "evaluate_saved",
    "run_dense",
]
