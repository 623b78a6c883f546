"""``openmae embed``: features of a folder of images, written with their paths."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmae.config import REQUIRED, check_choices, device_opt, opt, precision_opt

DESCRIPTION = (
    "Encode every image under a folder (recursively, sorted by path) with a frozen encoder. .safetensors: tensor "
    "'features' (N, D) and metadata 'openmae', JSON with 'paths' and how they were made; .npy: the (N, D) array, "
    "and the paths one per line in NAME.paths.txt. Deterministic: the same inputs and settings give the same bytes "
    "(--precision fp32 gives exact features)."
)
EXAMPLES = """examples:
  openmae embed photos/ --checkpoint runs/pretrain --out photos.safetensors
  openmae embed photos/ --checkpoint mae_pretrain_vit_base.pth --pool avg --out photos.npy   # + photos.paths.txt
"""
OUTPUT_SUFFIXES = (".safetensors", ".npy")


@dataclass
class EmbedSettings:
    """Settings of ``openmae embed``."""

    folder: str = opt(REQUIRED, "folder of images (searched recursively)", positional=True)
    out: str = opt(REQUIRED, "output file: .safetensors or .npy")
    checkpoint: str | None = opt(None, "the encoder: anything openmae.load_pretrained reads")
    model: str | None = opt(None, "architecture for a random-initialisation baseline (no --checkpoint)")
    pool: str = opt(
        "auto", "token: the cls token; avg: the mean patch token; auto: token where the encoder has a cls token, "
        "else avg (ConvMAE)", choices=("auto", "token", "avg"),
    )
    img_size: int | None = opt(None, "input resolution (default: the checkpoint's)")
    crop_pct: float = opt(1.0, "resize to img_size / crop_pct, then center-crop")
    mean: list[float] | None = opt(
        None, "normalisation mean (default: the checkpoint's run, else ImageNet for RGB, Fashion-MNIST for grayscale)"
    )
    std: list[float] | None = opt(None, "normalisation std (see --mean)")
    batch_size: int = opt(64, "images per batch (does not change the result)")
    precision: str = precision_opt()
    device: str = device_opt()
    num_workers: int = opt(2, "data-loading processes")
    progress: bool = opt(True, "show a progress bar")
    allow_partial: bool = opt(
        False, "use a checkpoint that lacks encoder tensors: they keep their initial values, and a line on stderr "
        "names them (default: refuse it, naming them)"
    )

    def __post_init__(self) -> None:
        check_choices(self, "embed")


def run(s: EmbedSettings) -> str:
    out = embed_folder(
        s.folder, s.out, checkpoint=s.checkpoint, model_name=s.model, pool=s.pool, img_size=s.img_size,
        crop_pct=s.crop_pct, mean=s.mean, std=s.std, batch_size=s.batch_size, precision=s.precision, device=s.device,
        num_workers=s.num_workers, progress=s.progress, allow_partial=s.allow_partial,
    )
    return f"embed: {out['count']} x {out['dim']} features in {out['path']}"


def _normalization(checkpoint: str | None, channels: int) -> tuple[list[float], list[float]]:
    """The checkpoint's training normalisation (its metadata, or its run's config.yaml), else defaults."""
    from openmae.config import ConfigError
    from openmae.data import default_normalization
    from openmae.reconstruction import checkpoint_normalization

    if checkpoint is not None:
        found = checkpoint_normalization(checkpoint)
        if found is not None:
            return found
    if channels not in (1, 3):
        raise ConfigError(
            f"{checkpoint or 'a random encoder'} records no normalisation for its {channels} bands; pass --mean and "
            f"--std ({channels} values each: the pretraining run's config.yaml data.mean / data.std)"
        )
    mean, std = default_normalization(channels)
    return list(mean), list(std)


def embed_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    model_name: str | None = None,
    pool: str = "auto",
    img_size: int | None = None,
    crop_pct: float = 1.0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = False,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Encode every image under ``folder`` and write features and paths to ``out``.

    Returns ``{"path", "count", "dim", "failed"}``; files that cannot be decoded are left out
    and listed in ``failed``. ``precision="fp32"`` gives exact features; ``auto`` may pick bf16.
    A checkpoint that lacks encoder tensors is refused (naming them) unless ``allow_partial``.
    """
    from openmae.config import ConfigError
    from openmae.data import ImageDataset, find_images
    from openmae.distributed import barrier
    from openmae.eval_config import ProbeEncoderConfig
    from openmae.inference import extract_features
    from openmae.interop.classifier import build_feature_model, encoder_config, read_encoder
    from openmae.io import atomic_write
    from openmae.runtime import Runtime
    from openmae.transforms import eval_transform

    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out}")
    if not Path(folder).is_dir():
        raise ConfigError(f"{folder} is not a folder")
    files = find_images(folder)
    if not files:
        raise ConfigError(f"no images under {folder}")
    model_cfg = ProbeEncoderConfig(
        checkpoint=checkpoint, name=model_name, global_pool=pool, allow_partial=allow_partial
    )
    weights = read_encoder(checkpoint)
    _, arch_cfg = encoder_config(model_cfg, weights)
    channels = int(arch_cfg["in_chans"])
    size = img_size or arch_cfg["img_size"]
    size = size if isinstance(size, int) else int(size[0])
    if not (mean and std):
        default_mean, default_std = _normalization(checkpoint, channels)
        mean, std = mean or default_mean, std or default_std
    transform = eval_transform(size, mean, std, crop_pct, channels=channels)
    dataset = ImageDataset([-1] * len(files), transform, channels, mean, std, paths=[str(f) for f in files])

    runtime = Runtime.create(device, precision)
    torch.manual_seed(0)  # a random-initialisation baseline is the same every time
    model = build_feature_model(model_cfg, weights, img_size=size, in_chans=channels).to(runtime.device)
    partial = model.load_report.partial_line() if model.load_report is not None else None
    if partial is not None and runtime.is_main:
        print(f"embed: {checkpoint}: {partial}", file=sys.stderr)
    features, ok = extract_features(
        model, dataset, runtime, pool=pool, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    paths = [p for p, good in zip(dataset.paths, ok.tolist()) if good]
    failed = [p for p, good in zip(dataset.paths, ok.tolist()) if not good]
    features = features[ok].contiguous()
    info = {
        "checkpoint": checkpoint, "model": model.arch, "pool": model.global_pool, "img_size": size, "crop_pct": crop_pct,
        "mean": list(mean), "std": list(std), "precision": precision, "failed": failed,
    }
    if runtime.is_main:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            # one metadata entry: safetensors writes several in a random order, and the bytes must not vary
            meta = {"openmae": json.dumps({"paths": paths, **info})}
            atomic_write(out, lambda tmp: save_file({"features": features}, tmp, metadata=meta))
        else:
            def write_npy(tmp: str) -> None:
                with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                    np.save(f, features.numpy())

            atomic_write(out, write_npy)
            listing = "".join(p + "\n" for p in paths)
            atomic_write(out.with_suffix(".paths.txt"), lambda tmp: Path(tmp).write_text(listing))
        for p in failed[:20]:
            print(f"embed: could not decode {p}", file=sys.stderr)
    barrier(runtime.dist)
    return {"path": str(out), "count": len(paths), "dim": int(features.shape[1]), "failed": failed}
