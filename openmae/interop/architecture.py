"""From a :class:`Weights` to a built model: the architecture a file implies (recorded config, then
tensor shapes, then standard head counts) and loading into a model with a :class:`LoadReport`.

A file's description is checked before anything is built from it: every size it declares must be a
sane whole number (:data:`LIMITS`), agree with the tensors it holds (a recorded ``embed_dim`` with
the patch embedding's width, ...), and the model it describes must not need far more memory than
its tensors hold (:func:`check_allocation`). Loading is strict: an encoder tensor the file lacks,
or a decoder it holds only part of, is an error naming them unless the caller allows a partial load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.interop.swin import infer_swin_config, is_swin_state
from openmae.interop.weights import (
    CLASSIFIER_PREFIXES,
    DECODER_PARTS,
    DECODER_PREFIXES,
    FIXED,
    PARTIAL_NOTE,
    LoadReport,
    Weights,
    abbrev,
    plural,
    shown,
)
from openmae.io import unwrap
from openmae.models import list_models, model_factory
from openmae.patches import is_sincos, resample_pos_embed, to_2tuple

# -- architecture from shapes ------------------------------------------------------------------


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def tensor_shape(state: dict[str, Tensor], key: str, ndims: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of ``state[key]`` (None when absent), refused unless it has one of ``ndims``
    dimensions, none of them empty: the shapes a model is built from must be real ones."""
    t = state.get(key)
    if t is None:
        return None
    if t.dim() not in ndims or 0 in t.shape:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(
            f"{key} has shape {tuple(t.shape)}, where a {want} tensor with no empty dimension belongs; the file is "
            "damaged or not a ViT checkpoint"
        )
    return tuple(t.shape)


