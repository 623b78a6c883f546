"""Classifiers from checkpoints: the model an evaluation protocol trains or evaluates, built from
anything :func:`openmae.interop.read_weights` reads.

An MAE's encoder has its classifier's parameter names (``mae_vit_*`` -> ``vit_*``, ``convmae_*`` ->
``convvit_*``), so its weights load as they are; :class:`ClassifierLayout` says how the protocol
reads the encoder out (head, pooling norm, a trained classifier to evaluate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from openmae.config import ConfigError
from openmae.eval_config import EncoderConfig
from openmae.interop import LoadReport, UnsafeCheckpointError, Weights, read_weights
from openmae.interop.architecture import check_allocation, infer_architecture, load_into
from openmae.io import read_model_record, read_safetensors_metadata
from openmae.models import create_model, model_factory
from openmae.models.classifier import classifier_args, classifier_defaults, classifier_name

DEFAULT_CLASSIFIER = "vit_micro_patch4"  # the encoder of the CPU default, mae_vit_micro_patch4
# Tensors of a pretraining model that a classifier has no place for (the decoder is handled by
# the loader, which ignores it): MAE's optional encoder mask token, ConvMAE's multi-scale fusion.
PRETRAIN_ONLY = ("encoder_mask_token", "stage1_output_decode.", "stage2_output_decode.")


def read_encoder(checkpoint: str | None) -> Weights | None:
    """The checkpoint's tensors in openmae names (:class:`openmae.interop.Weights`), None for none."""
    if checkpoint is None:
        return None
    try:
        return read_weights(checkpoint)
    except UnsafeCheckpointError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(_naming(checkpoint, f"cannot read {checkpoint}: ", e)) from None


def _naming(path: str, prefix: str, error: Exception) -> str:
    """``error``'s message, with ``prefix`` where it does not name ``path`` already."""
    message = str(error)
    return message if str(path) in message else prefix + message


def _shape(cfg: dict[str, Any]) -> tuple:
    return tuple(cfg.get(k) for k in ("embed_dim", "depth", "patch_size"))


def _architecture(model_cfg: EncoderConfig, weights) -> tuple[str, dict[str, Any]]:
    """(classifier name, encoder constructor arguments) from the checkpoint, else ``model_cfg.name``."""
    wanted = classifier_name(model_cfg.name) if model_cfg.name else None
    if weights is None:
        return wanted or DEFAULT_CLASSIFIER, {}
    try:
        arch, cfg, _ = infer_architecture(weights)
    except ValueError as e:
        raise ConfigError(_naming(weights.source, f"{weights.source}: ", e)) from None
    name = classifier_name(arch)
    if name is None:
        raise ConfigError(
            f"{weights.source} holds a {arch}, another architecture than those these protocols evaluate "
            "(mae_vit_* / vit_*, convmae_* / convvit_* and simmim_swin_* / swin_* encoders, official MAE, "
            "Hugging Face ViTMAE, timm ViT and Swin checkpoints)"
        )
    encoder = {k: v for k, v in cfg.items() if k in classifier_args(name)}
    if wanted is not None and wanted != name:
        defaults = classifier_defaults(wanted)
        if _shape(defaults) != _shape({**classifier_defaults(name), **encoder}):
            raise ConfigError(
                f"{weights.source} holds a {arch} (embed_dim, depth, patch_size = {_shape(encoder)}), but --model "
                f"asks for {wanted} ({_shape(defaults)}): another architecture. Drop --model to use the checkpoint's"
            )
        name = wanted
    return name, encoder


def encoder_config(model_cfg: EncoderConfig, weights) -> tuple[str, dict[str, Any]]:
    """(classifier name, its full constructor arguments) for a checkpoint, else ``model_cfg.name``."""
    name, encoder = _architecture(model_cfg, weights)
    return name, {**classifier_defaults(name), **encoder, **model_cfg.kwargs}


