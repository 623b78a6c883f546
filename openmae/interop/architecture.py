"""From a :class:`Weights` to a built model: the architecture a file implies (recorded config, then
tensor shapes, then standard head counts) and loading into a model with a :class:`LoadReport`."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.interop.swin import infer_swin_config, is_swin_state
from openmae.interop.weights import DECODER_PREFIXES, FIXED, LoadReport, Weights, abbrev
from openmae.io import unwrap
from openmae.models import list_models, model_factory
from openmae.patches import sincos_2d

# -- architecture from shapes ------------------------------------------------------------------


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_config(state: dict[str, Tensor]) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments implied by tensor shapes (heads are not: they leave no trace in shapes).

    ``img_size`` comes from the length of ``pos_embed`` (cls row + a square grid assumed).
    """
    notes: list[str] = []
    w = state.get("patch_embed.proj.weight")
    if "patch_embed1.proj.weight" in state:
        raise ValueError(
            "this looks like a ConvMAE checkpoint, whose architecture cannot be inferred; build the model "
            "and load into it: openmae.create_model('convmae_base_patch16', pretrained=path, ...)"
        )
    if w is None or w.dim() != 4:
        raise ValueError("no conv patch embedding (patch_embed.proj.weight): not a ViT / MAE checkpoint")
    dim, chans, ph, pw = w.shape
    if ph != pw:
        raise ValueError(f"patch_embed.proj.weight has non-square {ph}x{pw} patches; openmae's ViT needs square ones")
    cfg: dict[str, Any] = {"embed_dim": dim, "in_chans": chans, "patch_size": ph, "depth": _depth(state, "blocks.")}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        cfg["mlp_ratio"] = fc1.shape[0] / dim
    pos = state.get("pos_embed")
    if pos is not None:
        tokens = pos.shape[-2] - 1
        side = math.isqrt(tokens)
        if side * side == tokens:
            cfg["img_size"] = side * ph
        else:
            notes.append(f"pos_embed holds {tokens + 1} rows, not a cls row plus a square grid; pass img_size=(H, W)")
    if "decoder_embed.weight" in state:
        cfg["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
        cfg["decoder_depth"] = _depth(state, "decoder_blocks.")
        dfc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        if dfc1 is not None and "mlp_ratio" in cfg and dfc1.shape[0] / cfg["decoder_embed_dim"] != cfg["mlp_ratio"]:
            raise ValueError(
                f"decoder MLP ratio {dfc1.shape[0] / cfg['decoder_embed_dim']} differs from the encoder's "
                f"{cfg['mlp_ratio']}; openmae's MAE uses one mlp_ratio for both"
            )
    return cfg, notes


# Standard ViT widths (the ViT and MAE papers): heads, and the size word in registered names.
VIT_SIZES = {192: ("tiny", 3), 384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1280: ("huge", 16)}
DECODER_HEADS = {512: 16}  # the paper's decoder


def mae_variants() -> list[str]:
    return [n for n in list_models() if n.startswith("mae_")]


def match_variant(cfg: dict[str, Any]) -> str:
    """The registered MAE name closest to these shapes: ``mae_vit_{size}_patch{p}`` when registered,
    else the same patch size and the nearest standard width (its defaults fill in what the file
    leaves open, e.g. the decoder of an encoder-only file); the exact shapes come from ``cfg``."""
    widths = {size: dim for dim, (size, _) in VIT_SIZES.items()}
    dim, patch = cfg.get("embed_dim", 768), cfg.get("patch_size", 16)

    def distance(name: str) -> tuple[int, int]:
        m = re.fullmatch(r"mae_vit_([a-z]+)_patch(\d+)", name)
        if not m or m.group(1) not in widths:
            return (2, 0)
        return (int(int(m.group(2)) != patch), abs(widths[m.group(1)] - dim))

    return min(mae_variants(), key=distance)


def _guess_heads(dim: int, head_dim: int) -> int:
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


def infer_architecture(
    weights: Weights, overrides: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any], list[str]]:
    """Registered name and constructor arguments for ``weights``: the recorded config, then what
    shapes imply, then standard head counts, with ``overrides`` last. Whatever is still unset
    takes the registered variant's default when the model is built.

    Returns:
        (arch, config, notes): notes say what had to be assumed.
    """
    overrides = dict(overrides or {})
    if weights.complete:
        return weights.arch, {**weights.config, **overrides}, []
    if is_swin_state(weights.state):
        return _swin_architecture(weights, overrides)
    notes: list[str] = []
    shaped, shape_notes = infer_config(weights.state)
    cfg = {**shaped, **weights.config}
    arch = weights.arch if weights.arch in mae_variants() else match_variant(cfg)
    if "num_heads" not in cfg and "num_heads" not in overrides:
        dim = cfg["embed_dim"]
        cfg["num_heads"] = VIT_SIZES[dim][1] if dim in VIT_SIZES else _guess_heads(dim, 64)
        if dim not in VIT_SIZES:
            notes.append(
                f"num_heads is not recorded in the file; assumed {cfg['num_heads']} (override with num_heads=...)"
            )
    if weights.has_decoder and "decoder_num_heads" not in cfg and "decoder_num_heads" not in overrides:
        dim = cfg["decoder_embed_dim"]
        cfg["decoder_num_heads"] = DECODER_HEADS.get(dim) or _guess_heads(dim, 32)
        if dim not in DECODER_HEADS:
            notes.append(
                f"decoder_num_heads is not recorded; assumed {cfg['decoder_num_heads']} "
                "(override with decoder_num_heads=...)"
            )
    if weights.has_decoder and "norm_pix_loss" not in cfg and "norm_pix_loss" not in overrides:
        notes.append("norm_pix_loss is not recorded; the model uses False (pass norm_pix_loss=True if trained with it)")
    if "img_size" in overrides or "img_size" in weights.config:
        shape_notes = [n for n in shape_notes if not n.startswith("pos_embed")]
    cfg.update(overrides)
    return arch, cfg, shape_notes + notes


