"""Tasks: small objects that turn a batch into ``{"loss": ...}`` for the one training engine."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.data import sample_seed
from openmae.masking import sample_mask
from openmae.optim import param_groups


class PretrainTask:
    """MAE pretraining: the loss of the model on a masked batch.

    The mask of each sample is a pure function of (seed, epoch, dataset index), like its
    augmentation (openmae.data), so a run gives the same result on 1 or N processes, with any
    number of data workers, and straight through or resumed.
    """

    def __init__(self, model: nn.Module, mask_ratio: float = 0.75, mask_type: str = "random", seed: int = 0):
        self.model = model
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.seed = seed
        self.hooks: list[Any] = []

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay, skip=self.model.no_weight_decay())

    def masks(self, indices: Tensor, epoch: int) -> dict[str, Tensor]:
        """``noise`` (random) or an explicit ``mask`` (block/grid) for a batch of dataset indices."""
        length = self.model.num_patches
        grid = self.model.grid_size
        g = torch.Generator()
        if self.mask_type == "grid":  # one kept corner per epoch keeps counts equal across the batch
            g.manual_seed(sample_seed(self.seed, epoch, 0, stream=1))
            return {"mask": sample_mask("grid", len(indices), grid, self.mask_ratio, g)}
        rows = []
        for i in indices.tolist():
            g.manual_seed(sample_seed(self.seed, epoch, i, stream=1))
            if self.mask_type == "random":
                rows.append(torch.rand(length, generator=g))
            else:
                rows.append(sample_mask(self.mask_type, 1, grid, self.mask_ratio, g)[0])
        return {"noise": torch.stack(rows)} if self.mask_type == "random" else {"mask": torch.stack(rows)}

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        images = batch.images
        m = {k: v.to(images.device) for k, v in self.masks(batch.indices, epoch).items()}
        out = model(images, self.mask_ratio, **m)
        return {"loss": out.loss}

    def on_train_end(self, ctx) -> None:
        if ctx.dist.is_main and (ctx.out_dir / "metrics.jsonl").exists():
            from openmae.visualize import plot_loss_curve

            plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss_curve.png")

    def on_epoch_end(self, ctx) -> dict[str, float] | None:
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            metrics.update(hook(self, ctx) or {})
        return metrics or None