def infer_config(state: dict[str, Tensor]) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments implied by tensor shapes (heads are not: they leave no trace in shapes).

    ``img_size`` comes from the length of ``pos_embed`` (cls row + a square grid assumed).
    """
    notes: list[str] = []
    if "patch_embed1.proj.weight" in state:
        raise ValueError(
            "this looks like a ConvMAE checkpoint, whose architecture cannot be inferred; build the model "
            "and load into it: openmae.create_model('convmae_base_patch16', pretrained=path, ...)"
        )
    w = tensor_shape(state, "patch_embed.proj.weight", (4,))
    if w is None:
        raise ValueError(
            "no conv patch embedding (patch_embed.proj.weight): not a ViT / MAE checkpoint whose shapes say its "
            "architecture; build the model and load into it: openmae.create_model(name, pretrained=path)"
        )
    dim, chans, ph, pw = w
    if ph != pw:
        raise ValueError(f"patch_embed.proj.weight has non-square {ph}x{pw} patches; openmae's ViT needs square ones")
    cfg: dict[str, Any] = {"embed_dim": dim, "in_chans": chans, "patch_size": ph, "depth": _depth(state, "blocks.")}
    fc1 = tensor_shape(state, "blocks.0.mlp.fc1.weight", (2,))
    if fc1 is not None:
        cfg["mlp_ratio"] = fc1[0] / dim
    pos = tensor_shape(state, "pos_embed", (2, 3))
    if pos is not None:
        tokens = pos[-2] - 1
        side = math.isqrt(tokens)
        if side * side == tokens:
            cfg["img_size"] = side * ph
        else:
            notes.append(f"pos_embed holds {tokens + 1} rows, not a cls row plus a square grid; pass img_size=(H, W)")
    decoder = tensor_shape(state, "decoder_embed.weight", (2,))
    if decoder is not None:
        cfg["decoder_embed_dim"] = decoder[0]
        cfg["decoder_depth"] = _depth(state, "decoder_blocks.")
        dfc1 = tensor_shape(state, "decoder_blocks.0.mlp.fc1.weight", (2,))
        if dfc1 is not None and "mlp_ratio" in cfg and dfc1[0] / cfg["decoder_embed_dim"] != cfg["mlp_ratio"]:
            raise ValueError(
                f"decoder MLP ratio {dfc1[0] / cfg['decoder_embed_dim']} differs from the encoder's "
                f"{cfg['mlp_ratio']}; openmae's MAE uses one mlp_ratio for both"
            )
    return cfg, notes


# -- what a file may declare -------------------------------------------------------------------

# The largest value of each size that any model openmae builds could have (ViT-22B is 6144 wide and
# 48 deep); a file declaring more is damaged, and is refused before anything is allocated.
LIMITS = {
    "img_size": 16384,
    "patch_size": 1024,
    "in_chans": 1024,
    "embed_dim": 16384,
    "decoder_embed_dim": 16384,
    "depth": 512,
    "decoder_depth": 512,
    "depths": 512,
    "num_heads": 1024,
    "decoder_num_heads": 1024,
    "window_size": 256,
    "num_classes": 1_000_000,
}
MAX_STAGES = 8  # entries of a per-stage list (Swin's depths, ConvMAE's widths)
SWITCHES = ("norm_pix_loss", "mask_token_in_encoder", "pixel_head", "qkv_bias", "head_norm", "fc_norm")  # fc_norm: None = auto
CAN_BE_ZERO = ("depth", "decoder_depth", "depths", "num_classes", "window_size")  # window 0: global attention
# Sizes that shapes show: a declared value must agree with the tensor that carries it.
SHAPE_KEYS = ("embed_dim", "in_chans", "patch_size", "mlp_ratio", "decoder_embed_dim")
SWIN_SHAPE_KEYS = ("embed_dim", "in_chans", "patch_size", "window_size", "num_heads", "mlp_ratio")
# Building may allocate what the file's tensors hold times this margin (an encoder-only file still
# gets the paper's decoder; Swin's window tables), plus this many values (256 MB in fp32).
ALLOC_MARGIN = 4
ALLOC_SLACK = 2**26


def _where(key: str, weights: Weights, overrides: dict[str, Any]) -> str:
    if key in overrides:
        return f"the override {key}"
    return f"{weights.source}: {weights.origin.get(key, f'its {key}')}"


def _fix(key: str, overrides: dict[str, Any]) -> str:
    if key in overrides:
        return f"change the {key} override"
    return f"the file's description is damaged: re-export it, or pass {key}=... yourself"


def check_config(cfg: dict[str, Any], weights: Weights, overrides: dict[str, Any]) -> None:
    """Refuse a size that is not a whole number in range (:data:`LIMITS`), a ratio that is not a
    positive number, a switch that is not true or false, or any value that is not plain data (a
    pickled record may hold anything), naming where it was declared (the file's entry, or an override)."""
    plain = (type(None), bool, int, float, str)
    for key, value in cfg.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, plain) for v in items):
            raise ValueError(
                f"{_where(key, weights, overrides)} is {shown(value)}, not plain data; {_fix(key, overrides)}"
            )
    for key in SWITCHES:
        if key in cfg and not isinstance(cfg[key], bool) and not (key == "fc_norm" and cfg[key] is None):
            raise ValueError(
                f"{_where(key, weights, overrides)} is {shown(cfg[key])}, not true or false; {_fix(key, overrides)}"
            )
    for key, limit in LIMITS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        entries = (2, 2) if key == "img_size" else (1, MAX_STAGES)  # (H, W); one per stage
        expected = "a pair (H, W)" if key == "img_size" else f"one to {MAX_STAGES} entries"
        if isinstance(value, (list, tuple)) and not entries[0] <= len(values) <= entries[1]:
            raise ValueError(
                f"{_where(key, weights, overrides)} is {shown(value)}: {expected} was expected; {_fix(key, overrides)}"
            )
        low = 0 if key in CAN_BE_ZERO else 1
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(
                    f"{_where(key, weights, overrides)} is {shown(value)}, not a whole number >= {low}; "
                    f"{_fix(key, overrides)}"
                )
            if v > limit:
                raise ValueError(
                    f"{_where(key, weights, overrides)} is {shown(value)}, beyond any model openmae builds (at most "
                    f"{limit:,}); {_fix(key, overrides)}"
                )
    for key, high in (("mlp_ratio", 64.0), ("norm_eps", 1.0)):  # ConvMAE gives a ratio per stage
        value = cfg.get(key)
        values = list(value) if key == "mlp_ratio" and isinstance(value, (list, tuple)) and value else [value]
        for v in values:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= high
            if key in cfg and not (ok and (v > 0 or key == "norm_eps")):
                raise ValueError(
                    f"{_where(key, weights, overrides)} is {shown(value)}, not a number in (0, {high}]; "
                    f"{_fix(key, overrides)}"
                )