def _swin_architecture(weights: Weights, overrides: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """A Swin classifier (``swin_*``) or, with SimMIM's pixel head, its pretraining model (``simmim_swin_*``)."""
    cfg, notes = infer_swin_config(weights.state)
    cfg.update(weights.config)
    if "img_size" in weights.config or "img_size" in overrides:
        notes = [n for n in notes if not n.startswith("img_size")]
    family = "simmim_swin_" if "decoder_pred.weight" in weights.state else "swin_"
    names = [n for n in list_models(family) if n.startswith(family)]
    if not names:
        raise ValueError(f"{weights.source} holds Swin weights, but no {family}* model is registered")
    if family == "swin_":  # a classifier's head, or none: features out
        head = weights.extras.get("head.fc.weight")
        cfg["num_classes"] = 0 if head is None else int(head.shape[0])

    def distance(name: str) -> tuple:  # the variant of the same width and depths, else the nearest
        defaults = model_factory(name).defaults
        same_depths = tuple(defaults.get("depths", ())) == tuple(cfg["depths"])
        return abs(defaults.get("embed_dim", 0) - cfg["embed_dim"]), not same_depths

    arch = weights.arch if weights.arch in names else min(names, key=distance)
    return arch, {**cfg, **overrides}, notes


# -- loading into a built model ----------------------------------------------------------------


def load_state(model: nn.Module, state: dict[str, Tensor], source: str, strict: bool = True) -> None:
    """``load_state_dict`` with messages that name the offending parameters."""
    own = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"shape mismatch loading {source}:\n  " + "\n  ".join(bad))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def is_sincos_table(t: Tensor) -> bool:
    """Whether ``t`` (1, 1 + L, D) is the fixed 2D sin-cos table (zero cls row) of a square grid."""
    tokens = t.shape[-2] - 1
    side = math.isqrt(max(tokens, 0))
    if side * side != tokens or t.shape[-1] % 4:
        return False
    ref = sincos_2d(t.shape[-1], (side, side), cls_token=True)
    return torch.allclose(t.reshape(ref.shape).float(), ref, atol=1e-5)


