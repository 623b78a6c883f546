"""Pretraining throughput and peak memory: openmae vs its Table 1c variant vs Hugging Face ViTMAE.

Each configuration runs in its own process so peak memory (max RSS on CPU, max allocated on GPU)
is its own. A step is forward + backward + AdamW update on random images; openmae uses its engine's optimizer
(fused AdamW with decay groups), transformers its users' default (torch AdamW, foreach kernels).

    python benchmarks/pretrain_speed.py --model mae_vit_base_patch16 --batch 8 --precision bf16
    python benchmarks/pretrain_speed.py --compare openmae mask_token_in_encoder hf hf_eager --steps 6
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("openmae", "openmae_sdpa", "mask_token_in_encoder", "hf", "hf_eager")


def build(variant: str, model_name: str, img_size: int):
    """(model, images -> loss, optimizer), each implementation with its own optimizer setup."""
    import torch

    import openmae
    from openmae.optim import build_adamw, param_groups

    if variant.startswith("hf"):
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        ref = openmae.create_model(model_name, img_size=img_size)
        blk, dblk = ref.blocks[0], ref.decoder_blocks[0]
        cfg = ViTMAEConfig(
            image_size=img_size,
            patch_size=ref.patch_size,
            num_channels=ref.in_chans,
            hidden_size=ref.embed_dim,
            num_hidden_layers=len(ref.blocks),
            num_attention_heads=blk.attn.num_heads,
            intermediate_size=blk.mlp.fc1.out_features,
            decoder_hidden_size=ref.decoder_embed.out_features,
            decoder_num_hidden_layers=len(ref.decoder_blocks),
            decoder_num_attention_heads=dblk.attn.num_heads,
            decoder_intermediate_size=dblk.mlp.fc1.out_features,
            layer_norm_eps=1e-6,
            norm_pix_loss=True,
            mask_ratio=0.75,
            attn_implementation="eager" if variant == "hf_eager" else "sdpa",
        )
        model = ViTMAEForPreTraining(cfg)
        # what a transformers user gets: torch's AdamW with its defaults (foreach kernels)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        return model, lambda x: model(pixel_values=x).loss, opt
    kw = {"img_size": img_size, "norm_pix_loss": True}
    if variant == "mask_token_in_encoder":
        kw["mask_token_in_encoder"] = True
    if variant == "openmae_sdpa":
        kw["attn_impl"] = "sdpa"
    model = openmae.create_model(model_name, **kw)
    # openmae's engine: decay groups and fused AdamW (openmae.optim)
    opt = build_adamw(param_groups(model, 0.05, model.no_weight_decay()), 1e-4, (0.9, 0.95))
    return model, lambda x: model(x, mask_ratio=0.75).loss, opt


def worker(args: argparse.Namespace) -> dict:
    import contextlib

    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with torch.device(device):
        model, step_loss, opt = build(args.variant, args.model, args.img_size)
    model.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def one_step():
        with ctx():
            loss = step_loss(x)
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {
        "variant": args.variant,
        "images_per_s": args.batch / median,
        "best_images_per_s": args.batch / times[0],
        "step_s": median,
        "peak_mib": peak,
        "rss_before_mib": rss0 / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compare", nargs="+", default=["openmae", "mask_token_in_encoder", "hf"], choices=VARIANTS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return
    print(f"{args.model} {args.img_size}px batch {args.batch} {args.precision} on {args.device}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    results = {}
    for variant in args.compare:
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[variant] = r
        print(f"  {variant:24s} {r['images_per_s']:7.2f} images/s (best {r['best_images_per_s']:.2f})  "
              f"step {r['step_s']:.3f}s  peak {r['peak_mib']:.0f} MiB", flush=True)
    if "openmae" in results:
        base = results["openmae"]["images_per_s"]
        for other, r in results.items():
            if other != "openmae":
                print(f"  openmae / {other}: {base / r['images_per_s']:.2f}x")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
