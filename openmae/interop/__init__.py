"""Weights in and out: openmae, official MAE / ConvMAE, Hugging Face ViTMAE and timm checkpoints.

The one place that reads weights. ``load(path)`` recognises the format
(:func:`~openmae.interop.detect.detect_format`), reads the tensors into openmae's names
(:func:`read_weights`, one reader per format), builds the matching registered model (architecture
from the file's record, else from tensor shapes: :mod:`~openmae.interop.architecture`) and loads
it with a :class:`LoadReport` in ``model.load_report``. ``create_model(name, pretrained=path)``
builds the named model and loads any format into it. Loading is strict: an encoder tensor the file
lacks is an error naming it unless ``allow_partial=True`` (the CLI's ``--allow-partial``); a file
without a decoder is a note in the report. ``export_pretrained(model, path, format)``
writes any of the four formats; ``inspect_checkpoint(path)`` describes a file without building a
model; :mod:`~openmae.interop.classifier` builds the evaluation protocols' classifiers from any of them.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from openmae.interop import hf, native, official, swin, timm
from openmae.interop.architecture import check_allocation, infer_architecture, load_into, plan_load, token_grid
from openmae.interop.detect import detect_file, detect_format, is_openmae
from openmae.interop.weights import (
    DECODER_PREFIXES,
    FIXED,
    FORMATS,
    LoadReport,
    UnsafeCheckpointError,
    Weights,
    safe_torch_load,
    split_classifier,
)
from openmae.io import unwrap
from openmae.models import create_model as build_model
from openmae.registry import arch_of

__all__ = [
    "FORMATS",
    "LoadReport",
    "UnsafeCheckpointError",
    "Weights",
    "create_model",
    "decoder_was_loaded",
    "detect_format",
    "export_pretrained",
    "inspect_checkpoint",
    "is_openmae",
    "load",
    "load_pretrained",
    "load_weights_into",
    "read_weights",
    "safe_torch_load",
    "save_pretrained",
]

logger = logging.getLogger("openmae.interop")
save_pretrained = native.write


def read_weights(path: str | os.PathLike) -> Weights:
    """Read any supported checkpoint into openmae names (see :func:`detect_format`)."""
    path = Path(path)
    fmt, obj = detect_file(path)
    readers = {"hf": hf.read, "timm": timm.read, "official": official.read}
    weights = readers[fmt](path, obj) if fmt in readers else native.read(path)
    if not weights.complete and swin.is_swin_state(weights.state):  # official Swin / SimMIM layouts
        state, notes = swin.to_openmae_names({**weights.state, **weights.extras})
        weights.state, weights.extras = split_classifier(state)
        weights.notes.extend(notes)
    return weights


def _log(report: LoadReport) -> None:
    (logger.warning if report.missing else logger.info)("%s", report.summary())


def build_for(weights: Weights, overrides: dict[str, Any]) -> tuple[nn.Module, str]:
    """(the model ``weights`` fit, not loaded yet; its registered name); what had to be assumed goes to
    ``weights.notes``. A description the file's tensors do not justify is refused before anything is
    allocated (:func:`~openmae.interop.architecture.infer_architecture`, :func:`check_allocation`)."""
    arch, cfg, notes = infer_architecture(weights, overrides)
    weights.notes.extend(notes)
    if weights.mask_ratio is not None and weights.mask_ratio != 0.75 and "mask_ratio" not in overrides:
        ratio = weights.mask_ratio
        weights.notes.append(f"the file records mask_ratio {ratio}: pass mask_ratio={ratio} to the model's forward")
    check_allocation(arch, cfg, weights)
    try:
        return build_model(arch, **cfg), arch
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(
            f"{weights.source}: cannot build {arch} as the file describes it ({e}); re-export the file, or pass "
            "the constructor arguments yourself"
        ) from None


def load(path: str | os.PathLike, allow_partial: bool = False, **overrides: Any) -> tuple[nn.Module, LoadReport]:
    """Build the matching model for any supported checkpoint and load it.

    Args:
        path: a file or directory in any of :data:`FORMATS`.
        allow_partial: accept a file that lacks encoder tensors (or part of its decoder); they keep
            their initial values and ``report.partial_line()`` says which. Without it such a file
            is a ``ValueError`` naming them. A file without any decoder loads either way.
        overrides: constructor arguments that replace the recorded or inferred ones
            (``num_heads``, ``norm_pix_loss``, ``img_size``, ...).
    Returns:
        (model, report); the report is also ``model.load_report``.
    Raises:
        ValueError: the file is damaged, contradicts itself, or does not fit the model (the message names
            the file and the tensors or entries); :class:`UnsafeCheckpointError` for pickles needing code.
        FileNotFoundError: no such file.
    """
    weights = read_weights(path)
    model, arch = build_for(weights, overrides)
    report = load_into(model, weights, arch, strict=weights.format == "openmae", allow_partial=allow_partial)
    model.load_report = report
    _log(report)
    return model, report


def load_pretrained(path: str | os.PathLike, allow_partial: bool = False, **overrides: Any) -> nn.Module:
    """:func:`load` without the tuple: the model, with its report in ``model.load_report``.

    ``overrides`` change constructor arguments; for openmae's own files only those that do not
    touch the weights' shapes (``norm_pix_loss``, ``mask_type``, ``attn_impl``, ...), and
    ``img_size``: the position tables follow the new grid.
    """
    return load(path, allow_partial=allow_partial, **overrides)[0]


def load_weights_into(model: nn.Module, path: str | os.PathLike, allow_partial: bool = False) -> LoadReport:
    """Load any supported checkpoint into an already-built model.

    A position table trained on another grid is fitted to the model's (fine-tuning at another
    resolution: sin-cos tables regenerated, learned ones resampled bicubically; the report says so).
    Other shape mismatches are refused with the parameter's name, and so are missing encoder tensors
    unless ``allow_partial`` (see :func:`load`); the report lands in ``model.load_report``.
    """
    weights = read_weights(path)
    # exact only into the model the file records: an MAE file loads its encoder into a vit_* (the
    # decoder set aside with a note), as `openmae finetune --checkpoint` does
    exact = weights.format == "openmae" and weights.arch == arch_of(unwrap(model))
    report = load_into(model, weights, strict=exact, allow_partial=allow_partial)
    model.load_report = report
    _log(report)
    return report


def create_model(
    name: str, pretrained: str | os.PathLike | None = None, allow_partial: bool = False, **overrides: Any
) -> nn.Module:
    """Build a registered model, with constructor overrides (``img_size=32, in_chans=1, ...``).

    Args:
        name: a name from :func:`openmae.list_models`.
        pretrained: optional path to weights (any format :func:`load` reads) to load into the built model:
            a pretraining file's encoder (its decoder set aside), at any ``img_size`` (the position
            table follows the model's grid).
        allow_partial: with ``pretrained``, accept a file that lacks encoder tensors (see :func:`load`).
        overrides: constructor arguments that replace the variant's defaults.
    """
    model = build_model(name, **overrides)
    if pretrained is not None:
        load_weights_into(model, pretrained, allow_partial=allow_partial)
    return model


def decoder_was_loaded(model: nn.Module) -> bool:
    """False when the model's decoder kept its random initialisation (loaded from an encoder-only file)."""
    report = getattr(model, "load_report", None)
    return not any(k.startswith(DECODER_PREFIXES) for k in getattr(report, "missing", ()))


