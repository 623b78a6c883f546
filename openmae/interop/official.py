"""Official MAE checkpoints (facebookresearch/mae ``.pth`` files).

What they hold, all under ``'model'`` and in the parameter names openmae shares with them:

- training checkpoints: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``, ``args`` an
  ``argparse.Namespace`` (read for ``model``, ``input_size``, ``norm_pix_loss``, ``mask_ratio``);
- released ``mae_pretrain_vit_*.pth``: the encoder only;
- ``*_full.pth`` / visualize files: encoder and decoder;
- fine-tuned classifiers: encoder plus ``fc_norm`` and ``head`` (no ``norm`` with global pooling).

Written files hold ``{'model': state_dict, 'openmae': {arch, config, openmae_version}}``: plain
containers only, so ``torch.load(weights_only=True)`` (the default since torch 2.6) opens them, and
the official code, which reads ``checkpoint['model']``, loads them unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from openmae.interop.architecture import mae_variants
from openmae.interop.weights import (
    DECODER_PREFIXES,
    Weights,
    declared_float,
    declared_int,
    describe,
    pickled_dict,
    read_safetensors_file,
    safe_torch_load,
    shown,
    split_classifier,
    strip_prefix,
    tensor_dict,
)
from openmae.io import atomic_write, model_record, unwrap
from openmae.registry import arch_of


def registered_name(name: Any) -> str | None:
    """An official model name (``mae_vit_base_patch16_dec512d8b``, fine-tuning's ``vit_base_patch16``)
    -> openmae's registered MAE name, if there is one."""
    if not isinstance(name, str) or not name:
        return None
    names = set(mae_variants())
    for candidate in (name, name.replace("_dec512d8b", ""), "mae_" + name):
        if candidate in names:
            return candidate
    return None


def args_config(args: Any, source: str = "the checkpoint") -> tuple[str | None, dict[str, Any], float | None]:
    """(arch, constructor arguments, mask_ratio) recorded in an official ``args`` Namespace (or dict).
    Values of the wrong type are refused, naming ``source`` and the entry."""
    a = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    cfg: dict[str, Any] = {}
    if a.get("input_size") is not None:
        cfg["img_size"] = declared_int(a["input_size"], f"{source}: args.input_size")
    if a.get("norm_pix_loss") is not None:
        flag = a["norm_pix_loss"]
        if not isinstance(flag, (bool, int)) or flag not in (0, 1):
            raise ValueError(
                f"{source}: args.norm_pix_loss is {shown(flag)}, not true or false; fix that entry or re-export "
                "the file"
            )
        cfg["norm_pix_loss"] = bool(flag)
    ratio = a.get("mask_ratio")
    if ratio is not None:
        ratio = declared_float(ratio, f"{source}: args.mask_ratio", 0.0, 1.0, high_open=True)
    return registered_name(a.get("model")), cfg, ratio


def read(path: str | Path, obj: Any = None) -> Weights:
    """An official checkpoint; ``obj`` is the already-unpickled file, if the caller has it."""
    path = Path(path)
    if path.suffix == ".safetensors":  # an official-layout state dict saved as safetensors
        obj = {"model": read_safetensors_file(path)[0]}
    elif obj is None:
        obj = pickled_dict(safe_torch_load(path), path)
    nested = isinstance(obj.get("model"), dict)
    state = tensor_dict(obj["model"] if nested else obj, path, "its 'model' entry" if nested else "the file")
    state = strip_prefix(state, "module.")
    trunk, extras = split_classifier(state)
    kind = describe(trunk, extras)
    if "optimizer" in obj:
        kind = f"training checkpoint, epoch {obj.get('epoch', '?')}, {kind}"
    arch, cfg, mask_ratio = args_config(obj.get("args"), str(path))
    origin = {"img_size": "its args.input_size", "norm_pix_loss": "its args.norm_pix_loss"}
    notes = []
    meta = obj.get("openmae")
    complete = isinstance(meta, dict) and "arch" in meta and "config" in meta
    if complete:  # written by openmae: the exact architecture
        if not isinstance(meta["arch"], str) or not isinstance(meta["config"], dict):
            raise ValueError(
                f"{path}: its 'openmae' record is damaged (arch must be a name, config a dict); re-export it"
            )
        arch, cfg = meta["arch"], dict(meta["config"])
        origin = {k: f"its openmae record's config.{k}" for k in cfg}
    elif obj.get("args") is not None and arch is None:
        notes.append(
            f"args.model {shown(getattr(obj['args'], 'model', None))} is not a registered name; inferred from shapes"
        )
    return Weights(
        str(path),
        "official",
        kind,
        trunk,
        arch=arch,
        config=cfg,
        extras=extras,
        notes=notes,
        mask_ratio=mask_ratio,
        complete=complete,
        origin=origin,
    )


def write(model: nn.Module, path: str | Path, encoder_only: bool = False) -> Path:
    """``{'model': state_dict, 'openmae': meta}`` with ``torch.save``, atomically; ``encoder_only``
    leaves the decoder out, like the released ``mae_pretrain_vit_*.pth`` files."""
    model = unwrap(model)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not (encoder_only and k.startswith(DECODER_PREFIXES))
    }
    obj = {"model": state, "openmae": model_record(arch_of(model), getattr(model, "config", None))}
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path
