"""What runs beside training, at the end of an epoch or of the run: reconstruction figures, the loss
curve, a kNN monitor of the encoder, held-out evaluation of a classifier.

Each is a hook for :class:`openmae.engine.Trainer` (``hooks=[...]``): an object with an optional
``on_epoch_end(ctx)`` returning metrics to log and an optional ``on_train_end(ctx)`` returning
summary fields, ``ctx`` being the engine's :class:`~openmae.engine.RunContext` (``ctx.model`` is
the plain module being trained).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from openmae.config import ConfigError, PretrainConfig
from openmae.data import ImageDataset, build_dataset, labelled_splits
from openmae.engine import RunContext
from openmae.eval_config import EvalSettings
from openmae.inference import evaluate, knn_accuracy
from openmae.transforms import eval_transform
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
        self.bands = cfg.train.recon_bands

    def on_epoch_end(self, ctx: RunContext) -> None:
        epoch = ctx.epoch + 1
        if ctx.runtime.is_main and epoch % self.every == 0:
            log_reconstructions(ctx.model, self.images.to(ctx.runtime.device), ctx.writer, ctx.out_dir, epoch,
                                self.mean, self.std, mask_ratios=self.mask_ratio, mask_type=self.mask_type,
                                seed=self.seed, bands=self.bands)


class LossCurvePlot:
    """At the end of the run, ``loss_curve.png`` from metrics.jsonl."""

    def on_train_end(self, ctx: RunContext) -> None:
        metrics = ctx.out_dir / "metrics.jsonl"
        if ctx.runtime.is_main and metrics.exists():
            plot_loss_curve(metrics, ctx.out_dir / "loss_curve.png")


class KNNMonitor:
    """A pretraining hook: kNN accuracy of the encoder's features every ``every`` epochs, and after
    the last one (``epochs``) whatever ``every`` says.

    The engine logs what it returns (``knn/top1``, ``knn/top5``) to metrics.jsonl and TensorBoard;
    the run's summary gets ``knn`` (the last evaluation, and at which step). Use small splits
    (``DataConfig(limit=...)``): the memory bank is re-encoded each time. Evaluating draws nothing
    from the global random generators (their state is restored after), so the trained weights are
    the same with the monitor on or off.

    Args:
        train, test: labelled memory bank and queries, both with the evaluation transform.
        every: evaluate every N epochs. epochs: the run's epoch count (None: no extra evaluation at the end).
        k, temperature: the vote (see :func:`openmae.inference.knn_classify`).
        pool: ``token`` (cls token), ``avg`` (mean patch token) or ``auto`` (token where the model has one).
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
        epochs: int | None = None,
    ) -> None:
        self.train, self.test = train, test
        self.every, self.k, self.temperature, self.pool, self.batch_size = every, k, temperature, pool, batch_size
        self.epochs = epochs
        self.last: dict[str, Any] | None = None  # the latest evaluation, with its step

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> KNNMonitor:
        """The monitor ``cfg.train.knn_*`` describe, on the first ``knn_limit`` images of each labelled
        split of ``cfg.data`` (a ConfigError naming the flag for unlabelled data or no held-out split)."""
        train_cfg = cfg.train
        limit = train_cfg.knn_limit
        if cfg.data.limit is not None:
            limit = cfg.data.limit if limit is None else min(limit, cfg.data.limit)
        data = dataclasses.replace(cfg.data, limit=limit)
        try:
            bank, queries = labelled_splits(data, train_cfg.seed, "the kNN monitor")
        except ConfigError as e:
            raise ConfigError(f"train.knn_every: {e}") from None
        bank.transform = eval_transform(data.img_size, bank.mean, bank.std)  # the memory bank is not augmented
        return cls(bank, queries, every=train_cfg.knn_every, k=train_cfg.knn_k, pool=train_cfg.knn_pool,
                   epochs=train_cfg.epochs)

    def evaluate(self, ctx: RunContext) -> dict[str, Any]:
        model = ctx.model
        pool = self.pool
        if pool == "auto":
            pool = "token" if getattr(model, "num_prefix_tokens", 0) else "avg"
        devices = [ctx.runtime.device] if ctx.runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a DataLoader draws its base seed from the global RNG
            metrics = knn_accuracy(
                model, self.train, self.test, ctx.runtime, k=self.k, temperature=self.temperature, pool=pool,
                batch_size=self.batch_size,
            )
        self.last = {"top1": metrics["top1"], "top5": metrics["top5"], "step": ctx.step, "k": self.k, "pool": pool,
                     "images": metrics["images"], "memory": metrics["memory"]}
        return self.last

    def on_epoch_end(self, ctx: RunContext) -> dict[str, float] | None:
        epoch = ctx.epoch + 1
        if epoch % self.every and epoch != self.epochs:
            return None
        metrics = self.evaluate(ctx)
        return {"knn/top1": metrics["top1"], "knn/top5": metrics["top5"]}

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        if self.last is None or self.last["step"] != ctx.step:  # stopped by max_steps, or resumed past the last
            metrics = self.evaluate(ctx)
            if ctx.writer is not None:
                ctx.writer.add_scalar("knn/top1", metrics["top1"], ctx.step)
        return {"knn": self.last}


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
