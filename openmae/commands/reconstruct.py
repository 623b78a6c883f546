"""``openmae reconstruct``: reconstruction figures (MAE paper, Figures 2-4) from a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openmae.masking import MASK_TYPES
    from openmae.reconstruction import UNNORMALIZE_MODES

    p = sub.add_parser(
        "reconstruct",
        help="figure of original / masked / reconstruction / reconstruction + visible",
        description="Reconstruct images with a pretrained MAE: one figure row per image and mask ratio, "
        "columns original, masked input, reconstruction, reconstruction with the visible patches pasted back.",
    )
    p.add_argument("images", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images")
    p.add_argument("--checkpoint", required=True, help="anything openmae.load_pretrained reads (with the decoder)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument(
        "--mask-ratio", type=float, nargs="+", default=[0.75], help="one or more ratios, e.g. 0.75 0.85 0.95"
    )
    p.add_argument("--mask", choices=MASK_TYPES, default="random", help="mask sampler (grid ignores the ratio)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks: the same seed gives the same figure")
    p.add_argument(
        "--unnormalize",
        choices=UNNORMALIZE_MODES,
        default="visible",
        help="norm-pix models: un-normalise with visible-patch statistics, dataset statistics, "
        "or show the normalised view",
    )
    p.add_argument("--max-images", type=int, default=8, help="use at most this many images of a folder")
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="per-channel normalisation mean (default: the checkpoint's, "
        "else ImageNet for RGB, Fashion-MNIST for grayscale)",
    )
    p.add_argument("--std", type=float, nargs="+", help="per-channel normalisation std (see --mean)")
    p.add_argument(
        "--norm-pix-loss",
        choices=("true", "false"),
        help="whether the model was trained on per-patch normalised targets; only needed for files that "
        "do not record it (official MAE and Hugging Face checkpoints)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from openmae.data import default_normalization, image_files
    from openmae.reconstruction import (
        DecoderMissingError,
        checkpoint_normalization,
        load_reconstruction_model,
        normalize,
        read_image,
        reconstruct,
    )
    from openmae.visualize import figure_size, save_figure

    if args.max_images < 1:
        print("openmae reconstruct: error: --max-images must be at least 1", file=sys.stderr)
        return 2
    if (args.mean is None) != (args.std is None):
        print("openmae reconstruct: error: give --mean and --std together", file=sys.stderr)
        return 2
    overrides = {} if args.norm_pix_loss is None else {"norm_pix_loss": args.norm_pix_loss == "true"}
    try:
        model = load_reconstruction_model(args.checkpoint, **overrides)
    except DecoderMissingError as e:
        print(f"openmae reconstruct: error: {e}", file=sys.stderr)
        return 2
    report = getattr(model, "load_report", None)
    if args.norm_pix_loss is None and report is not None and getattr(report, "norm_pix_loss", True) is None:
        print(
            f"note: {args.checkpoint} does not record whether it was trained with norm-pix targets; "
            f"assuming norm_pix_loss={model.norm_pix_loss} (set --norm-pix-loss true|false)"
        )
    model = model.to(args.device)

    if args.mean is not None:
        mean, std, source = args.mean, args.std, "--mean/--std"
    elif (found := checkpoint_normalization(args.checkpoint)) is not None:
        (mean, std), source = found, "the checkpoint"
    else:
        (mean, std), source = default_normalization(model.in_chans), "the default for this channel count"

    out = Path(args.out).resolve()
    paths = [p for p in image_files(args.images) if p.resolve() != out]  # a rerun into the same folder
    if not paths:
        print(f"openmae reconstruct: error: no input images in {args.images}", file=sys.stderr)
        return 2
    if len(paths) > args.max_images:
        print(f"using the first {args.max_images} of {len(paths)} images (--max-images)")
        paths = paths[: args.max_images]
    pixels = torch.stack([read_image(p, model.in_chans, model.img_size) for p in paths])  # (N, C, H, W)
    try:
        rec = reconstruct(
            model,
            normalize(pixels, mean, std),
            mask_ratios=args.mask_ratio,
            mask_type=args.mask,
            seed=args.seed,
            unnormalize=args.unnormalize,
            mean=mean,
            std=std,
        )
    except ValueError as e:
        print(f"openmae reconstruct: error: {e}", file=sys.stderr)
        return 2
    arch = getattr(model, "arch", type(model).__name__)
    heading = f"{arch} ({args.checkpoint}), {args.mask} masks, seed {args.seed}"
    out = save_figure(rec, args.out, titles=[p.name for p in paths], heading=heading)
    width, height = figure_size(rec.panels.shape[0] * rec.panels.shape[1])
    rows = f"{_count(len(paths), 'image')} x {_count(len(rec.mask_ratios), 'mask ratio')}"
    print(f"wrote {out} ({width}x{height} px; {rows}; mode {rec.mode}; normalisation from {source})")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
