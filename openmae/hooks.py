"""What runs beside training, at the end of an epoch or of the run: reconstruction figures, the loss
curve, a kNN monitor of the encoder, held-out evaluation of a classifier.

Each is a hook for :class:`openmae.engine.Trainer` (``hooks=[...]``): an object with an optional
``on_epoch_end(ctx)`` returning metrics to log and an optional ``on_train_end(ctx)`` returning
summary fields, ``ctx`` being the engine's :class:`~openmae.engine.RunContext` (``ctx.model`` is
the plain module being trained).
"""

from __future__ import annotations

from typing import Any

import torch

from openmae.config import PretrainConfig
from openmae.data import ImageDataset, build_dataset
from openmae.engine import RunContext
from openmae.eval_config import EvalSettings
from openmae.inference import evaluate, knn_accuracy
from openmae.visualize import log_reconstructions, plot_loss_curve


class ReconstructionHook:
    """Every ``train.recon_every`` epochs, reconstruct the same held-out images (PNG + TensorBoard)."""

    def __init__(self, cfg: PretrainConfig, train_set) -> None:
        try:  # the held-out split where there is one, else un-augmented training images
            held = build_dataset(cfg.data, split="test", augment=False, seed=cfg.train.seed)
        except (ValueError, FileNotFoundError):
            held = build_dataset(cfg.data, split="train", augment=False, seed=cfg.train.seed)
        images = []
        for i in range(len(held)):
            image = held[i][0]
            if image is not None:
                images.append(image)
            if len(images) == cfg.train.recon_images:
                break
        self.images = torch.stack(images)
        self.mean, self.std = train_set.mean, train_set.std
        self.mask_ratio, self.mask_type = cfg.model.mask_ratio, cfg.model.mask_type
        self.every = cfg.train.recon_every
        self.seed = cfg.train.seed

    def on_epoch_end(self, ctx: RunContext) -> None:
        epoch = ctx.epoch + 1
        if ctx.runtime.is_main and epoch % self.every == 0:
            log_reconstructions(ctx.model, self.images.to(ctx.runtime.device), ctx.writer, ctx.out_dir, epoch,
                                self.mean, self.std, mask_ratios=self.mask_ratio, mask_type=self.mask_type,
                                seed=self.seed)


class LossCurvePlot:
    """At the end of the run, ``loss_curve.png`` from metrics.jsonl."""

    def on_train_end(self, ctx: RunContext) -> None:
        metrics = ctx.out_dir / "metrics.jsonl"
        if ctx.runtime.is_main and metrics.exists():
            plot_loss_curve(metrics, ctx.out_dir / "loss_curve.png")


class KNNMonitor:
    """A pretraining hook: kNN accuracy of the encoder's features every ``every`` epochs.

    The engine logs what it returns (``knn/top1``, ``knn/top5``) to metrics.jsonl and TensorBoard.
    Use small splits (``DataConfig(limit=...)``): the memory bank is re-encoded each time.
    """

    def __init__(
        self,
        train: ImageDataset,
        test: ImageDataset,
        every: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "token",
        batch_size: int = 256,
    ) -> None:
        self.train, self.test = train, test
        self.every, self.k, self.temperature, self.pool, self.batch_size = every, k, temperature, pool, batch_size

    def on_epoch_end(self, ctx: RunContext) -> dict[str, float] | None:
        if (ctx.epoch + 1) % self.every:
            return None
        metrics = knn_accuracy(
            ctx.model, self.train, self.test, ctx.runtime, k=self.k, temperature=self.temperature, pool=self.pool,
            batch_size=self.batch_size,
        )
        return {"knn/top1": metrics["top1"], "knn/top5": metrics["top5"]}


class HeldOutEvaluation:
    """Top-1 / top-5 on the held-out split every ``settings.every`` epochs and after the last one."""

    def __init__(self, dataset: ImageDataset, settings: EvalSettings, epochs: int, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.settings = settings
        self.epochs = epochs
        self.num_workers = num_workers

    def run(self, ctx: RunContext) -> dict[str, float]:
        return evaluate(
            ctx.model, self.dataset, ctx.runtime, batch_size=self.settings.batch_size, num_workers=self.num_workers
        )

    def on_epoch_end(self, ctx: RunContext) -> dict[str, float] | None:
        every = self.settings.every
        if every == 0 or (ctx.epoch + 1) % every or ctx.epoch + 1 == self.epochs:
            return None  # the last epoch is evaluated by on_train_end
        return {f"test/{k}": v for k, v in self.run(ctx).items() if k != "images"}

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        return {"test": self.run(ctx)}
