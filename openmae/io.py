"""File primitives every writer and reader shares: atomic writes, strict JSON, safetensors files,
openmae's metadata record, and the plain module under a training wrapper. Imports nothing of openmae.

Writes are atomic and durable: a hidden temp file in the same folder (``.NAME.XXXXXXXX.tmp``) gets
the usual permissions and an fsync, is renamed onto ``NAME``, and the folder is fsynced so the
rename survives a power cut. A crash never leaves a half-written file under the final name; the temp
file a killed process leaves behind is found by :func:`stale_temp_files`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_KEY = "openmae"  # safetensors metadata entry holding {arch, config, openmae_version}
DENSE_KEY = "openmae_dense"  # the entry of a model saved by openmae segment / detect: its record (openmae.dense.tasks)
WEIGHTS_NAME = "model.safetensors"

# mkstemp's names: the prefix, 8 characters from [a-z0-9_], the suffix; nothing else matches
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    try:  # Linux says it without changing it (setting it, below, races with other threads' files)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)  # elsewhere the only way to read it is to set it; put it straight back
        os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable. Skipped where folders cannot be opened or synced (Windows,
    some network file systems): the rename itself is still atomic there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; a crash never leaves a half-written file.

    The mode is set after ``write`` returns, as some writers (safetensors) replace the temp file
    with one of mode 0600; it is set before the rename, so ``path`` never appears with another mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """The temp files :func:`atomic_write` left in ``folder`` (not below it) when its process was killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TEMP_NAME.match(p.name) and p.is_file())


def finite_json(value: Any) -> Any:
    """``value`` with every NaN / infinite float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON (NaN and infinities written as null, never as the non-standard ``NaN``)."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class UnreadableFileError(ValueError):
    """A file is corrupt, truncated or not in the format it claims; the message names it and says why."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole safetensors file (``"truncated: ..."``, ``"not a safetensors file
    ..."``), or None when its header parses and its tensors' bytes are all there. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"not a safetensors file ({size} bytes, too short for a header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                if length > 100_000_000:  # safetensors' own cap on header size
                    return "not a safetensors file (its first 8 bytes are not a header length)"
                return f"truncated: {size} bytes, its header alone needs {length + 8}"
            header = json.loads(f.read(length))
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [
        v["data_offsets"][1] for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)
    ]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    try:  # what the header check does not cover (dtypes, overlapping offsets, ...): safetensors' own
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        return f"not a valid safetensors file ({e})"
    return None


def _unreadable(path: str | os.PathLike, error: Exception) -> UnreadableFileError:
    why = safetensors_problem(path) or f"not a valid safetensors file ({error})"
    return UnreadableFileError(f"{path}: {why}; re-create or re-download it, or point at another file")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a corrupt or truncated one is an
    :class:`UnreadableFileError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except SafetensorError as e:
        raise _unreadable(path, e) from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors (errors as :func:`read_safetensors`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise _unreadable(path, e) from None


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
