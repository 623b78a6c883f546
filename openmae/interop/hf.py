"""Hugging Face ViTMAE: a directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

Key names differ between transformers 4, used by the files on the hub
(``vit.encoder.layer.N.attention.attention.query``, ``...intermediate.dense``), and transformers 5
(``vit.layers.N.attention.q_proj``, ``...mlp.fc1``); both are read. transformers 5.x's own
``save_pretrained`` writes decoder layers as ``decoder.decoder_encoder.layer.N`` (a quirk of its
reverse renaming); that is read too. Writing uses the hub's transformers-4 names by default, which
both major versions load.

Everything in the config is honoured: image and patch size, channels, widths, depths, heads, MLP
sizes, ``layer_norm_eps`` (transformers' default is 1e-12, the official MAE's 1e-6) and
``norm_pix_loss``; ``mask_ratio`` is reported (``LoadReport.mask_ratio``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.interop.weights import (
    DECODER_PREFIXES,
    Weights,
    declared_float,
    declared_int,
    declared_size,
    describe,
    find_weights_file,
    read_json_object,
    read_state_file,
    shown,
    tensor_dict,
)
from openmae.io import atomic_write, atomic_write_text, unwrap

# transformers' ViTMAEConfig defaults, for fields a config.json leaves out
HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    decoder_num_attention_heads=16,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_intermediate_size=2048,
    mask_ratio=0.75,
    norm_pix_loss=False,
)
KEY_STYLES = ("v4", "v5")
# openmae constructor argument -> the config.json entry that declares it (for messages)
HF_NAMES = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "intermediate_size",
    "decoder_embed_dim": "decoder_hidden_size",
    "decoder_depth": "decoder_num_hidden_layers",
    "decoder_num_heads": "decoder_num_attention_heads",
    "norm_pix_loss": "norm_pix_loss",
    "norm_eps": "layer_norm_eps",
}

# outside the blocks: openmae name -> ViTMAEForPreTraining name (the same in both versions)
_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
# block list: openmae prefix -> (transformers 4, transformers 5)
_LAYERS = {
    "blocks": ("vit.encoder.layer", "vit.layers"),
    "decoder_blocks": ("decoder.decoder_layers", "decoder.decoder_layers"),
}
_LAYERS_READ = {
    "vit.encoder.layer": "blocks",
    "vit.layers": "blocks",
    "decoder.decoder_layers": "decoder_blocks",
    "decoder.decoder_encoder.layer": "decoder_blocks",  # transformers 5.x save_pretrained
}
# inside a block: openmae module -> (transformers 4, transformers 5)
_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
# openmae's fused qkv is HF's separate query, key, value (in that order along dim 0)
_QKV = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
)
_LAYER_RE = re.compile(r"^(" + "|".join(re.escape(p) for p in _LAYERS_READ) + r")\.(\d+)\.(.+)\.(weight|bias)$")


def state_from_hf(
    hf_state: dict[str, Tensor], source: str = "a ViTMAE checkpoint"
) -> tuple[dict[str, Tensor], list[str]]:
    """ViTMAE tensors (either version's names, with or without the ``vit.`` prefix of the
    pre-training model) -> openmae names. Refuses tensors it does not know."""
    notes: list[str] = []
    if not any(k.startswith(("vit.", "decoder.")) for k in hf_state):  # a bare ViTMAEModel
        hf_state = {"vit." + k: v for k, v in hf_state.items()}
    top = {hf: om for om, hf in _TOP.items()}
    block = {hf: om for om, names in _BLOCK.items() for hf in names}
    qkv = {hf: i for i, names in enumerate(_QKV) for hf in names}
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in hf_state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = _LAYER_RE.match(key)
        if m:
            prefix = f"{_LAYERS_READ[m.group(1)]}.{m.group(2)}."
            module, param = m.group(3), m.group(4)
            if module in block:
                out[prefix + block[module] + "." + param] = value
                continue
            if module in qkv:
                parts[(prefix, param)][qkv[module]] = value
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: tensors with no openmae counterpart in a ViTMAE checkpoint: {sorted(unknown)[:8]}; the "
            "model is not a ViTMAE openmae reads"
        )
    for (prefix, param), qkv_parts in parts.items():
        if len(qkv_parts) != 3:
            raise ValueError(
                f"{source}: {prefix} attention {param} needs query, key and value; found {sorted(qkv_parts)}"
            )
        shapes = {tuple(t.shape) for t in qkv_parts.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != (2 if param == "weight" else 1):
            raise ValueError(
                f"{source}: {prefix} attention query, key and value {param}s have shapes {sorted(shapes)}; they "
                f"must be {'matrices' if param == 'weight' else 'vectors'} of one shape: the file is damaged"
            )
        out[f"{prefix}attn.qkv.{param}"] = torch.cat([qkv_parts[0], qkv_parts[1], qkv_parts[2]], dim=0)
    no_bias = [k for k in out if k.endswith("attn.qkv.weight") and k[: -len("weight")] + "bias" not in out]
    for key in no_bias:  # qkv_bias=False: zero biases give the same numerics
        out[key[: -len("weight")] + "bias"] = torch.zeros(out[key].shape[0], dtype=out[key].dtype)
    if no_bias:
        notes.append("qkv_bias is false: query/key/value biases loaded as zeros (same numerics)")
    return out, notes


def state_to_hf(state: dict[str, Tensor], key_style: str = "v4") -> dict[str, Tensor]:
    """openmae names -> ViTMAEForPreTraining names (``v4``: the hub's; ``v5``: transformers 5's)."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    style = KEY_STYLES.index(key_style)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise ValueError(f"{key} has no Hugging Face ViTMAE counterpart")
        prefix = f"{_LAYERS[m.group(1)][style]}.{m.group(2)}."
        module, param = m.group(3), m.group(4)
        if module == "attn.qkv":
            for names, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{names[style]}.{param}"] = part.contiguous()
        elif module in _BLOCK:
            out[f"{prefix}{_BLOCK[module][style]}.{param}"] = value
        else:
            raise ValueError(f"{key} has no Hugging Face ViTMAE counterpart")
    return out


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} {value} is not square; openmae's ViT needs square patches")
        value = value[0]
    return declared_int(value, what)


