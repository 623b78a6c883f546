"""ConvMAE-B vs MAE ViT-B pretraining: images/s and peak memory of a training step at one batch size.

A step is forward + backward + AdamW update on random images, mask ratio 0.75, norm-pix loss.
Each model runs in its own process so its peak memory is its own: on CPU the peak resident set
(``ru_maxrss``) and its rise over the resident set before the first step (activations, gradients and
optimizer state); on GPU ``torch.cuda.max_memory_allocated``.

    python benchmarks/convmae_vs_mae.py                          # 224 px, batch 8, bf16
    python benchmarks/convmae_vs_mae.py --batch 32 --precision fp32 --steps 5
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
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    result = {
        "model": args.worker,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": median,
        "images_per_s": args.batch / median,
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_mib=peak, step_mib=peak - rss_before)
    return result


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
    print(f"{'model':24s} {'params':>8s} {'step s':>8s} {'images/s':>9s}  {memory}")
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
        print(f"{name:24s} {r['params_m']:7.1f}M {r['step_s']:8.2f} {r['images_per_s']:9.2f}  {mem}", flush=True)
    if len(results) == 2:
        a, b = results
        print(f"{a['model']} / {b['model']}: {a['images_per_s'] / b['images_per_s']:.2f}x images/s, "
              f"{a['peak_mib'] / b['peak_mib']:.2f}x peak memory")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
