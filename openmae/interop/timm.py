"""timm Vision Transformer weights, as an encoder.

timm's ``VisionTransformer`` uses openmae's encoder names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) and
``fc_norm`` / ``head`` for classifiers, with LayerNorm eps 1e-6 as in the official MAE.

Read: a state-dict file (``.safetensors``, ``.pth``, ``.bin``; possibly under ``state_dict`` or
``model``) or a hub-style directory (``config.json`` with ``architecture``, ``model_args``,
``pretrained_cfg``). Write: a ``.safetensors`` path gets the encoder tensors alone (what
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and
``load_state_dict`` take unchanged); any other path becomes a directory with ``model.safetensors``
and timm's ``config.json``, which ``timm.create_model("local-dir:PATH")`` builds from.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from openmae.interop.architecture import VIT_SIZES
from openmae.interop.weights import (
    CLASSIFIER_PREFIXES,
    Weights,
    declared_int,
    declared_size,
    describe,
    find_weights_file,
    pickled_dict,
    read_json_object,
    read_state_file,
    safe_torch_load,
    shown,
    split_classifier,
    strip_prefix,
    tensor_dict,
)
from openmae.io import atomic_write, atomic_write_text, unwrap
from openmae.patches import to_2tuple

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
SWIN_PREFIXES = ("patch_embed.", "layers.", "norm.", "head.")  # timm's Swin: everything but SimMIM's mask and head
TIMM_NORM_EPS = 1e-6


def timm_name(cfg: dict[str, Any]) -> str:
    """The closest timm architecture name (the exact shape comes from ``model_args``)."""
    import timm

    size = VIT_SIZES.get(cfg["embed_dim"], ("base",))[0]
    p, side = cfg["patch_size"], to_2tuple(cfg["img_size"])[0]
    for name in (f"vit_{size}_patch{p}_{side}", f"vit_{size}_patch{p}_224", f"vit_{size}_patch16_224"):
        if timm.list_models(name):
            return name
    return "vit_base_patch16_224"


def model_args(cfg: dict[str, Any], num_classes: int = 0, global_pool: str = "token") -> dict[str, Any]:
    """``timm.create_model`` keyword arguments that rebuild this encoder's shapes."""
    h, w = to_2tuple(cfg["img_size"])
    return dict(
        img_size=h if h == w else [h, w],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        num_classes=num_classes,
        global_pool=global_pool,
    )


