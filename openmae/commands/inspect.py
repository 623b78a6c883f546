"""``openmae inspect PATH``: what a checkpoint is, and whether it holds every tensor of the model it implies."""

from __future__ import annotations

import json
from dataclasses import dataclass

from openmae.config import REQUIRED, opt


@dataclass
class InspectSettings:
    """Settings of ``openmae inspect``."""

    path: str = opt(
        REQUIRED, "checkpoint file or directory (openmae, official MAE, Hugging Face, timm)", positional=True
    )
    json: bool = opt(False, "print the description as JSON")


def _yes_no(value: bool | None) -> str:
    return "unknown (not recorded)" if value is None else ("yes" if value else "no")


def run(s: InspectSettings) -> None:
    from openmae.interop import inspect_checkpoint
    from openmae.interop.weights import abbrev, plural

    info = inspect_checkpoint(s.path)
    if s.json:
        print(json.dumps(info, indent=2, default=str))
        return
    c = info["config"]
    print(f"path:          {info['path']}")
    print(f"format:        {info['format']} ({info['kind']})")
    shape = (
        f"embed_dim {c.get('embed_dim', '?')}, depth {c.get('depth', '?')}, heads {c.get('num_heads', '?')}, "
        f"patch {c.get('patch_size', '?')}, img_size {c.get('img_size', '?')}, in_chans {c.get('in_chans', '?')}"
    )
    print(f"architecture:  {info['arch']}: {shape}")
    if info["has_decoder"]:
        decoder = (
            f"yes: {c.get('decoder_embed_dim', '?')} wide, {c.get('decoder_depth', '?')} deep, "
            f"{c.get('decoder_num_heads', '?')} heads"
        )
    else:
        decoder = "no (reconstruction unavailable)"
    print(f"decoder:       {decoder}")
    if info["num_classes"] is not None:
        print(f"classifier:    head with {info['num_classes']} classes")
    print(f"norm_pix_loss: {_yes_no(info['norm_pix_loss'])}")
    if info["mask_ratio"] is not None:
        print(f"mask_ratio:    {info['mask_ratio']}")
    print(
        f"parameters:    {info['parameters']:,} (encoder {info['encoder_parameters']:,}, "
        f"decoder {info['decoder_parameters']:,}; fixed sin-cos tables not counted)"
    )
    problems = [
        ("missing", info["missing_encoder"], "encoder tensor", "not in the file (loading needs --allow-partial)"),
        ("missing", info["missing_decoder"], "decoder tensor", "not in the file (loading needs --allow-partial)"),
        ("mismatched", info["mismatched"], "tensor", f"of another shape or type than {info['arch']}'s"),
        ("unexpected", info["unexpected"], "tensor", f"with no place in {info['arch']}"),
    ]
    for label, names, noun, what in problems:
        if names:
            print(f"{label + ':':<15}{plural(len(names), noun)} {what}: {abbrev(names, 4)}")
    if not any(names for _, names, _, _ in problems):
        parts = "encoder and decoder" if info["has_decoder"] else "encoder"
        print(f"tensors:       all of {info['arch']}'s {parts}")
    for note in info["notes"]:
        print(f"note:          {note}")
