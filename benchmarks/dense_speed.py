"""Semantic-segmentation training speed and peak memory: ViT-B and ConvViT-B with UperNet at 512 px.

The models are the ones ``openmae segment`` trains, from the same builders
(:func:`openmae.dense.models.build_dense_encoder`, :class:`~openmae.dense.models.Segmentor`): a plain
ViT through ViTDet's simple pyramid (strides 4-32) with window attention in all blocks but the last of
each quarter, ConvViT through its own stages with window attention in stage 3 (ConvMAE's detection
setting), UperNet over 150 classes as for ADE20K. A step is forward + backward + AdamW update (the
engine's fused AdamW over layer-wise-decay groups) on random images and label maps.

Each model runs in its own process so its peak memory is its own: on CPU the peak resident set
(``ru_maxrss``) and its rise over the resident set before the first step; on GPU
``torch.cuda.max_memory_allocated``. GFLOP/img (forward + backward of one image, counted by
torch.utils.flop_counter) does not depend on the machine.

    python benchmarks/dense_speed.py                                   # GPU: batch 8, bf16
    python benchmarks/dense_speed.py --device cpu --batch-size 1 --steps 2 --warmup 1 --precision fp32
    python benchmarks/dense_speed.py --models vit_base_patch16 --window-size 0   # global attention

Measured 2026-11-25 on the 2-core AMD EPYC development VM (AVX2, shared with other jobs: wall time
varies with their load, cpu s less), ``--device cpu --batch-size 2 --steps 2 --warmup 1 --threads 1
--precision fp32``; params include the pyramid and UperNet (512 channels):

    vit_base_patch16      120.9M  2138.4 GFLOP/img  109.34 s/step  0.018 img/s  cpu 69.93 s  peak RSS 7453 MiB (+6265)
    convvit_base_patch16  117.1M  2430.7 GFLOP/img  100.08 s/step  0.020 img/s  cpu 75.22 s  peak RSS 8477 MiB (+7302)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ("vit_base_patch16", "convvit_base_patch16")


def build(args: argparse.Namespace):
    """(segmentor, optimizer) for ``args.worker`` as ``openmae segment`` builds them."""
    from openmae.dense.models import Segmentor, build_dense_encoder
    from openmae.models.vit import ViTEncoder
    from openmae.optim import build_adamw

    encoder_options = {} if args.worker.startswith("vit_") else {"window_size": args.window_size}
    encoder = build_dense_encoder(args.worker, args.img_size, 3, drop_path_rate=0.1, **encoder_options)
    pyramid_options = {"window_size": args.window_size} if isinstance(encoder, ViTEncoder) else {}
    model = Segmentor(
        encoder, args.classes, head=args.head, channels=args.channels, norm=args.norm, **pyramid_options
    )
    groups = model.param_groups(weight_decay=0.05, layer_decay=0.65)
    return model, build_adamw(groups, lr=1e-4, betas=(0.9, 0.999))


def measure(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of ``args.worker`` after ``args.warmup`` untimed ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from openmae.precision import resolve_precision

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, opt = build(args)
    model = model.to(device).train()
    precision = resolve_precision(args.precision, device)
    scaler = precision.scaler()
    size = (args.batch_size, args.img_size, args.img_size)
    images = torch.randn(size[0], 3, *size[1:], device=device)
    labels = torch.randint(0, args.classes, size, device=device)
    labels[:, : args.img_size // 8] = 255  # a band of ignored pixels, as ADE20K's unlabelled ones

    def step() -> float:
        with precision.autocast():
            logits = model(images)  # (N, K, H, W)
        loss = model.loss(logits, labels)  # fp32
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
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
    gflop = None
    if args.flops:  # one more forward + backward (of the whole batch: BatchNorm needs two images or more)
        with FlopCounterMode(display=False) as flops, precision.autocast():
            model.loss(model(images), labels).backward()
        opt.zero_grad(set_to_none=True)
        gflop = flops.get_total_flops() / 1e9 / args.batch_size
    return {
        "model": args.worker,
        "precision": precision.name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        "gflop_per_image": gflop,
        "step_s": median,
        "images_per_s": args.batch_size / median,
        # CPU seconds of all threads: steadier than wall time when other jobs share the cores
        "cpu_s": sorted(cpu_times)[len(cpu_times) // 2],
        **peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="encoders: vit_*, convvit_* or swin_* names (`openmae models`)")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast as the engine picks it (auto: bf16 on GPUs, fp32 on CPUs without fast bf16)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--classes", type=int, default=150, help="classes of the label maps (ADE20K: 150)")
    p.add_argument("--head", default="upernet", choices=["upernet", "fpn"])
    p.add_argument("--channels", type=int, default=512, help="the head's width (the papers' UperNet: 512)")
    p.add_argument("--norm", default="bn", choices=["bn", "gn"], help="the head's normalisation")
    p.add_argument("--window-size", type=int, default=14,
                   help="window attention side in tokens (ViTDet's 14; 0: global attention everywhere)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (one more step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    attention = f"window {args.window_size}" if args.window_size else "global attention"
    print(f"segmentation, {args.head} ({args.channels} ch, {args.norm}) over {args.classes} classes, "
          f"{args.img_size} px, batch {args.batch_size}, {args.precision}, {args.device}, {attention}; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up")
    memory = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB (step rise)"
    print(f"{'model':22s} {'params':>8s} {'GFLOP/img':>9s} {'s/step':>8s} {'images/s':>9s} {'cpu s':>8s}  {memory}")
    for name in args.models:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mem = f"{r['peak_mib']:.0f}" + (f" ({r['step_mib']:+.0f})" if "step_mib" in r else "")
        gflop = "-" if r["gflop_per_image"] is None else f"{r['gflop_per_image']:.1f}"
        print(
            f"{name:22s} {r['params_m']:7.1f}M {gflop:>9s} {r['step_s']:8.2f} {r['images_per_s']:9.3f} "
            f"{r['cpu_s']:8.2f}  {mem}   ({r['precision']})",
            flush=True,
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
