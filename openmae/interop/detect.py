"""What a checkpoint is, read into openmae's parameter names, before any model is built.

Every reader returns a :class:`Weights`: the tensors under openmae's (official MAE) names, the
constructor arguments the file records, tensors the MAE has no place for (a classifier head) and
notes. :func:`infer_architecture` fills in what the file does not record from tensor shapes, and
:func:`load_into` loads a :class:`Weights` into a built model and returns a :class:`LoadReport`.

Nothing here unpickles code: ``.pth``/``.bin`` files go through ``torch.load(weights_only=True)``
with one extra allowed class, the ``argparse.Namespace`` that official MAE checkpoints carry.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.checkpoint import read_safetensors
from openmae.patches import sincos_2d

FORMATS = ("openmae", "official", "hf", "timm")
# Fixed sin-cos tables: recomputed, never trained, so a file need not carry them.
FIXED = ("pos_embed", "decoder_pos_embed")
DECODER_PREFIXES = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
)
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")


class UnsafeCheckpointError(ValueError):
    """The file needs code, not just tensors and plain containers, to be unpickled."""


@dataclass
class Weights:
    """A checkpoint in openmae's parameter names.

    Attributes:
        source: the path read.
        format: ``openmae``, ``official``, ``hf`` or ``timm``.
        kind: what the file holds, in words ("training checkpoint (epoch 399)", "encoder only", ...).
        state: tensors under openmae names (``blocks.0.attn.qkv.weight``, ``decoder_pred.bias``, ...).
        arch: registered model name the file records, if any.
        config: constructor arguments the file records (not those guessed from shapes).
        extras: tensors an MAE has no place for, e.g. a fine-tuned ``head.weight`` / ``fc_norm.*``.
        notes: what a user should know (defaults assumed, parts absent).
        mask_ratio: the mask ratio the file records, if any.
        complete: ``arch`` and ``config`` are openmae's own record (nothing to infer).
    """

    source: str
    format: str
    kind: str
    state: dict[str, Tensor]
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mask_ratio: float | None = None
    complete: bool = False

    @property
    def has_decoder(self) -> bool:
        return "decoder_embed.weight" in self.state


@dataclass
class LoadReport:
    """What a load did: which tensors went where, what stayed at its initial value, and why."""

    source: str
    format: str
    kind: str
    arch: str
    config: dict[str, Any]
    loaded: list[str]
    missing: list[str]  # model parameters left at their initial values
    ignored: list[str]  # file tensors the model did not take
    notes: list[str]
    extras: dict[str, Tensor] = field(default_factory=dict)
    mask_ratio: float | None = None
    has_decoder: bool = False
    norm_pix_loss: bool | None = None  # None: the file does not say

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.format} ({self.kind}) -> {self.arch}",
            f"  loaded {len(self.loaded)} tensors; missing {len(self.missing)}; ignored {len(self.ignored)}",
        ]
        if self.missing:
            lines.append("  missing: " + _abbrev(self.missing))
        if self.ignored:
            lines.append("  ignored: " + _abbrev(self.ignored))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


def _abbrev(names: list[str], limit: int = 6) -> str:
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -- reading files safely --------------------------------------------------------------------


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that only rebuilds tensors, plain containers and ``argparse.Namespace``.

    Raises:
        UnsafeCheckpointError: the pickle references anything else (for example ``os.system``);
            nothing from the file is executed.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it would need code beyond tensors and plain containers"
            f"{' (' + reason + ')' if reason else ''}. openmae never runs code from a checkpoint; if you trust "
            "the file's source, load it yourself and save its state dict as safetensors."
        ) from None


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` (e.g. DDP's ``module.``) when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def is_hf_state(keys: Any) -> bool:
    """Hugging Face ViTMAE names (both transformers 4 and 5)."""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.", "decoder.decoder_")) for k in keys)


def is_vit_state(keys: Any) -> bool:
    """Official MAE / timm / openmae names."""
    return any(k == "patch_embed.proj.weight" or k.startswith("blocks.") for k in keys)


def split_classifier(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate the fine-tuned classifier's ``head.*`` / ``fc_norm.*`` from the trunk."""
    extras = {k: v for k, v in state.items() if k.startswith(CLASSIFIER_PREFIXES)}
    return {k: v for k, v in state.items() if k not in extras}, extras


def describe(state: dict[str, Tensor], extras: dict[str, Tensor]) -> str:
    if "head.weight" in extras:
        return "fine-tuned classifier"
    if "decoder_embed.weight" in state:
        return "encoder + decoder"
    return "encoder only"


# -- detection ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def detect_format(path: str | Path) -> str:
    """``openmae``, ``official``, ``hf`` or ``timm``, from the file's own markers and key names.

    Directories: ``config.json`` with ``model_type: vit_mae`` is Hugging Face, one with
    ``architecture`` is timm, one with openmae's ``arch``/``config`` (or training checkpoints) is
    openmae. Safetensors files: openmae metadata, else the key names. Pickled files: a ``model``
    entry is official MAE; a bare state dict is timm (encoder) or official (with a decoder).
    """
    return _detect(Path(path))[0]