def _agree(keys: tuple[str, ...], shaped: dict[str, Any], weights: Weights, overrides: dict[str, Any]) -> None:
    """Refuse a declared size that its tensors contradict (the file describes another model)."""
    for key in keys:
        if key in overrides or key not in weights.config or key not in shaped:
            continue
        declared, actual = weights.config[key], shaped[key]
        if isinstance(actual, float):
            same = (
                isinstance(declared, (int, float)) and not isinstance(declared, bool) and math.isclose(declared, actual)
            )
        else:
            same = declared == actual or (isinstance(declared, (list, tuple)) and list(declared) == list(actual))
        if not same:
            raise ValueError(
                f"{_where(key, weights, overrides)} is {shown(declared)}, but its tensors give {shown(actual)}: the "
                "file contradicts itself; re-export it, or pass the value its tensors give"
            )
    depth, declared = shaped.get("depth"), weights.config.get("depth")
    if isinstance(depth, int) and isinstance(declared, int) and "depth" not in overrides and declared < depth:
        raise ValueError(
            f"{_where('depth', weights, overrides)} is {declared}, but the file holds blocks up to blocks.{depth - 1}: "
            "the file contradicts itself; re-export it"
        )


def allocation_estimate(cfg: dict[str, Any]) -> int:
    """About how many values building a model with ``cfg`` allocates (weights and fixed tables): within
    a factor of two for every family openmae registers (tested); sizes ``cfg`` leaves out take ViT-B's."""
    h, w = to_2tuple(cfg.get("img_size", 224))
    patch = cfg.get("patch_size", 4)  # ConvMAE has none: its first stage embeds 4x4 patches
    tokens = -(-h // patch) * -(-w // patch)
    ratio = cfg.get("mlp_ratio", 4.0)
    ratio = max(float(max(ratio) if isinstance(ratio, (list, tuple)) else ratio), 1.0)

    def block(width: int) -> int:  # two norms, qkv, projection, MLP
        return int((4 + 2 * ratio) * width * width)

    def as_list(value: Any) -> list[int]:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    depths = as_list(cfg.get("depths", cfg.get("depth", 12)))
    widths = as_list(cfg.get("embed_dim", 768))
    if "depths" in cfg:  # Swin doubles its width at every stage
        widths = [widths[0] * 2**s for s in range(len(depths))]
    widths = widths + widths[-1:] * (len(depths) - len(widths))
    window = cfg.get("window_size", 0) if "depths" in cfg else 0  # Swin's position index and shift mask
    total = sum(n * (block(d) + window**4 + tokens * window**2) for n, d in zip(depths, widths))
    width, decoder = max(widths), cfg.get("decoder_embed_dim", 0)
    total += cfg.get("decoder_depth", 0) * block(decoder) + width * decoder
    total += 2 * tokens * (width + decoder) + cfg.get("in_chans", 3) * patch * patch * (width + decoder)
    return total + cfg.get("num_classes", 0) * width


def check_allocation(arch: str, cfg: dict[str, Any], weights: Weights) -> None:
    """Refuse to build a model far larger than the tensors of the file it is built from."""
    held = sum(t.numel() for t in (*weights.state.values(), *weights.extras.values()))
    needed = allocation_estimate(cfg)
    if needed > ALLOC_MARGIN * held + ALLOC_SLACK:
        raise ValueError(
            f"{weights.source}: the {arch} it describes would allocate about {needed:,} values, far more than the "
            f"{held:,} its tensors hold; its description (sizes, depth, image size) is damaged: re-export it, or "
            "pass the sizes yourself"
        )


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

    Every declared size is checked (:func:`check_config`) and compared with the tensors that carry
    it; a file that contradicts itself is a ``ValueError`` naming the entry.

    Returns:
        (arch, config, notes): notes say what had to be assumed.
    """
    overrides = dict(overrides or {})
    if weights.complete:
        cfg = {**weights.config, **overrides}
        check_config(cfg, weights, overrides)
        _check_record(weights, overrides)
        _pixel_head(weights.arch, cfg, weights)
        return weights.arch, cfg, []
    if is_swin_state(weights.state):
        arch, cfg, notes = _swin_architecture(weights, overrides)
        check_config(cfg, weights, overrides)
        return arch, cfg, notes
    notes: list[str] = []
    try:
        shaped, shape_notes = infer_config(weights.state)
    except ValueError as e:
        raise ValueError(f"{weights.source}: {e}") from None
    cfg = {**shaped, **weights.config}
    check_config({**cfg, **overrides}, weights, overrides)
    _agree(SHAPE_KEYS, shaped, weights, overrides)
    cfg.update({k: v for k, v in overrides.items() if k in ("embed_dim", "patch_size")})  # what the guesses read
    arch = weights.arch if weights.arch in mae_variants() else match_variant(cfg)
    if "num_heads" not in cfg and "num_heads" not in overrides:
        dim = cfg["embed_dim"]
        cfg["num_heads"] = VIT_SIZES[dim][1] if dim in VIT_SIZES else _guess_heads(dim, 64)
        if dim not in VIT_SIZES:
            notes.append(
                f"num_heads is not recorded in the file; assumed {cfg['num_heads']} (override with num_heads=...)"
            )
    has_width = "decoder_embed_dim" in cfg  # else the decoder's embedding is missing, and loading says so
    if weights.has_decoder and has_width and "decoder_num_heads" not in cfg and "decoder_num_heads" not in overrides:
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
    check_config(cfg, weights, overrides)
    _pixel_head(arch, cfg, weights)
    return arch, cfg, shape_notes + notes


def _pixel_head(arch: str, cfg: dict[str, Any], weights: Weights) -> None:
    """A decoder's pixel head is there when its tensors are, whatever the variant's default says (files
    written before the option existed record nothing about it)."""
    if arch in mae_variants() and "pixel_head" not in cfg and weights.has_decoder:
        cfg["pixel_head"] = any(k.startswith("decoder_pred_pixel.") for k in weights.state)


def _check_record(weights: Weights, overrides: dict[str, Any]) -> None:
    """An openmae record against its own tensors (ViT and Swin families; ConvMAE's shapes are not read)."""
    try:
        if is_swin_state(weights.state) and "patch_embed.proj.weight" in weights.state:
            _agree(SWIN_SHAPE_KEYS, infer_swin_config(weights.state)[0], weights, overrides)
        elif "patch_embed.proj.weight" in weights.state and "patch_embed1.proj.weight" not in weights.state:
            _agree(SHAPE_KEYS, infer_config(weights.state)[0], weights, overrides)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(weights.source) else f"{weights.source}: {message}") from None


def _swin_architecture(weights: Weights, overrides: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """A Swin classifier (``swin_*``) or, with SimMIM's pixel head, its pretraining model (``simmim_swin_*``)."""
    try:
        cfg, notes = infer_swin_config(weights.state)
    except ValueError as e:
        raise ValueError(f"{weights.source}: {e}") from None
    _agree(SWIN_SHAPE_KEYS, cfg, weights, overrides)
    cfg.update(weights.config)
    check_config({**cfg, **overrides}, weights, overrides)
    if "img_size" in weights.config or "img_size" in overrides:
        notes = [n for n in notes if not n.startswith("img_size")]
    family = "simmim_swin_" if "decoder_pred.weight" in weights.state else "swin_"
    names = [n for n in list_models(family) if n.startswith(family)]
    if not names:
        raise ValueError(f"{weights.source} holds Swin weights, but no {family}* model is registered")
    if family == "swin_":  # a classifier's head, or none: features out
        head = weights.extras.get("head.fc.weight")
        cfg["num_classes"] = 0 if head is None or head.dim() == 0 else int(head.shape[0])

    def distance(name: str) -> tuple:  # the variant of the same width and depths, else the nearest
        defaults = model_factory(name).defaults
        same_depths = tuple(defaults.get("depths", ())) == tuple(cfg["depths"])
        return abs(defaults.get("embed_dim", 0) - cfg["embed_dim"]), not same_depths

    arch = weights.arch if weights.arch in names else min(names, key=distance)
    return arch, {**cfg, **overrides}, notes


# -- loading into a built model ----------------------------------------------------------------

# What only pretraining uses, set aside when loading into a model without a decoder (a classifier):
# the decoder, ConvMAE's fusion of the early stages into it, and MAE's optional encoder mask token.
PRETRAINING_ONLY = DECODER_PARTS + ("encoder_mask_token",)


def _mismatches(own: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    """What cannot be copied into the model: other shapes, or integers where it has floats."""
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    bad += [
        f"{k}: checkpoint {v.dtype} vs model {own[k].dtype}"
        for k, v in state.items()
        if k in own and own[k].is_floating_point() and not v.is_floating_point()
    ]
    return bad


def _mismatch_error(source: str, bad: list[str]) -> ValueError:
    return ValueError(
        f"shape mismatch loading {source} ({plural(len(bad), 'tensor')} of another shape or type): "
        f"{'; '.join(bad[:6])}"
        f"{' ...' if len(bad) > 6 else ''}; build the model the file describes, or pass its sizes"
    )


def load_state(model: nn.Module, state: dict[str, Tensor], source: str, strict: bool = True) -> None:
    """``load_state_dict`` with messages that name the offending parameters."""
    own = model.state_dict()
    bad = _mismatches(own, state)
    if bad:
        raise _mismatch_error(source, bad)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


# -- position tables on another grid -----------------------------------------------------------


def token_grid(model: nn.Module) -> tuple[int, int] | None:
    """The (gh, gw) token grid a model's position tables cover (ViT, MAE, ConvViT's stage 3); None
    for a model without one (Swin has no absolute position table)."""
    grid = getattr(model, "grid_size", None)
    if grid is None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) and len(grid) == 2 else None


def recorded_grid(weights: Weights, patch_size: int) -> tuple[int, int] | None:
    """The token grid of the image size a file records (``img_size`` int or (H, W)), None when it
    records none that makes sense (a file's record is not trusted here: see :func:`check_config`)."""
    size = weights.config.get("img_size")
    sizes = [size, size] if isinstance(size, int) else size
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= patch_size for v in sizes):
        return None
    return (sizes[0] // patch_size, sizes[1] // patch_size)


def file_grid(rows: int, weights: Weights, patch_size: int) -> tuple[int, int] | None:
    """The grid a file's position table of ``rows`` grid rows covers: the recorded image size's when
    it fits, else the square one; None when neither does (a non-square grid the file does not record)."""
    recorded = recorded_grid(weights, patch_size)
    if recorded is not None and recorded[0] * recorded[1] == rows:
        return recorded
    side = math.isqrt(rows)
    return (side, side) if side * side == rows else None


def fit_position_tables(
    state: dict[str, Tensor], own: dict[str, Tensor], weights: Weights, grid: tuple[int, int], patch_size: int
) -> tuple[list[str], dict[str, str]]:
    """Fit the file's position tables (``pos_embed``, ``decoder_pos_embed``) in ``state`` to the
    model's token ``grid``, in place: fine-tuning at another resolution than pretraining.

    A table that differs from the model's only in its number of grid rows is resampled with
    :func:`~openmae.patches.resample_pos_embed` (a fixed sin-cos table recomputed for the new grid,
    a learned one bicubically; the cls row kept) from the grid of the image size the file records,
    else the square grid of its rows. Any other difference (width, layout) is left for the shape check.

    An all-zero table (transformers 5 leaves it unset) is left alone: it holds no positions.

    Returns:
        ({key: the note saying what was resampled}, {key: why a table could not be fitted}).
    """
    fitted: dict[str, str] = {}
    unfit: dict[str, str] = {}
    for key in FIXED:
        table, mine = state.get(key), own.get(key)
        if table is None or mine is None or not table.is_floating_point() or not table.any():
            continue
        prefix = mine.shape[-2] - grid[0] * grid[1]  # the cls row, if the model has one
        rows = table.shape[-2] - prefix
        same_layout = table.dim() == mine.dim() >= 2 and table.shape[:-2] == mine.shape[:-2]
        if not (same_layout and table.shape[-1] == mine.shape[-1] and prefix in (0, 1) and rows > 0):
            continue
        if table.shape == mine.shape:
            # as many rows on another grid (6x4 and 4x6) only when the file records its size: a
            # table of a square count is not assumed square when it already fits
            recorded = recorded_grid(weights, patch_size)
            if recorded is None or recorded == tuple(grid) or recorded[0] * recorded[1] != rows:
                continue
        src = file_grid(rows, weights, patch_size)
        if src is None:
            unfit[key] = (
                f"its {rows} grid rows form no square grid and the file records no image size that gives them, "
                "so the grid it was trained on is unknown"
            )
            continue
        flat = table.reshape(1, -1, table.shape[-1])  # (1, prefix + gh * gw, D)
        how = (
            "fixed sin-cos: recomputed for the new grid"
            if is_sincos(flat[:, prefix:], src)
            else "learned: bicubic" + (", the cls row kept" if prefix else "")
        )
        state[key] = resample_pos_embed(flat, src, grid, prefix).reshape(mine.shape)
        fitted[key] = f"{key} resampled from {src[0]}x{src[1]} to {grid[0]}x{grid[1]} ({how})"
    return fitted, unfit


@dataclass
class LoadPlan:
    """What loading a file into a model would do, before anything is copied.

    Attributes:
        state: tensors to copy, under the model's names.
        extras: file tensors the model has no place for but a user may want (a classifier's head).
        notes: what the report will say.
        ignored: pretraining tensors the model has no place for (it has no decoder; or a classifier's fc_norm
            replaces the final norm).
        unexpected: other tensors with no place in the model: another architecture.
        mismatched: tensors of another shape or type than the model's (``name: checkpoint ... vs model ...``).
        missing_encoder: encoder tensors the file lacks (a classifier's new head, the fixed position tables,
            and a final norm the file's fc_norm replaces are not counted).
        missing_decoder: decoder tensors the file lacks.
        partial_decoder: the file holds a decoder, but not all of it.
    """

    state: dict[str, Tensor]
    extras: dict[str, Tensor]
    notes: list[str]
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing_encoder: list[str] = field(default_factory=list)
    missing_decoder: list[str] = field(default_factory=list)
    partial_decoder: bool = False


def plan_load(
    own: dict[str, Tensor],
    weights: Weights,
    exact: bool = False,
    grid: tuple[int, int] | None = None,
    patch_size: int | None = None,
) -> LoadPlan:
    """Match a file's tensors to a model's state dict (``own``) without changing the model.

    ``exact`` (openmae's own files, loaded into the model they record): every tensor is the model's.
    Otherwise decoder tensors a model without decoder has no place for are ignored, and ``head.*`` /
    ``fc_norm.*`` go into the model when it has them and into ``extras`` otherwise. Either way, with
    the model's token ``grid`` and ``patch_size``, position tables of another grid are fitted to it
    (:func:`fit_position_tables`).
    """
    state = dict(weights.state)
    fitted: dict[str, str] = {}
    unfit: dict[str, str] = {}
    if grid is not None and patch_size:
        fitted, unfit = fit_position_tables(state, own, weights, grid, patch_size)
    if exact:
        plan = LoadPlan(state, {}, list(weights.notes), unexpected=sorted(k for k in state if k not in own))
        for k in plan.unexpected:
            del state[k]
    else:
        plan = _select(own, weights, state, set(fitted))
    plan.notes.extend(fitted.values())
    plan.mismatched = [
        f"{line} ({unfit[key]})" if (key := line.split(":")[0]) in unfit else line
        for line in _mismatches(own, plan.state)
    ]
    missing = [k for k in own if k not in plan.state and k not in FIXED]
    replaced_norm = any(k.startswith("fc_norm.") for k in (*weights.state, *weights.extras))
    plan.missing_decoder = [k for k in missing if k.startswith(DECODER_PARTS)]
    plan.missing_encoder = [
        k
        for k in missing
        if not k.startswith(DECODER_PARTS + CLASSIFIER_PREFIXES) and not (replaced_norm and k.startswith("norm."))
    ]
    plan.partial_decoder = bool(plan.missing_decoder) and weights.has_decoder
    return plan


def _select(own: dict[str, Tensor], weights: Weights, state: dict[str, Tensor], fitted: set[str]) -> LoadPlan:
    """The lenient match of :func:`plan_load`, on ``state`` (the file's tensors, the position tables
    in ``fitted`` already fitted to the model's grid)."""
    extras = dict(weights.extras)
    notes = list(weights.notes)
    for key in FIXED:
        t = state.get(key)
        if t is None or key not in own or key in fitted:
            continue
        if t.shape[-1:] == own[key].shape[-1:] and t.is_floating_point() and not t.any():
            del state[key]
            notes.append(
                f"{key} is all zeros in the file (transformers 5 leaves it unset when a model is built from a "
                "config); using the fixed sin-cos table"
            )
        elif (
            t.shape == own[key].shape
            and t.is_floating_point()
            and not own[key].is_meta  # inspect compares shapes only
            and not torch.allclose(t.float(), own[key].float(), atol=1e-5)
        ):
            notes.append(f"{key} in the file is not the fixed sin-cos table; loaded as stored")

    ignored, unknown, unused_norm = [], [], []
    # a classifier that pools with fc_norm has no final norm (timm's and the paper's fine-tuning layout)
    pools_with_fc_norm = any(k.startswith("fc_norm.") for k in own) and not any(k.startswith("norm.") for k in own)
    for key in list(state):
        if key in own:
            continue
        if key.startswith(PRETRAINING_ONLY):
            ignored.append(key)
        elif key.startswith("norm.") and pools_with_fc_norm:
            unused_norm.append(key)
        else:
            unknown.append(key)
        del state[key]
    if ignored:
        notes.append(f"{plural(len(ignored), 'decoder tensor')} ignored: this model has no decoder")
    if unused_norm:
        notes.append("the final norm is not used: fc_norm on the pooled patch tokens replaces it")
    for key in list(extras):
        if key in own:
            state[key] = extras.pop(key)
    return LoadPlan(state, extras, notes, ignored=ignored + unused_norm, unexpected=sorted(unknown))


def incomplete_message(source: str, plan: LoadPlan, arch: str) -> str:
    """Why a strict load refuses ``plan``, naming the tensors the file lacks."""
    parts = []
    if plan.missing_encoder:
        parts.append(
            f"{plural(len(plan.missing_encoder), 'tensor')} of {arch}'s encoder ({abbrev(plan.missing_encoder, 4)})"
        )
    if plan.partial_decoder:
        parts.append(
            f"{plural(len(plan.missing_decoder), 'tensor')} of its decoder ({abbrev(plan.missing_decoder, 4)}) "
            "although it holds the rest of one"
        )
    return (
        f"{source} lacks {' and '.join(parts)}: the file is incomplete (an interrupted save or export?) or holds "
        "another architecture; re-export it, or pass --allow-partial (Python: allow_partial=True) to load it with "
        "those tensors left at their initial values"
    )


def load_into(
    model: nn.Module, weights: Weights, arch: str | None = None, strict: bool = False, *, allow_partial: bool = False
) -> LoadReport:
    """Load ``weights`` into a built model with a :class:`LoadReport` (also in the return value only).

    Refused with a ``ValueError`` naming the tensors: any of another shape; any the model has no place for
    (decoder tensors of a model without decoder are ignored; ``head.*`` / ``fc_norm.*`` go into
    ``report.extras``); and, unless ``allow_partial``, an encoder tensor the file lacks or a decoder it
    holds only part of. A file without any decoder is reported, not refused: the decoder keeps its
    initial values. ``strict``: the file records this exact model (openmae's own files), so nothing is
    renamed, recomputed or set aside.
    """
    model = unwrap(model)
    own = model.state_dict()
    name = arch or getattr(model, "arch", type(model).__name__)
    patch = getattr(model, "patch_size", None)
    plan = plan_load(own, weights, exact=strict, grid=token_grid(model), patch_size=patch)
    if plan.unexpected and strict:
        raise ValueError(
            f"{weights.source} does not match {name}: {plural(len(plan.unexpected), 'tensor')} with no place in the "
            f"model ({abbrev(plan.unexpected)}); its description and its tensors disagree: re-export it"
        )
    if plan.unexpected:
        raise ValueError(
            f"{weights.source}: {plural(len(plan.unexpected), 'tensor')} with no place in {name}: "
            f"{abbrev(plan.unexpected)}. The checkpoint's architecture differs from openmae's ViT "
            "(layer scale, qk-norm, register tokens or a different block layout)"
        )
    if plan.mismatched:
        raise _mismatch_error(f"{weights.source}", plan.mismatched)
    accepted = plan.missing_encoder + (plan.missing_decoder if plan.partial_decoder else [])
    if accepted and not allow_partial:
        raise ValueError(incomplete_message(weights.source, plan, name))
    model.load_state_dict(plan.state, strict=False)
    notes = plan.notes
    if accepted:
        notes.append(
            f"{PARTIAL_NOTE}: {plural(len(accepted), 'tensor')} not in the file keep their initial values: "
            f"{abbrev(accepted)}"
        )
    missing = [k for k in own if k not in plan.state and k not in FIXED]
    if not weights.has_decoder and any(k.startswith(DECODER_PREFIXES) for k in own):
        notes.append("no decoder: reconstruction unavailable (the decoder keeps its random initialisation)")
    if "norm.weight" in missing and "norm.weight" not in plan.missing_encoder:
        notes.append(
            "no final norm in the file (fine-tuned with global pooling, where fc_norm replaces it); "
            "norm keeps its initial value"
        )
    if "head.weight" in plan.extras:
        n_classes = plan.extras["head.weight"].shape[0] if plan.extras["head.weight"].dim() else 0
        notes.append(
            f"classifier head: {n_classes} classes; load with openmae finetune "
            "(the head and fc_norm tensors are in report.extras)"
        )
    norm_pix = weights.config.get("norm_pix_loss")
    return LoadReport(
        source=weights.source,
        format=weights.format,
        kind=weights.kind,
        arch=name,
        config=dict(getattr(model, "config", {}) or {}),
        loaded=sorted(plan.state),
        missing=missing,
        ignored=plan.ignored,
        notes=notes,
        extras=plan.extras,
        mask_ratio=weights.mask_ratio,
        has_decoder=weights.has_decoder,
        norm_pix_loss=None if norm_pix is None else bool(norm_pix),
    )
