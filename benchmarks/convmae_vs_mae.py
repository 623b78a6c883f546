"""ConvMAE-B vs MAE ViT-B pretraining: images/s and peak memory of a training step at one batch size.

A step is forward + backward + AdamW update on random images, mask ratio 0.75, norm-pix loss.
Each model runs in its own process so its peak memory is its own: on CPU the peak resident set
(``ru_maxrss``) and its rise over the resident set before the first step (activations, gradients and
optimizer state); on GPU ``torch.cuda.max_memory_allocated``.

    python benchmarks/convmae_vs_mae.py                          # 224 px, batch 8, bf16
    python benchmarks/convmae_vs_mae.py --batch 32 --precision fp32 --steps 5

GFLOP/img (forward + backward of one image, counted by torch.utils.flop_counter) does not depend
on the machine. On a CPU shared with other jobs, ``--threads 1`` gives steadier times: two threads
on two busy cores spend their time waiting for each other.

Measured 2026-11-23 on the 2-core AVX2 development VM (no bf16 hardware: oneDNN emulates bf16 and
runs it 20-100x slower than fp32, so bf16 is not how to train on such a CPU):

    --precision fp32 --threads 1 (2 warm-up + 3 timed steps)
      convmae_base_patch16  135.2 GFLOP/img  17.06 s/step  0.47 images/s  peak RSS 4269 MiB (+3110)
      mae_vit_base_patch16   58.5 GFLOP/img   8.45 s/step  0.95 images/s  peak RSS 3276 MiB (+2128)
    --precision bf16 --warmup 0 --steps 1 (2 threads; a step takes minutes here)
      convmae_base_patch16  703.0 s/step  0.011 images/s  peak RSS 3081 MiB (+1922)
      mae_vit_base_patch16  276.7 s/step  0.029 images/s  peak RSS 3081 MiB (+1933)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ("convmae_base_patch16", "mae_vit_base_patch16")


def measure(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of ``args.worker`` after ``args.warmup`` untimed ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import openmae

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = openmae.create_model(args.worker, img_size=args.img_size, norm_pix_loss=True).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), foreach=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    images = torch.randn(args.batch, model.in_chans, args.img_size, args.img_size, device=device)

    def step() -> float:
        with autocast():
            loss = model(images, mask_ratio=0.75).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises the device

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = {"peak_mib": peak_rss, "step_mib": peak_rss - rss_before}
    # work per image, independent of the machine's load: FLOPs of forward + backward on one image
    with FlopCounterMode(display=False) as flops, autocast():
        model(images[:1], mask_ratio=0.75).loss.backward()
    opt.zero_grad(set_to_none=True)
    return {
        "model": args.worker,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_per_image": flops.get_total_flops() / 1e9,
        "step_s": median,
        "images_per_s": args.batch / median,
        # CPU seconds of all threads: steadier than wall time when other jobs share the cores
        "cpu_s": sorted(cpu_times)[len(cpu_times) // 2],
        **peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registered model names")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    print(f"{args.img_size} px, batch {args.batch}, {args.precision}, {args.device}; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up; mask ratio 0.75")
    memory = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB (step rise)"
    print(f"{'model':24s} {'params':>8s} {'GFLOP/img':>9s} {'step s':>8s} {'images/s':>9s} {'cpu s':>8s}  {memory}")
    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        mem = f"{r['peak_mib']:.0f}" + (f" ({r['step_mib']:+.0f})" if "step_mib" in r else "")
        print(
            f"{name:24s} {r['params_m']:7.1f}M {r['gflop_per_image']:9.1f} {r['step_s']:8.2f} "
            f"{r['images_per_s']:9.2f} {r['cpu_s']:8.2f}  {mem}",
            flush=True,
        )
    if len(results) == 2:
        a, b = results
        print(f"{a['model']} / {b['model']}: {a['images_per_s'] / b['images_per_s']:.2f}x images/s, "
              f"{a['gflop_per_image'] / b['gflop_per_image']:.2f}x FLOPs, "
              f"{a['peak_mib'] / b['peak_mib']:.2f}x peak memory")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
