"""Which format a checkpoint is in, from the file's own markers and key names, before anything is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openmae.checkpoint import latest_checkpoint
from openmae.interop.weights import (
    DECODER_PREFIXES,
    find_weights_file,
    is_hf_state,
    is_vit_state,
    pickled_dict,
    read_json_object,
    safe_torch_load,
    safetensors_header,
    strip_prefix,
)
from openmae.io import DENSE_KEY, FORMAT_KEY

KNOWN = "openmae reads openmae, official MAE / ConvMAE / Swin / SimMIM, Hugging Face ViTMAE and timm weights"

# -- detection ---------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``openmae``, ``official``, ``hf`` or ``timm``, from the file's own markers and key names.

    Directories: ``config.json`` with ``model_type: vit_mae`` is Hugging Face, one with
    ``architecture`` is timm, one with openmae's ``arch``/``config`` (or training checkpoints) is
    openmae. Safetensors files: openmae metadata (a model's record, or a segment / detect model's, read
    for its encoder), else the key names. Pickled files: a ``model``
    entry is official MAE; a bare state dict is timm (encoder) or official (with a decoder).
    """
    return detect_file(Path(path))[0]


def is_openmae(path: str | Path) -> bool:
    """Cheap check (no unpickling): openmae's own safetensors file or directory."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return detect_format(path) == "openmae"
    return False


def detect_file(path: Path) -> tuple[str, Any]:
    """(format, the unpickled object for ``.pth``-style files so it is read once, else None)."""
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():  # a config.json that is there must be whole: it decides how the weights are read
        config = read_json_object(path / "config.json") if (path / "config.json").is_file() else {}
        if config.get("model_type") == "vit_mae":
            return "hf", None
        if "architecture" in config:
            return "timm", None
        if "arch" in config and "config" in config:
            return "openmae", None
        weights = find_weights_file(path)
        if weights is None:
            if latest_checkpoint(path) is not None:
                return "openmae", None
            raise FileNotFoundError(
                f"{path} holds no weights (model.safetensors, pytorch_model.bin) and no training checkpoint; point "
                "at a weights file, or a run folder that has one"
            )
        return detect_file(weights)[0], None
    if path.suffix == ".safetensors":
        meta, keys = safetensors_header(path)
        if FORMAT_KEY in meta or DENSE_KEY in meta:  # a dense model is read for its encoder (native.py)
            return "openmae", None
        if is_hf_state(keys):
            return "hf", None
        if any(k.startswith(DECODER_PREFIXES) for k in keys):
            return "official", None
        if is_vit_state(keys):
            return "timm", None
        raise ValueError(f"{path}: no ViT / MAE tensors recognised (first keys: {keys[:5]}); {KNOWN}")
    if path.name.endswith(".index.json"):
        return "hf", None
    obj = pickled_dict(safe_torch_load(path), path)
    return _pickled_format(obj, path), obj


def _pickled_format(obj: dict[str, Any], path: Path) -> str:
    if "model" in obj and isinstance(obj["model"], dict):
        return "hf" if is_hf_state(map(str, obj["model"])) else "official"
    state = obj.get("state_dict", obj)
    state = state if isinstance(state, dict) else obj
    if is_hf_state(map(str, state)):
        return "hf"
    if any(str(k).startswith(DECODER_PREFIXES) for k in state):
        return "official"
    if is_vit_state(strip_prefix({str(k): v for k, v in state.items()}, "module.")):
        return "timm"
    raise ValueError(f"{path}: no ViT / MAE tensors recognised (top-level keys: {list(obj)[:8]}); {KNOWN}")
