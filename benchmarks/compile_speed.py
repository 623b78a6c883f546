"""Pretraining images/s with and without torch.compile, and with activation checkpointing.

A step is the engine's: a random-mask forward under the run's precision, backward, fused AdamW
over the decay groups, with the model wrapped by :func:`openmae.distributed.parallelize` as
``Trainer`` wraps it (one process: the whole model compiled; checkpointing on every block).

Each model runs in its own process with an empty inductor cache, so the compile time is what a new
run pays. Inside it the modes take turns step by step (eager, compile, eager+ac, compile+ac, then
again), so a machine whose load drifts slows them all alike and the ratios hold.

    python benchmarks/compile_speed.py                                   # CPU, fp32: micro, tiny, small
    python benchmarks/compile_speed.py --device cuda --precision bf16    # GPU: tiny, small, base at 224 px
    python benchmarks/compile_speed.py --models mae_vit_micro_patch4:28:256 --modes eager compile

``compile s``: the first compiled step's time less a steady one's. ``pays back``: the steps after
which the compiled run has caught up (compile s / time saved a step; compile+ac against eager+ac).
``peak MiB`` (GPUs only): the most memory a step allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

MODES = ("eager", "compile", "eager+ac", "compile+ac")
CPU_MODELS = ("mae_vit_micro_patch4:28:256", "mae_vit_tiny_patch16:112:32", "mae_vit_small_patch16:112:32")
GPU_MODELS = ("mae_vit_tiny_patch16:224:256", "mae_vit_small_patch16:224:256", "mae_vit_base_patch16:224:128")
DEFAULT_RUN = ("mae_vit_micro_patch4", 468)  # `openmae pretrain`: 2 epochs of Fashion-MNIST at batch 256


def worker(args: argparse.Namespace) -> dict[str, dict]:
    import torch

    import openmae
    from openmae.distributed import DistInfo, parallelize
    from openmae.optim import build_adamw, param_groups
    from openmae.precision import Precision

    name, img_size, batch = args.model.split(":")
    img_size, batch = int(img_size), int(batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = Precision(args.precision, device)

    def setup(ac: bool):
        torch.manual_seed(0)
        model = openmae.create_model(name, img_size=img_size, norm_pix_loss=True).to(device).train()
        opt = build_adamw(param_groups(model, 0.05, model.no_weight_decay()), 1e-4, (0.9, 0.95))
        compiled = parallelize(model, DistInfo(), device, compile=True, activation_checkpointing=ac).module
        return {"eager": model, "compile": compiled}, opt, model.in_chans

    views, opts, steps = {}, {}, {}
    for ac in (False, True):
        if any(m.endswith("+ac") == ac for m in args.modes):
            built, opt, chans = setup(ac)
            for kind, module in built.items():
                mode = kind + ("+ac" if ac else "")
                views[mode], opts[mode] = module, opt
    images = torch.randn(batch, chans, img_size, img_size, device=device)

    def step(mode: str) -> tuple[float, float]:
        """(seconds, peak MiB allocated on a GPU; 0 on a CPU)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with precision.autocast():
            loss = views[mode](images, mask_ratio=0.75).loss
        loss.backward()
        opts[mode].step()
        opts[mode].zero_grad(set_to_none=True)
        loss.item()  # waits for the step on any device
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
        return time.perf_counter() - t, peak

    first = {mode: step(mode)[0] for mode in args.modes}  # compiles, where compiling
    for _ in range(args.warmup):
        for mode in args.modes:
            step(mode)
    for mode in args.modes:
        steps[mode] = []
    for _ in range(args.steps):
        for mode in args.modes:
            steps[mode].append(step(mode))
    out = {}
    for mode, timed in steps.items():
        seconds = sorted(s for s, _ in timed)
        median = seconds[len(seconds) // 2]
        out[mode] = {"images_per_s": batch / median, "step_s": median, "compile_s": max(first[mode] - median, 0.0),
                     "peak_mib": max(p for _, p in timed)}
    return out


def run_model(spec: str, argv: list[str]) -> dict[str, dict] | None:
    with tempfile.TemporaryDirectory() as cache:
        # an empty cache: the compile time a new run pays (a warm cache hides most of it)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        out = subprocess.run([sys.executable, __file__, *argv, "--worker-model", spec], capture_output=True,
                             text=True, env=env)
    if out.returncode:
        print(f"  {spec}: failed\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--models", nargs="+", help="NAME:IMG_SIZE:BATCH (default: three sizes for the device)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=5, help="timed rounds, one step of each mode a round (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first (compiling) one")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_model:
        args.model = args.worker_model
        print(json.dumps(worker(args)))
        return
    models = args.models or (GPU_MODELS if args.device.startswith("cuda") else CPU_MODELS)
    argv = ["--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), "--modes", *args.modes]
    print(f"{_device_name(args.device)}, {args.precision}, {args.threads or 'default'} threads; "
          f"median of {args.steps} steps after {args.warmup + 1}")
    print(f"{'model':24s} {'img':>4s} {'batch':>5s} {'mode':11s} {'images/s':>9s} {'vs eager':>8s} "
          f"{'compile s':>9s} {'pays back':>10s} {'peak MiB':>9s}")
    for spec in models:
        name, img_size, batch = spec.split(":")
        results = run_model(spec, argv)
        if results is None:
            continue
        for mode, r in results.items():
            base = results.get("eager+ac" if mode == "compile+ac" else "eager")
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
            compile_s, payback = 0.0, "-"
            if mode.startswith("compile"):
                compile_s = r["compile_s"]
                if base:
                    saved = base["step_s"] - r["step_s"]
                    payback = f"{compile_s / saved:.0f} steps" if saved > 0 else "never"
            peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] else f"{'-':>9s}"
            print(f"{name:24s} {img_size:>4s} {batch:>5s} {mode:11s} {r['images_per_s']:9.1f} {ratio:>8s} "
                  f"{compile_s:9.1f} {payback:>10s} {peak}", flush=True)
        if name == DEFAULT_RUN[0] and {"eager", "compile"} <= results.keys():
            e, c = results["eager"], results["compile"]
            steps = DEFAULT_RUN[1]
            print(f"  the default run ({steps} steps at these rates): {steps * e['step_s']:.0f} s eager, "
                  f"{c['compile_s'] + steps * c['step_s']:.0f} s compiled ({c['compile_s']:.0f} s of it compiling)")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
