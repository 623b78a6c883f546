"""MAE pretraining on a GPU from JPEG files: images/s, model FLOP utilisation, and the share of each step spent
waiting for data (and moving it to the device), with JPEGs decoded by the loader's CPU workers (``--data.decode fast``) or by nvJPEG on the
GPU (``--data.decode gpu``).

The images are ImageNet-size JPEGs (500x375 or 375x500, quality 90) made here from the photos that ship with
scikit-image, in a temporary folder, read through openmae's own dataset and loader (RandomResizedCrop 224 +
flip, seeded per sample, pinned memory). A step is what the engine does: the batch to the device (decoded there
for ``gpu``), forward and backward under bf16 autocast, fused AdamW. Each step ends with a CUDA synchronise,
so the time blocked in ``next(loader)`` is time the GPU sat idle waiting for data.

- FLOPs: counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward
  (matmuls and attention; the optimizer's elementwise work is not counted), at 75% masking.
- MFU: FLOPs per step / step time / the GPU's dense bf16 peak (a table by device name, or ``--peak-tflops``).

    python benchmarks/gpu_pretrain.py                    # ViT-B and ViT-L, batch 256, 8 workers, fast and gpu
    python benchmarks/gpu_pretrain.py --models mae_vit_base_patch16 --workers 4 --compile
    python benchmarks/gpu_pretrain.py --smoke            # tiny model on the CPU, 2 steps: the script works
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import openmae
from openmae.config import DataConfig
from openmae.data import EncodedBatch, build_dataset, build_loader
from openmae.optim import build_adamw, param_groups

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")
DISTINCT_JPEGS = 1024  # files beyond these are hard links to them: one epoch covers every step, at no disk cost

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s; the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def make_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEG files in 10 class folders: random crops of scikit-image's photos resized to 500x375 (one in
    five 375x500), quality 90; past ``DISTINCT_JPEGS`` they are hard links to the first ones."""
    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, name)()[..., :3]).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    files = []
    for k in range(count):
        path = root / f"class_{k % 10}" / f"{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if k >= DISTINCT_JPEGS:
            os.link(files[k % DISTINCT_JPEGS], path)
            continue
        photo = photos[k % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (375, 500) if k % 5 == 4 else (500, 375)
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(path, quality=90)
        files.append(path)


def count_flops(model: torch.nn.Module, images: torch.Tensor, mask_ratio: float, autocast) -> int:
    """FLOPs of one forward and backward of ``model`` on ``images`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = model(images, mask_ratio=mask_ratio).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(args: argparse.Namespace, model_name: str, decode: str, root: Path, device: torch.device) -> dict:
    """Time ``args.steps`` steps after ``args.warmup``; returns the figures of one row."""
    torch.manual_seed(0)
    cfg = DataConfig(name="folder", path=str(root), img_size=args.img_size, decode=decode, num_workers=args.workers)
    dataset = build_dataset(cfg, "train", augment=True, seed=0)
    loader = build_loader(
        dataset, args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda", shuffle=True, seed=0
    )
    model = openmae.create_model(model_name, img_size=args.img_size, norm_pix_loss=True).to(device)
    optimizer = build_adamw(param_groups(model, 0.05, model.no_weight_decay()), 1.5e-4, (0.9, 0.95))
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    sample = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    flops = count_flops(model, sample, args.mask_ratio, autocast)
    del sample
    step_model = torch.compile(model) if args.compile else model

    batches = iter(loader)
    waits, decodes, steps, images = [], [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        if isinstance(batch, EncodedBatch):  # decode gpu: nvJPEG on the batch, then the drawn crops
            batch = batch.decoded(device)
        batch = batch.to(device, non_blocking=True)
        sync()
        decoded = time.perf_counter()
        with autocast():
            loss = step_model(batch.images, mask_ratio=args.mask_ratio).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        if i >= args.warmup:
            waits.append(fetched - start)
            decodes.append(decoded - fetched)
            steps.append(end - start)
            images += len(batch)
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"{model_name}: the loss is {loss.item()}")
    total = sum(steps)
    peak = peak_flops(device, args.peak_tflops)
    return {
        "model": model_name,
        "decode": decode,
        "images_per_s": images / total,
        "step_ms": 1e3 * statistics.median(steps),
        "gflop_per_image": flops / args.batch_size / 1e9,
        "tflops": flops * len(steps) / total / 1e12,
        "mfu": flops * len(steps) / total / peak if peak else None,
        "wait": sum(waits) / total,
        "to_device": sum(decodes) / total,  # the copy and normalisation; with decode gpu, nvJPEG and the crops too
        "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mae_vit_base_patch16", "mae_vit_large_patch16"])
    parser.add_argument("--decode", nargs="+", default=["fast", "gpu"], choices=["fast", "exact", "gpu"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for the timed steps")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in the table")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, fp32, 2 steps: only checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.img_size, args.batch_size, args.steps, args.warmup = ["mae_vit_tiny_patch16"], 64, 4, 2, 1
        args.workers = min(args.workers, 1)
        device, args.precision = torch.device("cpu"), "fp32"  # bf16 matmuls crawl on CPUs without bf16 units
    elif not torch.cuda.is_available():
        sys.exit("gpu_pretrain.py: no CUDA GPU here; --smoke runs a tiny model on the CPU to check the script")
    else:
        device, args.precision = torch.device("cuda"), "bf16"

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (smoke run on the CPU)"
    print(f"device: {gpu}; CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(
        f"{args.img_size} px, batch {args.batch_size}, {args.precision}, mask {args.mask_ratio}, {args.workers} "
        f"workers, {args.steps} steps after {args.warmup}{', compiled' if args.compile else ''}; "
        f"peak {peak_flops(device, args.peak_tflops) or 'unknown'} FLOP/s"
    )
    print("command: python " + " ".join(sys.argv))
    rows = []
    with tempfile.TemporaryDirectory(prefix="openmae_gpu_bench_") as tmp:
        root = Path(tmp)
        make_jpegs(root, args.batch_size * (args.warmup + args.steps))
        for model_name in args.models:
            for decode in args.decode:
                row = run(args, model_name, decode, root, device)
                rows.append(row)
                print(f"  {model_name} decode {decode}: {row['images_per_s']:.1f} images/s", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print()
    print(
        "| model | decode | images/s | step ms | GFLOP/image | TFLOP/s | MFU | waiting for data | to device | GPU memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['memory_gib']:.1f} GiB" if r["memory_gib"] is not None else "n/a"
        print(
            f"| {r['model']} | {r['decode']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['gflop_per_image']:.1f} | {r['tflops']:.1f} | {mfu} | {100 * r['wait']:.1f}% | {100 * r['to_device']:.1f}% | "
            f"{memory} |"
        )


if __name__ == "__main__":
    main()
