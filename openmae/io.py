"""File primitives every writer and reader shares: atomic writes, safetensors files, openmae's
metadata record, and the plain module under a training wrapper. Imports nothing of openmae.

Writes are atomic: a temp file in the same folder, fsync, then ``os.replace``, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_KEY = "openmae"  # safetensors metadata entry holding {arch, config, openmae_version}
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should be as readable as any other
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Tensors (moved to CPU, made contiguous) and string metadata, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def openmae_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openmae")
    except PackageNotFoundError:
        return "0+unknown"


def model_record(arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """What openmae files record about a model: the registered name and every constructor argument,
    enough to rebuild it with ``create_model(arch, **config)``; and the version that wrote it."""
    if not isinstance(config, dict):
        raise ValueError(f"{arch}: the model has no constructor config to save; build it with openmae.create_model")
    return {"arch": arch, "config": config, "openmae_version": openmae_version()}


def read_model_record(meta: dict[str, str]) -> dict[str, Any] | None:
    """The :func:`model_record` in a safetensors file's metadata, None when it has none."""
    if FORMAT_KEY not in meta:
        return None
    record = json.loads(meta[FORMAT_KEY])
    return record if isinstance(record, dict) and "arch" in record and "config" in record else None
