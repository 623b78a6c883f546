"""Dense tasks for the one training engine (a batch in, ``{"loss": ...}`` out), and the saved dense model.

- :class:`SegmentTask`: a :class:`~openmae.dense.models.Segmentor`'s cross-entropy (ignore index) on a
  batch of images and label maps (openmae.data's ``Batch``, ``labels`` (N, H, W)).
- :class:`DetectTask`: the summed losses of torchvision's Faster / Mask R-CNN on a
  :class:`~openmae.dense.data.DetectionBatch`.

Both train with AdamW over :func:`~openmae.dense.models.dense_param_groups` (layer-wise lr decay on
the encoder, the full lr on the pyramid and heads) and export the model with its architecture:

- A dense model file (``model.safetensors``) holds the model's state dict and, under the metadata
  key :data:`DENSE_KEY`, its :func:`dense_record`: the task, the encoder's registered name and
  constructor config, the pyramid / head / detector arguments, the class names and the input
  (size, channels, normalisation). :func:`build_dense_model` rebuilds the model from it, without
  the pretraining file it started from (``--eval-only``).
- Training checkpoints are the engine's, and record ``arch_of(model)`` and ``model.config`` as every
  openmae checkpoint does: a dense model gives its encoder's (the part of it the registry can
  rebuild); the whole model is described by the run's config.yaml, recorded in each checkpoint too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from openmae.dense.models import Segmentor, build_detector, dense_param_groups
from openmae.interop.architecture import load_state
from openmae.io import DENSE_KEY, WEIGHTS_NAME, read_safetensors, read_safetensors_metadata, unwrap, write_safetensors
from openmae.models import create_model

RECORD_VERSION = 1


# -- the saved model -------------------------------------------------------------------------------


def dense_record(
    task: str,
    encoder: nn.Module,
    model_args: dict[str, Any],
    classes: list[str],
    *,
    img_size: int,
    channels: int,
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    """What rebuilds a dense model and feeds it: see :func:`build_dense_model`.

    Args:
        task: "segment" or "detect".
        encoder: the registered encoder the model is built on (``arch`` and ``config``).
        model_args: :class:`Segmentor`'s or :func:`build_detector`'s arguments besides the encoder.
        classes: class names, index = class id (background included where there is one).
        img_size, channels, mean, std: the input the model was trained on.
    """
    return {
        "version": RECORD_VERSION,
        "task": task,
        "encoder": {"arch": encoder.arch, "config": dict(encoder.config)},
        "model": dict(model_args),
        "classes": list(classes),
        "img_size": int(img_size),
        "channels": int(channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def build_dense_model(record: dict[str, Any]) -> nn.Module:
    """A :class:`Segmentor` or torchvision detector as ``record`` describes it, randomly initialised
    (its encoder rebuilt with ``create_model(arch, **config)``); load the saved state into it."""
    spec = record["encoder"]
    encoder = create_model(spec["arch"], **spec["config"])
    if record["task"] == "segment":
        return Segmentor(encoder, **record["model"])
    return build_detector(encoder, **record["model"])


def save_dense_model(model: nn.Module, record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and ``record`` (under :data:`DENSE_KEY`) to one safetensors file, atomically."""
    path = Path(path)
    write_safetensors(path, unwrap(model).state_dict(), {DENSE_KEY: json.dumps(record)})
    return path


def dense_model_file(path: str | os.PathLike) -> Path:
    """The file of a saved dense model: ``path``, or a run folder's ``model.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a model saved by openmae segment / detect")
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path} holds no {WEIGHTS_NAME} (a run that has not finished, or no run folder); finish the run "
                "(the same command again) or pass the model.safetensors of a finished segment / detect run"
            )
        path = path / WEIGHTS_NAME
    return path


def read_dense_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The :func:`dense_record` of a safetensors file, None when it is no dense model (another format,
    an encoder, a classifier). Reads the header only."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        meta = read_safetensors_metadata(path)
    except ValueError:  # not safetensors at all: another format's file
        return None
    if DENSE_KEY not in meta:
        return None
    try:
        record = json.loads(meta[DENSE_KEY])
    except ValueError:
        record = None
    keys = ("task", "encoder", "model", "classes", "img_size", "channels", "mean", "std")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise ValueError(
            f"{path}: its {DENSE_KEY} metadata is damaged (not a dense model record); save the model again"
        )
    return record


def load_dense_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(model, record) from a file :func:`save_dense_model` wrote (or its run folder), weights loaded strictly."""
    file = dense_model_file(path)
    record = read_dense_record(file)
    if record is None:
        raise ValueError(
            f"{file} is not a dense model (it has no {DENSE_KEY} record); --eval-only evaluates a model saved by "
            "openmae segment / detect (OUTPUT/model.safetensors); to fine-tune from an encoder, drop --eval-only"
        )
    try:
        model = build_dense_model(record)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{file}: its {DENSE_KEY} record does not build a model ({e}); save the model again") from None
    state, _ = read_safetensors(file)
    load_state(model, state, source=str(file))
    return model, record


# -- the tasks -------------------------------------------------------------------------------------


class _DenseTask:
    """What both dense tasks share: layer-wise decay groups, checkpoint identity, export with the record."""

    name = "dense"

    def __init__(self, model: nn.Module, encoder: nn.Module, record: dict[str, Any], layer_decay: float) -> None:
        self.model = model
        self.record = record
        self.layer_decay = layer_decay
        # The engine's checkpoints record arch_of(model) and model.config, which must name a registered
        # model: the encoder's (see the module docstring). export() writes the whole model's record.
        model.arch, model.config = encoder.arch, encoder.config

    def param_groups(self, weight_decay: float) -> list[dict]:
        return dense_param_groups(self.model, weight_decay, self.layer_decay)

    def export(self, model: nn.Module, path: str | os.PathLike) -> Path:
        """``model.safetensors``: the weights and the :func:`dense_record` (the engine calls it at the end)."""
        return save_dense_model(model, self.record, path)


class SegmentTask(_DenseTask):
    """Semantic segmentation: per-pixel cross-entropy of a :class:`Segmentor`, ignore index skipped.

    Args:
        model: the :class:`Segmentor`.
        encoder: its encoder (registered: ``arch``, ``config``).
        record: the model's :func:`dense_record`.
        layer_decay: lr x decay^(depth + 1 - layer) on the encoder's layers, 1 = off.
    """

    name = "segment"

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        logits = model(batch.images)  # (N, K, H, W)
        return {"loss": self.model.loss(logits, batch.labels)}


class DetectTask(_DenseTask):
    """Detection / instance segmentation: the sum of torchvision's R-CNN losses (RPN objectness and box
    regression, box classification and regression, and the mask loss for Mask R-CNN).

    Args: as :class:`SegmentTask`, ``model`` being :func:`build_detector`'s.
    """

    name = "detect"

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        losses = model(list(batch.images), batch.targets)
        return {"loss": sum(losses.values()), **losses}


__all__ = [
    "DENSE_KEY",
    "DetectTask",
    "SegmentTask",
    "build_dense_model",
    "dense_model_file",
    "dense_record",
    "load_dense_model",
    "read_dense_record",
    "save_dense_model",
]
