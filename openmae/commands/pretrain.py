"""``openmae pretrain``: MAE pretraining from a recipe and flags; ``run_pretrain`` from Python."""

from __future__ import annotations

from typing import Any

from openmae.config import ConfigError, PretrainConfig, check_output_dir

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

    check_pretrain(cfg)
    return pretrain(cfg)


def check_pretrain(cfg: PretrainConfig) -> None:
    """What can be checked before any work or any write: the output folder can be written, the
    model builds with its overrides, and the mask ratio leaves the encoder a visible patch of the
    model's grid (the number of patches depends on the model and the image size, so the settings
    alone cannot say)."""
    from openmae.masking import largest_mask_ratio, num_kept
    from openmae.reconstruction import display_bands

    check_output_dir(cfg.train.output_dir, "train.output_dir")
    if cfg.train.recon_bands is not None:
        try:
            display_bands(cfg.data.num_channels(), cfg.train.recon_bands)
        except ValueError as e:
            raise ConfigError(f"train.recon_bands: {e}") from None
    model = _shapes_only(cfg)
    if cfg.model.mask_type == "grid":  # removes 3 of every 4 patches whatever the ratio
        return
    length = model.num_patches
    try:
        num_kept(length, cfg.model.mask_ratio)
    except ValueError:
        grid = "x".join(map(str, model.grid_size))
        raise ConfigError(
            f"model.mask_ratio {cfg.model.mask_ratio} leaves no visible patch: {cfg.model.name} at "
            f"{cfg.model.kwargs.get('img_size', cfg.data.img_size)} px has a {grid} grid of {length} patches and keeps int({length} x "
            f"(1 - {cfg.model.mask_ratio})) = 0 of them; use --mask-ratio {largest_mask_ratio(length)} or lower"
        ) from None


def _shapes_only(cfg: PretrainConfig) -> Any:
    """The run's model with its shapes but (where its constructor allows) no memory: on the meta
    device, else on the CPU without touching the global RNG."""
    import torch

    from openmae.runs import build_pretrain_model

    try:
        with torch.device("meta"):
            return build_pretrain_model(cfg, cfg.data.num_channels())
    except NotImplementedError:  # a constructor that reads a tensor's values
        with torch.random.fork_rng(devices=[]):
            return build_pretrain_model(cfg, cfg.data.num_channels())


def run(cfg: PretrainConfig) -> str:
    summary = run_pretrain(cfg)
    loss = summary["final_loss"]  # null in summary.json when no loss was logged
    return (
        f"done: {summary['steps']} steps, final loss {'n/a' if loss is None else f'{loss:.4f}'}, "
        f"{summary['images_per_s']:.0f} images/s; outputs in {cfg.train.output_dir}"
    )