def config_from_hf(config: dict[str, Any], source: str = "config.json") -> tuple[dict[str, Any], float, list[str]]:
    """A ViTMAE ``config.json`` -> (openmae constructor arguments, mask_ratio, notes).

    Every entry openmae uses is checked for its type (``hidden_size`` a whole number, ...); a wrong
    one is a ``ValueError`` naming ``source`` and the entry. Whether the sizes fit the tensors is
    checked when the model is built (:func:`openmae.interop.architecture.infer_architecture`).
    """
    c = {**HF_DEFAULTS, **config}

    def where(key: str) -> str:
        return f"{source} {key}"

    if c.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(f"{source} has model_type {shown(c['model_type'])}; only vit_mae is supported")
    if c["hidden_act"] != "gelu":
        raise ValueError(
            f"{where('hidden_act')} is {shown(c['hidden_act'])}: openmae's ViT uses the exact GELU ('gelu')"
        )
    layers = ("num_hidden_layers", "decoder_num_hidden_layers")
    n = {
        k: declared_int(c[k], where(k), minimum=0 if k in layers else 1)
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
        )
    }
    mlp_ratio = n["intermediate_size"] / n["hidden_size"]
    dec_ratio = n["decoder_intermediate_size"] / n["decoder_hidden_size"]
    if dec_ratio != mlp_ratio:
        raise ValueError(
            f"{source}: decoder MLP ratio {dec_ratio} (decoder_intermediate_size / decoder_hidden_size) differs from "
            f"the encoder's {mlp_ratio}; openmae's MAE uses one mlp_ratio for both"
        )
    flag = c["norm_pix_loss"]
    if not isinstance(flag, bool):
        raise ValueError(
            f"{where('norm_pix_loss')} is {shown(flag)}, not true or false; fix that entry or re-export the file"
        )
    cfg = dict(
        img_size=declared_size(c["image_size"], where("image_size")),
        patch_size=_square(c["patch_size"], where("patch_size")),
        in_chans=n["num_channels"],
        embed_dim=n["hidden_size"],
        depth=n["num_hidden_layers"],
        num_heads=n["num_attention_heads"],
        mlp_ratio=mlp_ratio,
        decoder_embed_dim=n["decoder_hidden_size"],
        decoder_depth=n["decoder_num_hidden_layers"],
        decoder_num_heads=n["decoder_num_attention_heads"],
        norm_pix_loss=flag,
        norm_eps=declared_float(c["layer_norm_eps"], where("layer_norm_eps"), 0.0, 1.0),
    )
    dropout = [
        declared_float(c[k], where(k), 0.0, 1.0) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")
    ]
    mask_ratio = declared_float(c["mask_ratio"], where("mask_ratio"), 0.0, 1.0, high_open=True)
    notes = []
    if any(dropout):
        notes.append("the config's dropout is ignored (openmae's MAE has none)")
    return cfg, mask_ratio, notes


