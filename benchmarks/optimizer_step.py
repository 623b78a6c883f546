"""AdamW update time for a model's parameters: foreach vs fused kernels (the engine uses fused).

    python benchmarks/optimizer_step.py --model mae_vit_base_patch16
"""

from __future__ import annotations

import argparse
import time

import torch

import openmae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = openmae.create_model(args.model).to(args.device)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    n = sum(q.numel() for q in params)
    print(f"{args.model}: {n / 1e6:.1f}M trainable parameters on {args.device}")
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **{kind: True})
        opt.step()  # allocate state
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"  {kind:8s} {(time.perf_counter() - t) / args.steps:.3f} s/step")


if __name__ == "__main__":
    main()