def _config_from_timm(args: Any, pretrained_cfg: Any, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(constructor arguments, where each is declared) from timm's ``model_args`` / ``pretrained_cfg``."""
    for what, value in (("model_args", args), ("pretrained_cfg", pretrained_cfg)):
        if not isinstance(value, dict):
            raise ValueError(
                f"{source}: its timm config's {what} is a {type(value).__name__}, not an object; fix config.json "
                "or re-export the model"
            )
    keys = ("embed_dim", "depth", "depths", "num_heads", "window_size", "mlp_ratio", "patch_size", "in_chans")
    cfg = {k: args[k] for k in keys if k in args}
    origin = {k: f"its timm model_args.{k}" for k in cfg}
    if "img_size" in args:
        cfg["img_size"] = declared_size(args["img_size"], f"{source}: model_args.img_size")
        origin["img_size"] = "its timm model_args.img_size"
    size = pretrained_cfg.get("input_size")
    if size is not None:
        if not isinstance(size, (list, tuple)) or len(size) != 3:
            raise ValueError(f"{source}: pretrained_cfg.input_size is {shown(size)}, not [channels, height, width]")
        chans, h, w = (declared_int(v, f"{source}: pretrained_cfg.input_size") for v in size)
        if "in_chans" not in cfg:
            cfg["in_chans"], origin["in_chans"] = chans, "its timm pretrained_cfg.input_size"
        if "img_size" not in cfg:
            cfg["img_size"], origin["img_size"] = (h if h == w else (h, w)), "its timm pretrained_cfg.input_size"
    return cfg, origin


def read(path: str | Path, obj: Any = None) -> Weights:
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        config = read_json_object(path / "config.json") if (path / "config.json").is_file() else {}
        file = find_weights_file(path)
        if file is None:
            raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")
        state, meta = read_state_file(file)
    elif path.suffix == ".safetensors":
        state, meta = read_state_file(path)
    else:
        state, meta = (obj if obj is not None else pickled_dict(safe_torch_load(path), path)), {}
    if "model_args" in meta:  # written by openmae's exporter
        try:
            args = json.loads(meta["model_args"])
        except ValueError:
            raise ValueError(f"{path}: its model_args metadata is not valid JSON; re-export it") from None
        config = {"architecture": meta.get("architecture"), "model_args": args}
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = strip_prefix(tensor_dict(state, path), "module.")
    trunk, extras = split_classifier(state)
    cfg, origin = _config_from_timm(config.get("model_args") or {}, config.get("pretrained_cfg") or {}, str(path))
    notes = []
    if config.get("architecture"):
        notes.append(f"timm architecture {config['architecture']}")
    return Weights(
        str(path), "timm", describe(trunk, extras), trunk, config=cfg, extras=extras, notes=notes, origin=origin
    )


def _vit_export(model: nn.Module, cfg: dict[str, Any]) -> tuple[dict[str, Tensor], str, dict[str, Any], int]:
    """(tensors, timm architecture, model_args, feature width) of an openmae ViT."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES + CLASSIFIER_PREFIXES)}
    if cfg.get("norm_eps", TIMM_NORM_EPS) != TIMM_NORM_EPS:
        warnings.warn(
            f"timm's ViT uses LayerNorm eps {TIMM_NORM_EPS}; this model uses {cfg['norm_eps']}, so timm's features "
            "will differ slightly",
            stacklevel=4,
        )
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    pool = "avg" if "fc_norm.weight" in state else "token"
    return state, timm_name(cfg), model_args(cfg, num_classes, pool), cfg["embed_dim"]


def _swin_export(model: nn.Module, cfg: dict[str, Any]) -> tuple[dict[str, Tensor], str, dict[str, Any], int]:
    """(tensors, timm architecture, model_args, feature width) of an openmae Swin (classifier or SimMIM encoder)."""
    import timm

    if cfg.get("head_norm"):
        raise ValueError("timm's Swin has no BatchNorm head: export a fine-tuned Swin, not a linear probe, to timm")
    state = {k: v for k, v in model.state_dict().items() if k.startswith(SWIN_PREFIXES)}
    num_classes = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0
    depths, dim = list(cfg["depths"]), int(cfg["embed_dim"])
    shape = ("patch_size", "in_chans", "embed_dim", "num_heads", "window_size", "mlp_ratio")
    args = {k: cfg[k] for k in shape if k in cfg}
    h, w = to_2tuple(cfg["img_size"])
    args.update(img_size=h if h == w else [h, w], depths=depths, num_classes=num_classes, global_pool="avg")
    sizes = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base"}
    size = sizes.get((dim, tuple(depths)))
    name = f"swin_{size or 'tiny'}_patch{args['patch_size']}_window{args['window_size']}_{h}"
    arch = name if timm.list_models(name) else "swin_tiny_patch4_window7_224"
    return state, arch, args, dim * 2 ** (len(depths) - 1)


def write(model: nn.Module, path: str | Path) -> Path:
    """The encoder (and a classifier's ``fc_norm`` / ``head``) in timm's layout. Returns the weights file."""
    from safetensors.torch import save_file

    model = unwrap(model)
    cfg = dict(getattr(model, "config", None) or {})
    if hasattr(model, "layers") and "depths" in cfg:
        state, arch, args, width = _swin_export(model, cfg)
    elif isinstance(cfg.get("embed_dim"), int) and hasattr(model, "patch_embed"):
        state, arch, args, width = _vit_export(model, cfg)
    else:
        raise ValueError(
            f"export to timm needs an openmae ViT or Swin built with openmae.create_model; "
            f"{getattr(model, 'arch', type(model).__name__)} has no timm counterpart"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = {"format": "pt", "architecture": arch, "model_args": json.dumps(args)}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
        return path
    h, w = to_2tuple(cfg["img_size"])
    config = {
        "architecture": arch,
        "num_classes": args["num_classes"],
        "num_features": width,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "tag": "openmae",
            "input_size": [cfg["in_chans"], h, w],
            "num_classes": args["num_classes"],
            "classifier": "head.fc" if "depths" in args else "head",
            "first_conv": "patch_embed.proj",
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    file = path / "model.safetensors"
    atomic_write(file, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return file
