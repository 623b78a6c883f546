"""``openmae pretrain``: MAE pretraining from a recipe and flags; ``run_pretrain`` from Python."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from openmae.config import ConfigError, PretrainConfig, add_config_args, config_from_args, to_dict

EXAMPLES = """examples:
  openmae pretrain                                   # small MAE on built-in Fashion-MNIST, ~5 min on 2 CPU cores
  openmae pretrain --data ~/photos --img-size 64 --model mae_vit_tiny_patch16 --output runs/photos
  openmae pretrain --config mae_vit_base_in1k --data /datasets/imagenet/train
  torchrun --nproc_per_node=8 -m openmae pretrain --config mae_vit_large_in1k --data /datasets/imagenet/train
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a masked autoencoder",
        description="Pretrain a masked autoencoder. Settings: dataclass defaults < --config recipe < flags.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, PretrainConfig)
    summary = run_pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['images_per_s']:.0f} images/s; outputs in {cfg.train.output_dir}",
            file=sys.stderr,
        )
    return 0


def build_pretrain_model(cfg: PretrainConfig, channels: int) -> torch.nn.Module:
    from openmae.models import create_model

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
    from openmae.data import build_dataset
    from openmae.engine import Trainer
    from openmae.hooks import ReconstructionHook
    from openmae.tasks import PretrainTask

    dataset = build_dataset(cfg.data, split="train", augment=True, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_pretrain_model(cfg, dataset.channels)
    task = PretrainTask(model, cfg.model.mask_ratio, cfg.model.mask_type, cfg.train.seed)
    if cfg.train.recon_every:
        task.hooks.append(ReconstructionHook(cfg, dataset))
    config = to_dict(cfg)
    config["data"]["mean"], config["data"]["std"] = list(dataset.mean), list(dataset.std)
    trainer = Trainer(task, dataset, cfg.train, cfg.optim, config)
    return trainer.fit()