def _has(state: dict[str, Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def checkpoint_tensors(weights) -> dict[str, Tensor]:
    """All tensors of a checkpoint (trunk and classifier parts) in openmae names."""
    return {**weights.state, **weights.extras}


@dataclass(frozen=True)
class ClassifierLayout:
    """How a protocol reads a classifier out of an encoder.

    Attributes:
        num_classes: outputs of the head; 0 for a headless feature extractor.
        head_norm: BatchNorm without affine before the linear head (linear probing).
        fc_norm: LayerNorm on the pooled feature; None: with average pooling (timm's rule).
        trained: the checkpoint is a classifier this protocol trained (``--eval-only``): its head must
            fit, and pooling and head layout are taken as it recorded them. Otherwise a head that does
            not fit is left out with a note and trained anew.
    """

    num_classes: int
    head_norm: bool = False
    fc_norm: bool | None = None
    trained: bool = False


def build_classifier(
    model_cfg: EncoderConfig, weights: Weights | None, layout: ClassifierLayout, *, img_size: int, in_chans: int
) -> nn.Module:
    """The classifier a protocol trains or evaluates, with the checkpoint's weights loaded; what the
    load did is in ``model.load_report`` (None without a checkpoint).

    Args:
        model_cfg: checkpoint / architecture name, pooling, drop path, constructor overrides.
        weights: :func:`read_encoder`'s result (None: random initialisation of ``model_cfg.name``).
        layout: the readout (:class:`ClassifierLayout`).
        img_size, in_chans: from the data. Another ``img_size`` than the checkpoint's is fine: the
            position table follows the new grid (sin-cos recomputed, a learned one resampled
            bicubically; the load report says so). Other channels are refused.
    Raises:
        ConfigError: another architecture, other channels, a head that does not fit when required.
    """
    name, encoder = _architecture(model_cfg, weights)
    pool = model_cfg.global_pool
    if pool == "auto":  # the paper's cls-token probe where there is a cls token (ViT), else the mean token
        pool = "token" if getattr(model_factory(name).cls, "num_prefix_tokens", 0) else "avg"
    readout = {
        "num_classes": layout.num_classes,
        "global_pool": pool,
        "fc_norm": layout.fc_norm,
        "head_norm": layout.head_norm,
        "drop_path_rate": model_cfg.drop_path_rate,
    }
    if layout.trained and weights is not None and weights.arch == name:
        readout.update({k: weights.config[k] for k in ("global_pool", "fc_norm", "head_norm") if k in weights.config})
    kwargs = {**encoder, **model_cfg.kwargs, **readout, "img_size": img_size}
    file_chans = kwargs.get("in_chans", in_chans)
    if weights is not None and file_chans != in_chans:
        raise ConfigError(
            f"{weights.source} takes {file_chans}-channel images but the data gives {in_chans}; "
            f"pass --data.channels {file_chans}"
        )
    kwargs["in_chans"] = in_chans
    if weights is not None:
        try:
            check_allocation(name, kwargs, weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        model = create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"cannot build {name}: {e}") from None
    model.load_report = None
    if weights is not None:
        model.load_report = load_classifier_weights(
            model, weights, require_head=layout.trained, allow_partial=model_cfg.allow_partial
        )
    return model


def build_feature_model(
    model_cfg: EncoderConfig, weights: Weights | None, *, img_size: int, in_chans: int
) -> nn.Module:
    """A headless classifier whose output is the feature ``model_cfg.global_pool`` selects.

    Pretrained encoders give the cls token or the mean patch token after their final norm; a
    fine-tuned classifier with ``fc_norm`` (and no final norm) gives its fc_norm output.
    """
    tensors = checkpoint_tensors(weights) if weights is not None else {}
    fine_tuned = _has(tensors, "fc_norm.") and not _has(tensors, "norm.")
    cfg = dataclasses.replace(model_cfg, drop_path_rate=0.0)
    layout = ClassifierLayout(num_classes=0, fc_norm=fine_tuned)
    return build_classifier(cfg, weights, layout, img_size=img_size, in_chans=in_chans)


def _head_kind(keys: set[str]) -> str:
    # a BatchNorm head keeps running statistics (ViT: head.0.*, Swin: head.fc.0.*)
    return "BatchNorm + linear (linear probe)" if any(k.endswith("running_mean") for k in keys) else "linear"


def load_classifier_weights(
    model: nn.Module, weights: Weights, require_head: bool = False, allow_partial: bool = False
) -> LoadReport:
    """Load a checkpoint into a classifier; returns interop's :class:`LoadReport`.

    The decoder and pretraining-only tensors are ignored. The trunk's final ``norm`` is left out
    when ``fc_norm`` replaces it (average pooling, the paper's fine-tuning), ``fc_norm`` when the
    model pools the cls token. A head loads only when its layout and class count fit. An encoder
    tensor the file lacks is refused, naming it, unless ``allow_partial`` (the report then says which).
    """
    tensors = {k: v for k, v in checkpoint_tensors(weights).items() if not k.startswith(PRETRAIN_ONLY)}
    own = model.state_dict()
    notes: list[str] = []
    file_head = {k for k in tensors if k.startswith("head.")}
    model_head = {k for k in own if k.startswith("head.")}
    fits = bool(file_head) and file_head == model_head and all(tensors[k].shape == own[k].shape for k in file_head)
    if not fits:
        if require_head:
            raise ConfigError(_head_mismatch(weights.source, tensors, file_head, model_head, model.num_classes))
        if file_head:
            notes.append(f"the file's head ({_classes(tensors, file_head)} classes) is left out")
        for k in file_head:
            del tensors[k]
    for prefix, why in (
        ("norm.", "the final norm is not used: fc_norm on the pooled patch tokens replaces it"),
        ("fc_norm.", "the file's fc_norm is not used: this model reads the cls token after the final norm"),
    ):
        if _has(tensors, prefix) and not _has(own, prefix):
            tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
            notes.append(why)
    try:
        report = load_into(
            model, dataclasses.replace(weights, state=tensors, extras={}), arch=model.arch, allow_partial=allow_partial
        )
    except ValueError as e:
        raise ConfigError(_naming(weights.source, f"cannot load {weights.source} into {model.arch}: ", e)) from None
    report.notes = notes + report.notes
    return report


def _classes(tensors: dict[str, Tensor], head: set[str]) -> int:
    bias = [k for k in head if k.endswith("bias")]
    return int(tensors[bias[-1]].shape[0]) if bias and tensors[bias[-1]].dim() else -1


def _head_mismatch(source: str, tensors: dict, file_head: set[str], model_head: set[str], num_classes: int) -> str:
    if not file_head:
        return (
            f"{source} has no classifier head: it is a pretrained encoder. --eval-only evaluates a classifier "
            "trained by this protocol (the model.safetensors of an openmae finetune / linprobe run)"
        )
    if _head_kind(file_head) != _head_kind(model_head):
        return (
            f"{source} has a {_head_kind(file_head)} head, this protocol a {_head_kind(model_head)} one: "
            "evaluate it with the protocol that trained it (openmae linprobe --eval-only for a linear probe)"
        )
    return (
        f"{source}'s head has {_classes(tensors, file_head)} classes but the data has {num_classes}: "
        "evaluate on the classes it was trained on"
    )


def check_resumable(path: Path | None, model: nn.Module) -> None:
    """Refuse to resume a checkpoint of another architecture or class count, before the engine tries."""
    if path is None:
        return
    hint = "use another --output, or --resume none to start afresh"
    try:
        meta = read_model_record(read_safetensors_metadata(path)) or {}
    except ValueError as e:
        raise ConfigError(_naming(str(path), f"cannot resume {path}: ", e) + f"; {hint}") from None
    arch, cfg = meta.get("arch"), meta.get("config", {})
    cfg = cfg if isinstance(cfg, dict) else {}
    if arch is None:
        raise ConfigError(f"cannot resume {path}: not an openmae training checkpoint; {hint}")
    if arch != model.arch:
        raise ConfigError(f"cannot resume {path}: it holds a {arch}, this run trains a {model.arch}; {hint}")
    if cfg.get("num_classes") != model.num_classes:
        raise ConfigError(
            f"cannot resume {path}: its head has {cfg.get('num_classes')} classes, the data has "
            f"{model.num_classes}; {hint}"
        )
    keys = ("embed_dim", "depth", "patch_size", "in_chans", "global_pool", "fc_norm", "head_norm")
    differ = [f"{k} {cfg.get(k)} vs {model.config.get(k)}" for k in keys if cfg.get(k) != model.config.get(k)]
    if differ:
        raise ConfigError(f"cannot resume {path}: it differs from this run's model ({', '.join(differ)}); {hint}")