def config_to_hf(cfg: dict[str, Any], mask_ratio: float = 0.75, pretraining: bool = True) -> dict[str, Any]:
    """openmae constructor arguments -> a ViTMAE ``config.json``."""
    image = cfg["img_size"]
    if isinstance(image, (list, tuple)):
        image = int(image[0]) if image[0] == image[1] else [int(image[0]), int(image[1])]
    decoder_dim = cfg.get("decoder_embed_dim", HF_DEFAULTS["decoder_hidden_size"])
    return {
        "architectures": ["ViTMAEForPreTraining" if pretraining else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": cfg["embed_dim"],
        "num_hidden_layers": cfg["depth"],
        "num_attention_heads": cfg["num_heads"],
        "intermediate_size": int(cfg["embed_dim"] * cfg["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg["norm_eps"],
        "image_size": image,
        "patch_size": cfg["patch_size"],
        "num_channels": cfg["in_chans"],
        "qkv_bias": True,
        "decoder_hidden_size": decoder_dim,
        "decoder_num_hidden_layers": cfg.get("decoder_depth", HF_DEFAULTS["decoder_num_hidden_layers"]),
        "decoder_num_attention_heads": cfg.get("decoder_num_heads", HF_DEFAULTS["decoder_num_attention_heads"]),
        "decoder_intermediate_size": int(decoder_dim * cfg["mlp_ratio"]),
        "mask_ratio": mask_ratio,
        "norm_pix_loss": bool(cfg.get("norm_pix_loss", False)),
        "dtype": "float32",
    }


def read(path: str | Path, obj: Any = None) -> Weights:
    """A ViTMAE directory, or one weights file with ViTMAE names (its folder's config.json is used if any);
    ``obj`` is the already-unpickled file, if the caller has it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = find_weights_file(path) if path.is_dir() else path
    if file is None:
        raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")
    config = None
    if (folder / "config.json").is_file():
        config = read_json_object(folder / "config.json")
        if config.get("model_type") != "vit_mae":
            config = None
    hf_state = obj if obj is not None else read_state_file(file)[0]
    nested = isinstance(hf_state.get("model"), dict)
    hf_state = tensor_dict(
        hf_state["model"] if nested else hf_state, file, "its 'model' entry" if nested else "the file"
    )
    state, notes = state_from_hf(hf_state, str(file))
    origin: dict[str, str] = {}
    if config is not None:
        cfg, mask_ratio, config_notes = config_from_hf(config, str(folder / "config.json"))
        notes += config_notes
        origin = {k: f"config.json {name}" for k, name in HF_NAMES.items()}
    else:
        cfg, mask_ratio = {"norm_eps": HF_DEFAULTS["layer_norm_eps"]}, None
        notes.append("no config.json: assuming transformers' layer_norm_eps 1e-12, the rest inferred from shapes")
    return Weights(
        str(path), "hf", describe(state, {}), state, config=cfg, notes=notes, mask_ratio=mask_ratio, origin=origin
    )


def write(
    model: nn.Module,
    path: str | Path,
    key_style: str = "v4",
    mask_ratio: float | None = None,
    encoder_only: bool = False,
) -> Path:
    """A directory that ``transformers.ViTMAEForPreTraining.from_pretrained`` loads with the same numerics.

    The fixed sin-cos tables are written into ``position_embeddings`` / ``decoder_pos_embed`` (transformers 5
    leaves them at zero when it builds a model from a config, so they must come from the file).
    A model without a decoder, or ``encoder_only``, is written as a ``ViTMAEModel``. Returns the
    weights file.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    cfg = dict(getattr(model, "config", None) or {})
    if not isinstance(cfg.get("embed_dim"), int) or not hasattr(model, "patch_embed"):
        raise ValueError(
            f"export to hf needs an openmae ViT MAE built with openmae.create_model; "
            f"{getattr(model, 'arch', type(model).__name__)} has no ViTMAE counterpart"
        )
    if cfg.get("mask_token_in_encoder"):
        raise ValueError("mask_token_in_encoder has no ViTMAE counterpart; it cannot be exported to hf")
    if cfg.get("mask_type", "random") != "random":
        warnings.warn(f"ViTMAE always masks at random; mask_type {cfg['mask_type']!r} is not kept", stacklevel=3)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not (encoder_only and k.startswith(DECODER_PREFIXES))
    }
    pretraining = "decoder_embed.weight" in state
    hf_state = state_to_hf(state, key_style)
    if not pretraining:  # ViTMAEModel's names have no "vit." prefix
        hf_state = {k[len("vit.") :]: v for k, v in hf_state.items()}
    if mask_ratio is None:
        mask_ratio = float(cfg.get("mask_ratio", getattr(model, "mask_ratio", HF_DEFAULTS["mask_ratio"])))
    config = config_to_hf(cfg, mask_ratio, pretraining)
    if isinstance(config["image_size"], list):
        warnings.warn("transformers' ViTMAE computes its loss on square images only", stacklevel=3)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    file = path / "model.safetensors"
    atomic_write(file, lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    return file