def is_openmae(path: str | Path) -> bool:
    """Cheap check (no unpickling): openmae's own safetensors file or directory."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return detect_format(path) == "openmae"
    return False


def _detect(path: Path) -> tuple[str, Any]:
    """(format, the unpickled object for ``.pth``-style files so it is read once, else None)."""
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        config = _read_json(path / "config.json") or {}
        if config.get("model_type") == "vit_mae":
            return "hf", None
        if "architecture" in config:
            return "timm", None
        if "arch" in config and "config" in config:
            return "openmae", None
        weights = find_weights_file(path)
        if weights is None:
            from openmae.checkpoint import latest_checkpoint

            if latest_checkpoint(path) is not None:
                return "openmae", None
            raise FileNotFoundError(
                f"{path} holds no weights (model.safetensors, pytorch_model.bin) and no training checkpoint"
            )
        return _detect(weights)[0], None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
        if "openmae" in meta:
            return "openmae", None
        if is_hf_state(keys):
            return "hf", None
        if any(k.startswith(DECODER_PREFIXES) for k in keys):
            return "official", None
        if is_vit_state(keys):
            return "timm", None
        raise ValueError(f"{path}: no ViT / MAE tensors recognised (first keys: {keys[:5]})")
    if path.name.endswith(".index.json"):
        return "hf", None
    obj = safe_torch_load(path)
    return _pickled_format(obj, path), obj


def _pickled_format(obj: Any, path: Path) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        return "hf" if is_hf_state(obj["model"]) else "official"
    state = obj.get("state_dict", obj)
    if is_hf_state(state):
        return "hf"
    if any(str(k).startswith(DECODER_PREFIXES) for k in state):
        return "official"
    if is_vit_state(strip_prefix(state, "module.")):
        return "timm"
    raise ValueError(f"{path}: no ViT / MAE tensors recognised (top-level keys: {list(obj)[:8]})")


def find_weights_file(folder: Path) -> Path | None:
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (folder / name).exists():
            return folder / name
    return None


def read_state_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (and safetensors metadata) of one weights file, or of all shards of an index."""
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        state: dict[str, Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_state_file(path.parent / shard)[0])
        return state, {}
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj, {}


def read_weights(path: str | Path) -> Weights:
    """Read any supported checkpoint into openmae names (see :func:`detect_format`)."""
    from openmae.interop import hf, official, timm

    path = Path(path)
    fmt, obj = _detect(path)
    if fmt == "hf":
        return hf.read(path, obj)
    if fmt == "timm":
        return timm.read(path, obj)
    if fmt == "official":
        return official.read(path, obj)
    return _read_openmae(path)


def _read_openmae(path: Path) -> Weights:
    from openmae.checkpoint import _split_model_state, resolve_weights_file

    file = resolve_weights_file(path)
    tensors, meta = read_safetensors(file)
    info = json.loads(meta["openmae"])
    kind = "training checkpoint" if "training" in meta else "exported model"
    state = _split_model_state(tensors)
    return Weights(str(path), "openmae", kind, state, arch=info["arch"], config=dict(info["config"]), complete=True)


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


# Standard ViT widths (METHOD.md): heads, and the size word in registered names.
VIT_SIZES = {192: ("tiny", 3), 384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1280: ("huge", 16)}
DECODER_HEADS = {512: 16}  # the paper's decoder


def mae_variants() -> list[str]:
    from openmae.registry import list_models

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


# -- loading into a built model ----------------------------------------------------------------


def is_sincos_table(t: Tensor) -> bool:
    """Whether ``t`` (1, 1 + L, D) is the fixed 2D sin-cos table (zero cls row) of a square grid."""
    tokens = t.shape[-2] - 1
    side = math.isqrt(max(tokens, 0))
    if side * side != tokens or t.shape[-1] % 4:
        return False
    ref = sincos_2d(t.shape[-1], (side, side), cls_token=True)
    return torch.allclose(t.reshape(ref.shape).float(), ref, atol=1e-5)


def load_into(model: nn.Module, weights: Weights, arch: str | None = None) -> LoadReport:
    """Load ``weights`` into a built model; refuse shape mismatches, report what is missing.

    Decoder tensors a model has no place for are ignored; ``head.*`` / ``fc_norm.*`` go into the
    model when it has them and into ``report.extras`` otherwise. Any other unknown tensor means the
    architectures differ, and is refused.
    """
    from openmae.checkpoint import load_state, unwrap

    model = unwrap(model)
    own = model.state_dict()
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
            f"{weights.source}: {len(unknown)} tensors have no place in {arch or type(model).__name__}: "
            f"{_abbrev(sorted(unknown))}. The checkpoint's architecture differs from openmae's ViT "
            "(layer scale, qk-norm, register tokens or a different block layout)"
        )
    if ignored:
        notes.append(f"{len(ignored)} decoder tensors ignored: this model has no decoder")
    for key in list(extras):
        if key in own:
            state[key] = extras.pop(key)

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
