"""openmae's own files: one safetensors file (or a folder holding ``model.safetensors``) whose
metadata records the architecture and its constructor config, so the model rebuilds exactly.

Read: an exported model, a training checkpoint (its ``model/`` tensors), or a run folder (its
``model.safetensors``, else its newest training checkpoint). Write: :func:`write` (what
``openmae.save_pretrained`` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn
from torch import Tensor

from openmae.checkpoint import latest_checkpoint, split_model_state
from openmae.interop.weights import Weights, read_safetensors_file
from openmae.io import (
    DENSE_KEY,
    FORMAT_KEY,
    WEIGHTS_NAME,
    atomic_write_text,
    model_record,
    read_model_record,
    unwrap,
    write_safetensors,
)
from openmae.registry import arch_of


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """The file to read: ``path`` itself, or a folder's ``model.safetensors``, else its newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if not path.is_dir():
        return path
    if (path / WEIGHTS_NAME).exists():
        return path / WEIGHTS_NAME
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor a training checkpoint")
    return latest


def read(path: str | os.PathLike) -> Weights:
    file = resolve_weights_file(path)
    tensors, meta = read_safetensors_file(file)
    if DENSE_KEY in meta and FORMAT_KEY not in meta:
        return read_dense_encoder(path, file, tensors, meta[DENSE_KEY])
    try:
        record = read_model_record(meta)
    except ValueError as e:  # the metadata entry is not JSON
        raise ValueError(f"{file}: its openmae metadata is not valid JSON ({e}); re-export the model") from None
    if record is None:
        raise ValueError(
            f"{file} carries no openmae config; build the model yourself and use "
            "openmae.create_model(name, pretrained=path, ...)"
        )
    arch, config = record["arch"], record["config"]
    if not isinstance(arch, str) or not isinstance(config, dict):
        raise ValueError(
            f"{file}: its openmae metadata is damaged (arch must be a model name, config a JSON object of "
            "constructor arguments); re-export the model"
        )
    kind = "training checkpoint" if "training" in meta else "exported model"
    origin = {k: f"its openmae metadata's config.{k}" for k in config}
    return Weights(
        str(path),
        "openmae",
        kind,
        split_model_state(tensors),
        arch=arch,
        config=dict(config),
        complete=True,
        origin=origin,
    )


def read_dense_encoder(path: str | os.PathLike, file: Path, tensors: dict[str, Tensor], entry: str) -> Weights:
    """The encoder of a model saved by ``openmae segment`` / ``detect``: the tensors under the model's one
    ``encoder`` module (every pyramid keeps its encoder there: ``backbone.encoder.`` in a segmentor,
    ``backbone.body.encoder.`` in a detector), as the registered encoder its record names."""
    damaged = f"{file}: its {DENSE_KEY} metadata is damaged (no encoder arch and config); save the model again"
    try:
        record = json.loads(entry)
        arch, config, task = record["encoder"]["arch"], record["encoder"]["config"], record["task"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(damaged) from None
    if not isinstance(arch, str) or not isinstance(config, dict):
        raise ValueError(damaged)
    prefixes = {_encoder_prefix(k) for k in tensors} - {None}
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ValueError(
            f"{file}: a {task} model whose encoder cannot be told apart (modules named encoder: {found}); "
            "save the model again with openmae segment / detect"
        )
    prefix = prefixes.pop()
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    left = len(tensors) - len(state)
    return Weights(
        str(path),
        "openmae",
        f"the encoder of a {task} model",
        state,
        arch=arch,
        config=dict(config),
        notes=[f"{left} tensors of the {task} model's pyramid and heads are not the encoder's: set aside"],
        complete=True,
        origin={k: f"its {DENSE_KEY} record's encoder.config.{k}" for k in config},
    )


def _encoder_prefix(key: str) -> str | None:
    """``backbone.encoder.`` for ``backbone.encoder.blocks.0.norm1.weight``: the key up to its first
    ``encoder`` part; None for a key without one."""
    parts = key.split(".")
    if "encoder" not in parts[:-1]:
        return None
    return ".".join(parts[: parts.index("encoder") + 1]) + "."


def write(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write weights (safetensors) with the model's architecture and config.

    ``path`` ending in ``.safetensors`` is written as one file; any other path becomes a directory
    holding ``model.safetensors`` and a readable ``config.json``. Returns the weights file.
    """
    model = unwrap(model)
    record = model_record(arch_of(model), getattr(model, "config", None))
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(record, indent=2) + "\n")
        path = path / WEIGHTS_NAME
    write_safetensors(path, model.state_dict(), {FORMAT_KEY: json.dumps(record)})
    return path
