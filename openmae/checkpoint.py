"""Saving and loading, without unpickling anything.

- Exported models: one safetensors file whose metadata holds the architecture and its constructor
  config (``save_pretrained`` / ``load_pretrained``); a directory holds ``model.safetensors``.
- Training checkpoints: one safetensors file holding the weights (``model/...``), the optimizer
  tensors (``optim/...``), the RNG states (``rng/...``) and, as JSON metadata, everything else
  (step, schedule position, param-group hyperparameters, scaler, resolved run config).
Writes are atomic: a temp file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_KEY = "openmae"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: str | os.PathLike, write) -> None:
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
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_meta(model: nn.Module) -> dict[str, Any]:
    model = unwrap(model)
    arch = getattr(model, "arch", None)
    config = getattr(model, "config", None)
    if arch is None or config is None:
        raise ValueError("this model has no registered architecture; build it with openmae.create_model")
    from openmae import __version__

    return {"arch": arch, "config": config, "openmae_version": __version__}


def _tensors(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    return {prefix + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write weights (safetensors) with the model's architecture and config.

    ``path`` ending in ``.safetensors`` is written as one file; any other path becomes a directory
    holding ``model.safetensors`` and a readable ``config.json``. Returns the weights file.
    """
    path = Path(path)
    meta = model_meta(model)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(meta, indent=2) + "\n")
        path = path / WEIGHTS_NAME
    tensors = _tensors(unwrap(model).state_dict())
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT_KEY: json.dumps(meta)}))
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def resolve_weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        if (path / WEIGHTS_NAME).exists():
            return path / WEIGHTS_NAME
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor a training checkpoint")
        return latest
    return path


def _split_model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith("model/") for k in tensors):  # a training checkpoint
        return {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    return tensors


def load_pretrained(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` or a training checkpoint.

    ``overrides`` change constructor arguments that do not touch the weights' shapes
    (``norm_pix_loss``, ``mask_type``, ``attn_impl``, ...). Official MAE, Hugging Face ViTMAE
    and timm checkpoints are recognised and loaded by :mod:`openmae.interop`.
    """
    from openmae.interop import is_openmae
    from openmae.interop import load_pretrained as load_foreign

    if not is_openmae(path):
        return load_foreign(path, **overrides)
    file = resolve_weights_file(path)
    tensors, meta = read_safetensors(file)
    if FORMAT_KEY not in meta:
        raise ValueError(
            f"{file} carries no openmae config; build the model yourself and use "
            "openmae.create_model(name, pretrained=path, ...)"
        )
    info = json.loads(meta[FORMAT_KEY])
    from openmae.registry import create_model

    model = create_model(info["arch"], **{**info["config"], **overrides})
    load_state(model, _split_model_state(tensors), source=str(file))
    return model


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


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights into an already-built model (``create_model(pretrained=...)``); files in other
    formats (official MAE, Hugging Face, timm) go through :mod:`openmae.interop`."""
    from openmae.interop import is_openmae
    from openmae.interop import load_weights_into as load_foreign

    if not is_openmae(path):
        load_foreign(model, path)
        return
    tensors, _ = read_safetensors(resolve_weights_file(path))
    load_state(model, _split_model_state(tensors), source=str(path))


# -- training checkpoints -------------------------------------------------------------------


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
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    rng: dict[str, Tensor] | None = None,
    scaler: dict[str, Any] | None = None,
) -> None:
    """One atomic safetensors file with everything needed to resume."""
    tensors = _tensors(unwrap(model).state_dict(), "model/")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(_tensors(opt_tensors))
    tensors.update(_tensors(rng or {}, "rng/"))
    meta = {
        FORMAT_KEY: json.dumps(model_meta(model)),
        "training": json.dumps({**info, "optimizer": opt_meta, "scaler": scaler or {}}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint: ``model`` (state dict), ``optimizer``, ``rng``, ``scaler``, ``info``."""
    tensors, meta = read_safetensors(path)
    if "training" not in meta:
        raise ValueError(f"{path} is not an openmae training checkpoint (no training state to resume)")
    info = json.loads(meta["training"])
    return {
        "model": _split_model_state(tensors),
        "optimizer": _unflatten_optimizer(tensors, info.pop("optimizer")),
        "scaler": info.pop("scaler"),
        "rng": {k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")},
        "info": info,
        "meta": json.loads(meta[FORMAT_KEY]),
    }


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints in ``out_dir``, oldest first."""
    return sorted(Path(out_dir).glob("checkpoint-*.safetensors"))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None
