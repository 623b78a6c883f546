"""The runs built on the training engine: pretraining, and the classification protocols.

Fine-tuning and linear probing share everything but their task and readout (labelled splits, the
classifier from a checkpoint, the engine, metrics.json, and ``--eval-only`` for a saved classifier).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from openmae.config import ConfigError, PretrainConfig, to_dict
from openmae.data import build_dataset, labelled_splits
from openmae.distributed import barrier
from openmae.engine import Trainer, write_run_files
from openmae.eval_config import FinetuneConfig, LinprobeConfig
from openmae.hooks import HeldOutEvaluation, KNNMonitor, LossCurvePlot, ReconstructionHook
from openmae.inference import evaluate
from openmae.interop.classifier import ClassifierLayout, build_classifier, check_resumable, read_encoder
from openmae.io import atomic_write_text, json_text
from openmae.models import create_model
from openmae.run_folder import RunFolder
from openmae.runtime import Runtime
from openmae.tasks import FinetuneTask, LinearProbeTask, PretrainTask
from openmae.transforms import finetune_transform

# The linear probe reads the encoder through BatchNorm (no affine) + linear; fine-tuning through a linear head.
HEAD_NORM = {"finetune": False, "linprobe": True}


def build_pretrain_model(cfg: PretrainConfig, channels: int) -> torch.nn.Module:
    kwargs: dict[str, Any] = {
        "img_size": cfg.data.img_size,
        "in_chans": channels,
        "norm_pix_loss": cfg.model.norm_pix_loss,
        "mask_type": cfg.model.mask_type,
        **cfg.model.kwargs,
    }
    if kwargs["in_chans"] != channels:
        raise ConfigError(
            f"model.kwargs.in_chans={kwargs['in_chans']} but the data has {channels} channel(s); "
            f"set --data.channels {kwargs['in_chans']} or drop the override"
        )
    try:
        return create_model(cfg.model.name, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build {cfg.model.name}: {e}") from None


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain as configured; returns the run summary (also written to ``summary.json``)."""
    runtime = Runtime.create(cfg.train.device, cfg.train.precision)
    dataset = build_dataset(cfg.data, split="train", augment=True, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_pretrain_model(cfg, dataset.channels)
    task = PretrainTask(model, cfg.model.mask_ratio, cfg.model.mask_type, cfg.train.seed)
    hooks = [ReconstructionHook(cfg, dataset)] if cfg.train.recon_every else []
    if cfg.train.knn_every:
        hooks.append(KNNMonitor.from_config(cfg))
    hooks.append(LossCurvePlot())
    config = to_dict(cfg)
    config["data"]["mean"], config["data"]["std"] = list(dataset.mean), list(dataset.std)
    trainer = Trainer(
        task, dataset, runtime, train=cfg.train, optim=cfg.optim, data=cfg.data, config=config, hooks=hooks
    )
    return trainer.fit()


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json`` in the output folder (atomic)."""
    path = Path(out_dir) / "metrics.json"
    atomic_write_text(path, json_text(metrics, indent=2) + "\n")
    return path


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "model": model.arch, "pool": model.global_pool, "fc_norm": model.use_fc_norm, "num_classes": model.num_classes
    }


def run_protocol(protocol: str, cfg: FinetuneConfig | LinprobeConfig) -> dict[str, Any]:
    """Train (or with ``cfg.eval.only`` evaluate) a classifier with ``protocol`` (finetune / linprobe);
    returns the metrics written to ``metrics.json``: held-out top-1 / top-5 (%), loss, images, and
    the run's description."""
    if cfg.train.knn_every:
        raise ConfigError(
            f"train.knn_every monitors an encoder during pretraining; {protocol} reports held-out accuracy itself "
            "(eval.every): drop --train.knn_every"
        )
    runtime = Runtime.create(cfg.train.device, cfg.train.precision)
    if cfg.eval.only:
        return evaluate_checkpoint(protocol, cfg, runtime)
    weights = read_encoder(cfg.model.checkpoint)
    train, test = labelled_splits(cfg.data, cfg.train.seed, protocol, cfg.eval.crop_pct)
    if protocol == "finetune":
        train.transform = finetune_transform(cfg.data, cfg.finetune, train.mean, train.std)
    torch.manual_seed(cfg.train.seed)
    layout = ClassifierLayout(num_classes=train.num_classes, head_norm=HEAD_NORM[protocol])
    model = build_classifier(cfg.model, weights, layout, img_size=cfg.data.img_size, in_chans=train.channels)
    if model.load_report is not None and runtime.is_main:
        print(model.load_report.summary(), file=sys.stderr)
    evaluation = HeldOutEvaluation(test, cfg.eval, cfg.train.epochs, cfg.data.num_workers)
    if protocol == "finetune":
        task = FinetuneTask(model, cfg.finetune, cfg.train.seed)
    else:
        task = LinearProbeTask(model, cfg.linprobe)
    config = to_dict(cfg)
    config["data"]["mean"], config["data"]["std"] = list(train.mean), list(train.std)
    trainer = Trainer(
        task, train, runtime, train=cfg.train, optim=cfg.optim, data=cfg.data, config=config, hooks=[evaluation]
    )
    check_resumable(trainer.checkpoints.resume_path(), task.model)
    return fit_and_report(trainer, lambda summary: {
        "protocol": protocol,
        **summary["test"],
        "checkpoint": cfg.model.checkpoint,
        **describe_model(task.model),
        "dataset": cfg.data.path or cfg.data.name,
        "trainable_parameters": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
    })


def fit_and_report(trainer: Trainer, describe: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Train, then write ``metrics.json`` (rank 0) and return it: ``describe(summary)`` (what was trained,
    its held-out figures from the summary) followed by how long it trained (epochs, steps, final_loss,
    seconds). A run that had already finished keeps the metrics.json it wrote then."""
    summary = trainer.fit()
    written = trainer.out_dir / "metrics.json"
    if trainer.already_finished and written.exists():  # its metrics.json stays as it is
        return json.loads(written.read_text())
    metrics = {
        **describe(summary),
        "epochs": trainer.cfg.epochs,
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "seconds": summary["seconds"],
        "eval_only": False,
    }
    if trainer.runtime.is_main:
        write_metrics(trainer.out_dir, metrics)
    return metrics


def evaluate_checkpoint(protocol: str, cfg: FinetuneConfig | LinprobeConfig, runtime: Runtime) -> dict[str, Any]:
    """``--eval-only``: held-out top-1/top-5 of a saved classifier, written to metrics.json."""
    if cfg.model.checkpoint is None:
        raise ConfigError("--eval-only needs --checkpoint: a classifier saved by this protocol")
    RunFolder(cfg.train.output_dir).check_evaluation_output()
    weights = read_encoder(cfg.model.checkpoint)
    _, test = labelled_splits(cfg.data, cfg.train.seed, protocol, cfg.eval.crop_pct)
    layout = ClassifierLayout(num_classes=test.num_classes, head_norm=HEAD_NORM[protocol], trained=True)
    model = build_classifier(cfg.model, weights, layout, img_size=cfg.data.img_size, in_chans=test.channels)
    if runtime.is_main:
        print(model.load_report.summary(), file=sys.stderr)
    model = model.to(runtime.device)
    result = evaluate(
        model, test, runtime, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
        progress=cfg.train.progress,
    )
    metrics = {
        "protocol": protocol, **result, "checkpoint": cfg.model.checkpoint, **describe_model(model),
        "dataset": cfg.data.path or cfg.data.name, "eval_only": True,
    }
    if runtime.is_main:
        out = Path(cfg.train.output_dir)
        write_run_files(out, to_dict(cfg), runtime.dist)
        write_metrics(out, metrics)
    barrier(runtime.dist)
    return metrics