def export_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "openmae",
    include_decoder: bool | None = None,
    **options: Any,
) -> Path:
    """Write ``model`` for use elsewhere.

    Args:
        model: an openmae model (built by ``create_model`` / ``load_pretrained``).
        path: file or directory to write (see each format).
        format: ``openmae`` (safetensors file or directory, :func:`openmae.save_pretrained`),
            ``official`` (``.pth`` with ``{'model': state_dict}``), ``hf`` (a directory that
            ``transformers.ViTMAEForPreTraining.from_pretrained`` loads; option ``key_style``
            ``v4`` (hub names, default) or ``v5``; ``mask_ratio``) or ``timm`` (encoder only;
            ``.safetensors`` file or a hub-style directory).
        include_decoder: write the decoder (official, hf). Default: unless the model was loaded
            from an encoder-only file, so a random decoder never passes for a trained one.
            openmae files always hold the whole model; a warning says when its decoder is random.
    Returns:
        The weights file written.
    """
    writers = {
        "openmae": save_pretrained,
        "official": official.write,
        "hf": hf.write,
        "timm": timm.write,
    }
    if format not in writers:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if include_decoder is None:
        include_decoder = decoder_was_loaded(model)
    if format in ("official", "hf"):
        options["encoder_only"] = not include_decoder
    elif format == "openmae" and not include_decoder:
        warnings.warn(
            f"{path}: openmae files hold the whole model, so the decoder is written although it was never "
            "loaded (its weights are random); export to official or hf to write the encoder alone",
            stacklevel=2,
        )
    return writers[format](model, path, **options)


def _numel(state: dict[str, Any]) -> int:
    return sum(v.numel() for k, v in state.items() if k not in FIXED)


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint is: format, kind, architecture, decoder, norm-pix, parameter counts (fixed
    sin-cos tables excluded) and notes; and how it fits the architecture it implies, which is built
    on the meta device to compare (``missing_encoder``, ``missing_decoder``: tensors the file lacks; ``mismatched``:
    tensors of another shape or type; ``unexpected``: tensors with no place in it)."""
    weights = read_weights(path)
    arch, cfg, notes = infer_architecture(weights)
    decoder = {k: v for k, v in weights.state.items() if k.startswith(DECODER_PREFIXES)}
    encoder = {k: v for k, v in weights.state.items() if k not in decoder}
    head = weights.extras.get("head.weight", weights.extras.get("head.fc.weight"))  # ViT's, Swin's
    norm_pix = weights.config.get("norm_pix_loss")
    check_allocation(arch, cfg, weights)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(arch, **cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{path}: cannot build the {arch} it describes ({e}); re-export it") from None
    patch = getattr(model, "patch_size", None)
    plan = plan_load(
        model.state_dict(), weights, exact=weights.format == "openmae", grid=token_grid(model), patch_size=patch
    )
    return {
        "path": str(path),
        "format": weights.format,
        "kind": weights.kind,
        "arch": arch,
        "config": cfg,
        "has_decoder": weights.has_decoder,
        "norm_pix_loss": None if norm_pix is None else bool(norm_pix),
        "mask_ratio": weights.mask_ratio,
        "num_classes": None if head is None or head.dim() == 0 else int(head.shape[0]),
        "parameters": _numel(encoder) + _numel(decoder) + _numel(weights.extras),
        "encoder_parameters": _numel(encoder),
        "decoder_parameters": _numel(decoder),
        "missing_encoder": plan.missing_encoder,
        "missing_decoder": plan.missing_decoder if weights.has_decoder else [],
        "mismatched": plan.mismatched,
        "unexpected": plan.unexpected,
        "notes": weights.notes + notes,
    }
