"""``openmae embed``: features of a folder of images, written with their paths."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXAMPLES = """examples:
  openmae embed photos/ --checkpoint runs/pretrain --out photos.safetensors
  openmae embed photos/ --checkpoint mae_pretrain_vit_base.pth --pool avg --out photos.npy   # + photos.paths.txt
"""
OUTPUT_SUFFIXES = (".safetensors", ".npy")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="features of a folder of images, to safetensors or .npy",
        description="Encode every image under a folder (recursively, sorted by path) with a frozen encoder. "
        ".safetensors: tensor 'features' (N, D) and metadata 'openmae', JSON with 'paths' and how they were made; "
        ".npy: the (N, D) array, and the paths one per line in NAME.paths.txt. Deterministic: the same "
        "inputs and settings give the same bytes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output file: .safetensors or .npy")
    p.add_argument("--checkpoint", help="the encoder: anything openmae.load_pretrained reads")
    p.add_argument("--model", help="architecture for a random-initialisation baseline (no --checkpoint)")
    p.add_argument("--pool", choices=("auto", "token", "avg"), default="auto",
                   help="token: the cls token; avg: the mean patch token; auto (default): token where the encoder "
                   "has a cls token, else avg (ConvMAE)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the checkpoint's)")
    p.add_argument("--crop-pct", type=float, default=1.0, help="resize to img_size / crop_pct, then center-crop")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: the checkpoint's run, "
                   "else ImageNet for RGB, Fashion-MNIST for grayscale)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (see --mean)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (does not change the result)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="fp32 (default) for exact features; bf16/fp16 autocast for speed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = embed_folder(
        args.folder, args.out, checkpoint=args.checkpoint, model_name=args.model, pool=args.pool,
        img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std, batch_size=args.batch_size,
        precision=args.precision, device=args.device, num_workers=args.num_workers, progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"embed: {out['count']} x {out['dim']} features in {out['path']}", file=sys.stderr)
    return 0


def _normalization(checkpoint: str | None, channels: int) -> tuple[list[float], list[float]]:
    """The checkpoint's training normalisation (its metadata, or its run's config.yaml), else defaults."""
    from openmae.data import default_normalization
    from openmae.reconstruction import checkpoint_normalization

    if checkpoint is not None:
        found = checkpoint_normalization(checkpoint)
        if found is not None:
            return found
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
    precision: str = "fp32",
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every image under ``folder`` and write features and paths to ``out``.

    Returns ``{"path", "count", "dim", "failed"}``; files that cannot be decoded are left out
    and listed in ``failed``.
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
    model_cfg = ProbeEncoderConfig(checkpoint=checkpoint, name=model_name, global_pool=pool)
    weights = read_encoder(checkpoint)
    _, arch_cfg = encoder_config(model_cfg, weights)
    channels = int(arch_cfg["in_chans"])
    size = img_size or arch_cfg["img_size"]
    size = size if isinstance(size, int) else int(size[0])
    default_mean, default_std = _normalization(checkpoint, channels)
    mean, std = mean or default_mean, std or default_std
    transform = eval_transform(size, mean, std, crop_pct)
    dataset = ImageDataset([-1] * len(files), transform, channels, mean, std, paths=[str(f) for f in files])

    runtime = Runtime.create(device, precision)
    torch.manual_seed(0)  # a random-initialisation baseline is the same every time
    model = build_feature_model(model_cfg, weights, img_size=size, in_chans=channels).to(runtime.device)
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
