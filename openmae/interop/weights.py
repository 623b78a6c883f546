"""What every reader shares: a checkpoint as :class:`Weights` in openmae's parameter names, the
:class:`LoadReport` of loading it, and safe ways to open weight files.

Nothing here unpickles code: ``.pth``/``.bin`` files go through ``torch.load(weights_only=True)``
with one extra allowed class, the ``argparse.Namespace`` that official MAE checkpoints carry.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openmae.io import read_safetensors

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
        """MAE's decoder, or SimMIM's pixel head."""
        return "decoder_embed.weight" in self.state or "decoder_pred.weight" in self.state


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
            lines.append("  missing: " + abbrev(self.missing))
        if self.ignored:
            lines.append("  ignored: " + abbrev(self.ignored))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


def abbrev(names: list[str], limit: int = 6) -> str:
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
    if any(k.startswith("head.") and k.endswith("weight") for k in extras):
        return "fine-tuned classifier"
    if "decoder_embed.weight" in state:
        return "encoder + decoder"
    return "encoder only"


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
