"""Tasks: small objects that turn a batch into ``{"loss": ...}`` for the one training engine.
What runs beside training (evaluation, figures) is a hook, in openmae.hooks.

- :class:`PretrainTask`: the masked-image-modelling loss on a batch masked per (seed, epoch, index).
- :class:`FinetuneTask` (end-to-end or partial fine-tuning: layer-wise lr decay, mixup/cutmix,
  label smoothing; :func:`freeze_for_tuning`) and :class:`LinearProbeTask` (frozen encoder,
  BatchNorm + linear head, LARS).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from openmae.config import ConfigError
from openmae.data import sample_seed
from openmae.eval_config import FinetuneSettings, LinprobeSettings, parse_tune_blocks
from openmae.masking import sample_mask
from openmae.optim import build_adamw, param_groups
from openmae.transforms import seeded_host_rngs


class PretrainTask:
    """MAE pretraining: the loss of the model on a masked batch.

    The mask of each sample is a pure function of (seed, epoch, dataset index), like its
    augmentation (openmae.data), so a run gives the same result on 1 or N processes, with any
    number of data workers, and straight through or resumed.
    """

    name = "pretrain"

    def __init__(self, model: nn.Module, mask_ratio: float = 0.75, mask_type: str = "random", seed: int = 0):
        self.model = model
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.seed = seed

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


class FinetuneTask:
    """Fine-tuning (end-to-end or partial): cross-entropy with label smoothing, or on mixup/cutmix
    soft targets; layer-wise lr decay through timm's parameter groups.

    Mixing draws from NumPy's generator, seeded per step from (seed, epoch, first index of the
    batch), so a run and its resumed copy mix the same way.
    """

    name = "finetune"

    def __init__(self, model: nn.Module, settings: FinetuneSettings, seed: int = 0) -> None:
        self.model = model
        self.settings = settings
        self.seed = seed
        self.trainable = freeze_for_tuning(model, settings.tune_blocks)
        self.mixup = None
        if settings.mixing():
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=settings.mixup,
                cutmix_alpha=settings.cutmix,
                prob=settings.mixup_prob,
                switch_prob=settings.mixup_switch_prob,
                mode="batch",
                label_smoothing=settings.smoothing,
                num_classes=model.num_classes,
            )

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Per-layer groups: lr scale ``layer_decay ** (depth + 1 - layer)``, layer 0 the patch
        embedding and tokens, layer i block i - 1, the last the head (timm's grouping, whose final
        norm shares the last block's rate). The engine multiplies ``lr_scale`` into the schedule."""
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(
            self.model,
            weight_decay,
            no_weight_decay_list=sorted(self.model.no_weight_decay()),
            layer_decay=self.settings.layer_decay,
        )

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        images, labels = batch.images, batch.labels
        if self.mixup is None:
            logits = model(images)
            return {"loss": F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.smoothing)}
        if len(images) % 2:  # batch mixing pairs image i with image N-1-i; a failed load can leave N odd
            images, labels = images[:-1], labels[:-1]
        with seeded_host_rngs(sample_seed(self.seed, epoch, int(batch.indices[0]), stream=2)):
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return {"loss": loss}


class LinearProbeTask:
    """Linear probing: everything but the head frozen; the head is BatchNorm (no affine) + linear,
    trained with LARS as in the paper (or SGD / AdamW)."""

    name = "linprobe"

    def __init__(self, model: nn.Module, settings: LinprobeSettings) -> None:
        self.model = model
        self.settings = settings
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def build_optimizer(self, groups: list[dict], lr: float, optim_cfg) -> torch.optim.Optimizer:
        if self.settings.optimizer == "adamw":
            return build_adamw(groups, lr, optim_cfg.betas)
        clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(clean, lr=lr, momentum=self.settings.momentum)
        from timm.optim import Lars

        for g in clean:
            # LARS scales the update of weight matrices by trust x |w| / |g|; biases take plain
            # momentum SGD (the reference excludes 1-D parameters), whatever the weight decay.
            g["always_adapt"] = all(p.ndim > 1 for p in g["params"])
        return Lars(clean, lr=lr, momentum=self.settings.momentum, trust_coeff=0.001)

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        logits = model(batch.images)
        return {"loss": F.cross_entropy(logits.float(), batch.labels)}


def freeze_for_tuning(model: nn.Module, tune_blocks: str | int) -> list[str]:
    """Partial fine-tuning: freeze all but the last K blocks, or all but the last block's MLP half.

    The blocks are the model's ``tunable_blocks()`` (a ViT's blocks, ConvViT's stage-3 blocks);
    of its ``readout_modules()``, the last two (``fc_norm``, the head) always train and any before
    them (a final ``norm``) train with any block. ``all`` freezes nothing (the fixed position table
    stays fixed). Returns the names left trainable.
    """
    spec = parse_tune_blocks(tune_blocks)
    if spec == "all":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = model.tunable_blocks()
    depth = len(blocks)
    *trunk_end, fc_norm, head = model.readout_modules()
    if spec == "mlp":
        tuned = [blocks[-1].norm2, blocks[-1].mlp, *trunk_end] if depth else []
    else:
        if spec > depth:
            raise ConfigError(f"finetune.tune_blocks {spec} is more than the model's {depth} blocks")
        tuned = blocks[depth - spec :] + (trunk_end if spec else [])
    train = {id(p) for m in (*tuned, fc_norm, head) for p in m.parameters()}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = id(p) in train
        if p.requires_grad:
            trainable.append(name)
    return trainable
