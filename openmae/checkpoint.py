"""Training state: save, resume, list and prune the checkpoints of a run. Weights for use elsewhere
(every format, openmae's own included) are read and written by :mod:`openmae.interop`.

A training checkpoint is one safetensors file holding the weights (``model/...``), the optimizer
tensors (``optim/...``), the RNG states (``rng/...``) and, as JSON metadata, the model record
(``openmae``: arch and config, as exported files have) and everything else (``training``: step,
schedule position, param-group hyperparameters, scaler, resolved run config). Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from openmae.io import (
    FORMAT_KEY,
    UnreadableFileError,
    model_record,
    read_safetensors,
    read_safetensors_metadata,
    safetensors_problem,
    unwrap,
    write_safetensors,
)
from openmae.registry import arch_of

MODEL_PREFIX = "model/"


def split_model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict: the ``model/`` tensors of a training checkpoint, else all of them."""
    if any(k.startswith(MODEL_PREFIX) for k in tensors):
        return {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    return tensors


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{pid}/{name}"] = value
            else:
                scalars[f"{pid}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    info: dict[str, Any],
    rng: dict[str, Tensor] | None = None,
    scaler: dict[str, Any] | None = None,
    *,
    model_state: dict[str, Tensor] | None = None,
) -> None:
    """One atomic safetensors file with everything needed to resume.

    Args:
        optimizer: the optimizer, or its state dict (state keyed by parameter position, as
            ``optimizer.state_dict()`` gives it).
        model_state: the model's weights when ``model`` does not hold them whole (gathered from
            FSDP's shards); default ``model.state_dict()``. ``model`` still gives the record.
    """
    model = unwrap(model)
    state = model.state_dict() if model_state is None else model_state
    tensors = {MODEL_PREFIX + k: v for k, v in state.items()}
    optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    opt_tensors, opt_meta = _flatten_optimizer(optim_state)
    tensors.update(opt_tensors)
    tensors.update({f"rng/{k}": v for k, v in (rng or {}).items()})
    meta = {
        FORMAT_KEY: json.dumps(model_record(arch_of(model), getattr(model, "config", None))),
        "training": json.dumps({**info, "optimizer": opt_meta, "scaler": scaler or {}}),
    }
    write_safetensors(path, tensors, meta)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, not safetensors, no training state), or None.
    Reads the header only: cheap enough to check every checkpoint of a folder."""
    problem = safetensors_problem(path)
    if problem is not None:
        return problem
    meta = read_safetensors_metadata(path)
    try:
        info = json.loads(meta["training"])
        record = json.loads(meta[FORMAT_KEY])
    except KeyError:
        return "not an openmae training checkpoint (no training state in its metadata)"
    except json.JSONDecodeError:
        return "its training metadata is not JSON"
    if not isinstance(info, dict) or not isinstance(info.get("step"), int) or not isinstance(record, dict):
        return "its training metadata has no step"
    return None


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint: ``model`` (state dict), ``optimizer``, ``rng``, ``scaler``, ``info``, ``meta``.

    A file that is truncated, not safetensors or not a training checkpoint is an
    :class:`~openmae.io.UnreadableFileError` (a ValueError) naming it and what is wrong.
    """
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UnreadableFileError(f"cannot resume from {path}: {problem}; point --resume at another checkpoint")
    tensors, meta = read_safetensors(path)
    info = json.loads(meta["training"])
    return {
        "model": split_model_state(tensors),
        "optimizer": _unflatten_optimizer(tensors, info.pop("optimizer")),
        "scaler": info.pop("scaler"),
        "rng": {k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")},
        "info": info,
        "meta": json.loads(meta[FORMAT_KEY]),
    }


def training_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved run config a training checkpoint records, None for files without one."""
    try:
        meta = read_safetensors_metadata(path)
        config = json.loads(meta["training"]).get("config")
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global RNG states a resumed run must continue from: the CPU's, and ``device``'s if a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's name records (``checkpoint-00000120.safetensors``: 120)."""
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints in ``out_dir`` (by name, intact or not), oldest step first."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """Keep the ``keep`` newest intact training checkpoints of ``out_dir``; delete the older ones.

    A damaged checkpoint newer than the oldest kept one is left for its owner to look at (auto-resume
    names it and skips it), so pruning never leaves fewer than ``keep`` checkpoints to resume from.
    """
    found = list_checkpoints(out_dir)
    intact = [p for p in found if checkpoint_problem(p) is None]
    if len(intact) <= keep:
        return
    oldest_kept = checkpoint_step(intact[-keep])
    for old in found:
        if checkpoint_step(old) < oldest_kept:
            old.unlink(missing_ok=True)
