"""``openmae pretrain``: MAE pretraining from a recipe and flags; ``run_pretrain`` from Python."""

from __future__ import annotations

from typing import Any

from openmae.config import PretrainConfig

DESCRIPTION = "Pretrain a masked autoencoder."
EXAMPLES = """examples:
  openmae pretrain                                   # small MAE on built-in Fashion-MNIST, ~5 min on 2 CPU cores
  openmae pretrain --data ~/photos --img-size 64 --model mae_vit_tiny_patch16 --output runs/photos
  openmae pretrain --config mae_vit_base_in1k --data /datasets/imagenet/train
  torchrun --nproc_per_node=8 -m openmae pretrain --config mae_vit_large_in1k --data /datasets/imagenet/train
"""


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain as configured; returns the run summary (also written to ``summary.json``)."""
    from openmae.runs import run_pretrain as pretrain

    return pretrain(cfg)


def run(cfg: PretrainConfig) -> str:
    summary = run_pretrain(cfg)
    return (
        f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['images_per_s']:.0f} images/s; outputs in {cfg.train.output_dir}"
    )
