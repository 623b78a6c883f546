"""``openmae convert SRC DST --to FORMAT``: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse

import yaml

from openmae.interop import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert weights between openmae, official MAE, Hugging Face ViTMAE and timm",
        description="Read SRC in any supported format (detected) and write it to DST in the --to format.",
    )
    p.add_argument("src", help="checkpoint file or directory")
    p.add_argument("dst", help="output file (.safetensors / .pth) or directory (hf, or a timm/openmae folder)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--model", help="registered model to load into, for files that record no architecture")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor override, e.g. --set num_heads=6 --set norm_pix_loss=true (repeatable)",
    )
    p.add_argument("--key-style", choices=("v4", "v5"), default="v4", help="hf key names: v4 (hub) or v5")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        value = yaml.safe_load(text)
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from openmae.interop import create_model, export_pretrained, load, load_weights_into

    overrides = parse_overrides(args.set)
    if args.model:
        model = create_model(args.model, **overrides)
        report = load_weights_into(model, args.src)
    else:
        model, report = load(args.src, **overrides)
    print(report.summary())
    options = {"key_style": args.key_style} if args.to == "hf" else {}
    written = export_pretrained(model, args.dst, format=args.to, **options)
    print(f"wrote {args.to}: {written}")
    return 0
