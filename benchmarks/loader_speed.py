"""Input pipeline throughput: openmae's folder loader against the reference PyTorch pipeline.

The reference is what MAE's official code runs: torchvision ``ImageFolder`` (PIL decode, RGB) +
RandomResizedCrop(scale 0.2-1, bicubic) + flip + ToTensor + Normalize, in a DataLoader. openmae is the
real ``build_dataset`` / ``build_loader`` path of ``--dataset folder``, up to normalised float32 batches
(``batch.to("cpu")``; ``--uint8`` also times the uint8 batches a GPU run copies and normalises there).
Both read the same ImageNet-size JPEGs, made here from the photos in ``skimage.data`` (random crops
resized to 500x375 or 375x500, quality 90), with the same number of workers and batch size. Rounds alternate between the pipelines (one epoch
each, workers started each epoch, as both do by default), and the medians are compared.

Two measures: images/s of wall time (per worker: divided by the workers), and images per CPU-second of
all the processes (workers and the main process, from getrusage), which other jobs on a shared machine
disturb much less than wall time.

    python benchmarks/loader_speed.py                      # 2 workers, 224 px
    python benchmarks/loader_speed.py --workers 1 --img-size 112 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry", "cat")


def make_jpegs(root: Path, count: int, classes: int, quality: int, seed: int = 0) -> None:
    """``count`` ImageNet-size JPEGs in ``classes`` class folders: random crops of skimage's photos, resized
    to 500x375 (one in five 375x500, as ImageNet mixes them), saved at ``quality``."""
    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, name)()[..., :3]).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for k in range(count):
        photo = photos[k % len(photos)]
        w, h = photo.size
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (375, 500) if k % 5 == 4 else (500, 375)
        folder = root / f"class_{k % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(folder / f"{k:05d}.jpg", quality=quality)


def reference_loader(root: Path, img_size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def openmae_dataset(root: Path, img_size: int, workers: int, decode: str):
    from openmae.config import DataConfig
    from openmae.data import build_dataset

    cfg = DataConfig(name="folder", path=str(root), img_size=img_size, num_workers=workers, decode=decode)
    return build_dataset(cfg, split="train", augment=True, seed=0)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader's workers, joined at an epoch's end)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed(batches) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of one epoch."""
    wall, cpu, n = time.perf_counter(), cpu_seconds(), 0
    for size in batches:
        n += size
    return time.perf_counter() - wall, cpu_seconds() - cpu, n


def reference_epoch(loader) -> tuple[float, float, int]:
    return timed(images.shape[0] for images, _ in loader)


def openmae_epoch(dataset, batch: int, workers: int, epoch: int, normalize: bool = True) -> tuple[float, float, int]:
    from openmae.data import build_loader

    # uint8 batches from the workers, normalised here to the float32 (N, C, H, W) the engine receives on a CPU;
    # normalize=False: the batches as a GPU run copies them (normalised there, by PixelBatch.to)
    loader = build_loader(dataset, batch, num_workers=workers, epoch=epoch)
    return timed(len(b.to("cpu")) if normalize else len(b) for b in loader)


def fast_vs_exact(root: Path, img_size: int, count: int) -> tuple[float, float]:
    """Mean and max absolute difference, in 0-255 levels, between the fast and exact decode of the same samples."""
    fast, exact = openmae_dataset(root, img_size, 0, "fast"), openmae_dataset(root, img_size, 0, "exact")
    diffs = [(fast.sample(i, normalize=False)[0].float() - exact.sample(i, normalize=False)[0].float()).abs()
             for i in range(min(count, len(fast)))]
    return float(torch.stack(diffs).mean()), float(max(d.max() for d in diffs))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="JPEGs to make (one epoch reads them all)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader processes, the same for both pipelines")
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each pipeline, alternating")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--exact", action="store_true", help="also time openmae with --data.decode exact")
    parser.add_argument(
        "--uint8", action="store_true",
        help="also time openmae's batches as a GPU run receives them: uint8, to be normalised on the GPU",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only receives (and normalises) batches

    import PIL
    import simplejpeg
    import torchvision

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root, args.images, classes=8, quality=args.quality)
        size_kb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / args.images / 1024
        print(f"{args.images} JPEGs (500x375 / 375x500, quality {args.quality}, {size_kb:.0f} KiB on average), "
              f"RandomResizedCrop {args.img_size}, batch {args.batch}, {args.workers} workers, {args.rounds} rounds")
        reference = reference_loader(root, args.img_size, args.batch, args.workers)
        variants = {"reference": lambda r: reference_epoch(reference)}
        fast = openmae_dataset(root, args.img_size, args.workers, "fast")
        variants["openmae"] = lambda r: openmae_epoch(fast, args.batch, args.workers, r)
        if args.uint8:
            variants["openmae, uint8 batches"] = lambda r: openmae_epoch(fast, args.batch, args.workers, r, False)
        if args.exact:
            exact = openmae_dataset(root, args.img_size, args.workers, "exact")
            variants["openmae, decode exact"] = lambda r: openmae_epoch(exact, args.batch, args.workers, r)
        wall: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
            for name in names:
                wall_s, cpu_s, n = variants[name](r)
                wall[name].append(n / wall_s)
                cpu[name].append(n / cpu_s)
        workers = max(1, args.workers)
        print(f"{'pipeline':24s} {'images/s':>9s} {'per worker':>11s} {'ratio':>6s}   {'per CPU-s':>9s} {'ratio':>6s}"
              "   rounds (images/s)")
        base_wall, base_cpu = statistics.median(wall["reference"]), statistics.median(cpu["reference"])
        for name in variants:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"{name:24s} {w:9.1f} {w / workers:11.1f} {w / base_wall:5.2f}x   {c:9.1f} {c / base_cpu:5.2f}x   "
                  + " ".join(f"{v:.0f}" for v in wall[name]))
        print(f"load average while it ran: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
        mean_diff, max_diff = fast_vs_exact(root, args.img_size, 64)
        print(f"fast vs exact decode, same 64 samples before normalisation: mean |diff| {mean_diff:.3f} levels "
              f"(max {max_diff:.0f}) of 255")


if __name__ == "__main__":
    main()