def _select(
    own: dict[str, Tensor], weights: Weights, model_name: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str], list[str]]:
    """(tensors to load, extras left over, notes, ignored decoder keys) for a lenient load."""
    state = dict(weights.state)
    extras = dict(weights.extras)
    notes = list(weights.notes)
    for key in FIXED:
        t = state.get(key)
        if t is None or key not in own:
            continue
        if not t.any():
            del state[key]
            notes.append(
                f"{key} is all zeros in the file (transformers 5 leaves it unset when a model is built from a "
                "config); using the fixed sin-cos table"
            )
        elif t.shape != own[key].shape and is_sincos_table(t):
            del state[key]
            notes.append(f"{key}: the file's sin-cos table is for another grid; recomputed for this model's")
        elif t.shape == own[key].shape and not torch.allclose(t.float(), own[key].float(), atol=1e-5):
            notes.append(f"{key} in the file is not the fixed sin-cos table; loaded as stored")

    ignored, unknown = [], []
    for key in list(state):
        if key in own:
            continue
        if key.startswith(DECODER_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
        del state[key]
    if unknown:
        raise ValueError(
            f"{weights.source}: {len(unknown)} tensors have no place in {model_name}: "
            f"{abbrev(sorted(unknown))}. The checkpoint's architecture differs from openmae's ViT "
            "(layer scale, qk-norm, register tokens or a different block layout)"
        )
    if ignored:
        notes.append(f"{len(ignored)} decoder tensors ignored: this model has no decoder")
    for key in list(extras):
        if key in own:
            state[key] = extras.pop(key)

    return state, extras, notes, ignored


def load_into(model: nn.Module, weights: Weights, arch: str | None = None, strict: bool = False) -> LoadReport:
    """Load ``weights`` into a built model; refuse shape mismatches, report what is missing.

    Decoder tensors a model has no place for are ignored; ``head.*`` / ``fc_norm.*`` go into the
    model when it has them and into ``report.extras`` otherwise. Any other unknown tensor means the
    architectures differ, and is refused. ``strict`` (openmae's own files, which record the exact
    model): every tensor must fit and none may be missing.
    """
    model = unwrap(model)
    own = model.state_dict()
    if strict:
        state, extras, notes, ignored = dict(weights.state), {}, list(weights.notes), []
        load_state(model, state, source=weights.source, strict=True)
    else:
        state, extras, notes, ignored = _select(own, weights, arch or type(model).__name__)
        load_state(model, state, source=weights.source, strict=False)
    missing = [k for k in own if k not in state and k not in FIXED]
    if not weights.has_decoder and any(k.startswith(DECODER_PREFIXES) for k in own):
        notes.append("no decoder: reconstruction unavailable (the decoder keeps its random initialisation)")
    if "norm.weight" in missing:
        notes.append(
            "no final norm in the file (fine-tuned with global pooling, where fc_norm replaces it); "
            "norm keeps its initial value"
        )
    if "head.weight" in extras:
        n_classes = extras["head.weight"].shape[0]
        notes.append(
            f"classifier head: {n_classes} classes; load with openmae finetune "
            "(the head and fc_norm tensors are in report.extras)"
        )
    norm_pix = weights.config.get("norm_pix_loss")
    report = LoadReport(
        source=weights.source,
        format=weights.format,
        kind=weights.kind,
        arch=arch or getattr(model, "arch", type(model).__name__),
        config=dict(getattr(model, "config", {}) or {}),
        loaded=sorted(state),
        missing=missing,
        ignored=ignored,
        notes=notes,
        extras=extras,
        mask_ratio=weights.mask_ratio,
        has_decoder=weights.has_decoder,
        norm_pix_loss=None if norm_pix is None else bool(norm_pix),
    )
    return report
