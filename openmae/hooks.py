"""What runs beside training, at the end of an epoch or of the run: reconstruction figures, a kNN
monitor of the encoder, held-out evaluation of a classifier."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from openmae.config import PretrainConfig
from openmae.data import ImageDataset, build_dataset
from openmae.eval_config import EvalSettings
from openmae.inference import evaluate, knn_accuracy
from openmae.visualize import log_reconstructions


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
        self.every = cfg.train.recon_every
        self.seed = cfg.train.seed

    def __call__(self, task, ctx) -> None:
        epoch = ctx.epoch + 1
        if ctx.dist.is_main and epoch % self.every == 0:
            log_reconstructions(task.model, self.images.to(ctx.device), ctx.writer, ctx.out_dir, epoch,
                                self.mean, self.std, mask_ratios=task.mask_ratio, mask_type=task.mask_type,
                                seed=self.seed)


class KNNMonitor:
    """A pretraining hook: kNN accuracy of the encoder's features every ``every`` epochs.

    Add it to a :class:`openmae.tasks.PretrainTask`'s ``hooks``; the engine logs what it returns
    (``knn/top1``, ``knn/top5``) to metrics.jsonl and TensorBoard. Use small splits
    (``DataConfig(limit=...)``): the memory bank is re-encoded each time.
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

    def __call__(self, task, ctx) -> dict[str, float] | None:
        if (ctx.epoch + 1) % self.every:
            return None
        metrics = knn_accuracy(
            task.model, self.train, self.test, ctx.runtime, k=self.k, temperature=self.temperature, pool=self.pool,
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

    def run(self, model: nn.Module, ctx) -> dict[str, float]:
        return evaluate(model, self.dataset, ctx.runtime, batch_size=self.settings.batch_size, num_workers=self.num_workers)

    def on_epoch_end(self, model: nn.Module, ctx) -> dict[str, float] | None:
        every = self.settings.every
        if every == 0 or (ctx.epoch + 1) % every or ctx.epoch + 1 == self.epochs:
            return None  # the last epoch is evaluated by on_train_end
        return {f"test/{k}": v for k, v in self.run(model, ctx).items() if k != "images"}

    def on_train_end(self, model: nn.Module, ctx) -> dict[str, Any]:
        return {"test": self.run(model, ctx)}
