"""Measuring and using a pretrained encoder: the paper's evaluation protocols on the one engine.

- :func:`build_classifier`: a :class:`~openmae.models.classifier.VisionTransformer` with the weights
  of any checkpoint ``openmae.load_pretrained`` reads (an MAE's encoder has the classifier's names).
- :class:`FinetuneTask` (end-to-end or partial fine-tuning: layer-wise lr decay, mixup/cutmix, label
  smoothing) and :class:`LinearProbeTask` (frozen encoder, BatchNorm + linear head, LARS): small
  objects that turn a batch into ``{"loss": ...}`` for :class:`openmae.engine.Trainer`.
- :func:`evaluate` (top-1 / top-5 on a held-out split), :func:`extract_features`,
  :func:`knn_classify` and :class:`KNNMonitor` (a kNN check during pretraining).

Every evaluation shards the images over the DDP ranks and sums the results, so it gives the same
numbers on 1 or N processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from openmae.config import ConfigError, DataConfig
from openmae.data import ImageDataset, build_dataset, collate, sample_seed
from openmae.distributed import DistInfo, all_reduce_sum
from openmae.eval_config import EncoderConfig, EvalSettings, FinetuneSettings, LinprobeSettings, parse_tune_blocks
from openmae.models.classifier import VisionTransformer, classifier_args, classifier_defaults, classifier_name
from openmae.optim import build_adamw, param_groups
from openmae.precision import Precision

DEFAULT_CLASSIFIER = "vit_micro_patch4"  # the encoder of the CPU default, mae_vit_micro_patch4
TOPK = (1, 5)
# Tensors of a pretraining model that a classifier has no place for (the decoder is handled by
# interop's loader, which ignores it): MAE's optional encoder mask token, ConvMAE's multi-scale fusion.
PRETRAIN_ONLY = ("encoder_mask_token", "stage1_output_decode.", "stage2_output_decode.")


# -- transforms --------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global generators for a block, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class PILTransform:
    """A PIL transform (timm's) on openmae's uint8 (C, H, W) tensors, deterministic per sample.

    openmae's datasets seed torch's generator per (seed, epoch, index) before a transform runs
    (openmae.data); timm's crops and RandAugment draw from Python's and NumPy's generators, so
    those are seeded here from one torch draw, and restored afterwards.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.functional import to_pil_image

        seed = int(torch.randint(0, 2**62, ()))
        with seeded_host_rngs(seed):
            return self.transform(to_pil_image(image))

    def __repr__(self) -> str:
        return f"PILTransform({self.transform})"


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0) -> PILTransform:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), center-crop ``img_size``, normalise."""
    from timm.data import create_transform

    t = create_transform(
        img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct, mean=tuple(mean), std=tuple(std)
    )
    return PILTransform(t)


# timm clips RandAugment magnitudes to [0, 10]; at 10 (reached by m9 + noise of std 0.5)
# PosterizeIncreasing keeps 0 bits, which recent Pillow (13) refuses with an error. A cap a hair below
# keeps at least 1 bit and moves every other operation by under 0.1%.
RAND_AUGMENT_MAX_MAGNITUDE = 9.99


def finetune_transform(
    data: DataConfig, settings: FinetuneSettings, mean: Sequence[float], std: Sequence[float]
) -> PILTransform:
    """The fine-tuning recipe from timm's pieces: RandomResizedCrop(``data.crop_scale``, bicubic)
    + flip + RandAugment (``settings.auto_augment``) + normalise + random erasing
    (``settings.reprob``, per-pixel noise). ``data.augment == "none"`` turns all of it off."""
    from timm.data import create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    from torchvision.transforms import Compose

    if data.augment == "none":
        return eval_transform(data.img_size, mean, std)
    crop_flip, _, to_tensor = create_transform(
        data.img_size,
        is_training=True,
        scale=tuple(data.crop_scale),
        hflip=0.5,
        color_jitter=None,  # off with RandAugment, as in the recipe
        interpolation="bicubic",
        re_prob=settings.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
        separate=True,
    )
    augment = []
    if settings.auto_augment:
        hparams = {
            "translate_const": int(data.img_size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": str_to_pil_interp("bicubic"),
            "magnitude_max": RAND_AUGMENT_MAX_MAGNITUDE,
        }
        augment = [rand_augment_transform(settings.auto_augment, hparams)]
    return PILTransform(Compose([*crop_flip.transforms, *augment, *to_tensor.transforms]))


# -- datasets ----------------------------------------------------------------------------------


def require_labels(dataset: ImageDataset, split: str, protocol: str, data: DataConfig) -> None:
    """Refuse unlabelled data for a supervised protocol, saying how to label a folder."""
    if dataset.num_classes > 0 and not (dataset.labels < 0).any():
        return
    where = data.path or data.name
    raise ConfigError(
        f"{protocol} needs labelled images, but the {split} split of {where} has no labels. Put each class in "
        "its own subfolder: ROOT/train/CLASS_NAME/*.jpg and ROOT/val/CLASS_NAME/*.jpg (then pass --data ROOT)"
    )


def labelled_splits(
    data: DataConfig, seed: int, protocol: str, crop_pct: float = 1.0
) -> tuple[ImageDataset, ImageDataset]:
    """(train, held-out) datasets, both labelled; the held-out one with the evaluation transform.

    The training split keeps openmae's ``data.augment`` transform (callers may replace it).
    """
    try:
        train = build_dataset(data, split="train", augment=True, seed=seed)
        test = build_dataset(data, split="test", augment=False, seed=seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require_labels(train, "train", protocol, data)
    require_labels(test, "held-out", protocol, data)
    if test.num_classes != train.num_classes:
        raise ConfigError(f"the train split has {train.num_classes} classes but the held-out split {test.num_classes}")
    test.transform = eval_transform(data.img_size, test.mean, test.std, crop_pct)
    return train, test


# -- models from checkpoints -------------------------------------------------------------------


def read_encoder(checkpoint: str | None):
    """The checkpoint's tensors in openmae names (:class:`openmae.interop.Weights`), None for none."""
    if checkpoint is None:
        return None
    from openmae.interop import UnsafeCheckpointError, read_weights

    try:
        return read_weights(checkpoint)
    except UnsafeCheckpointError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"cannot read {checkpoint}: {e}") from None


def _shape(cfg: dict[str, Any]) -> tuple:
    return tuple(cfg.get(k) for k in ("embed_dim", "depth", "patch_size"))


def _architecture(model_cfg: EncoderConfig, weights) -> tuple[str, dict[str, Any]]:
    """(classifier name, encoder constructor arguments) from the checkpoint, else ``model_cfg.name``."""
    from openmae.interop import infer_architecture

    wanted = classifier_name(model_cfg.name) if model_cfg.name else None
    if weights is None:
        return wanted or DEFAULT_CLASSIFIER, {}
    try:
        arch, cfg, _ = infer_architecture(weights)
    except ValueError as e:
        raise ConfigError(f"{weights.source}: {e}") from None
    name = classifier_name(arch)
    if name is None:
        raise ConfigError(
            f"{weights.source} holds a {arch}, another architecture than those these protocols evaluate "
            "(mae_vit_* / vit_* and convmae_* / convvit_* encoders, official MAE, Hugging Face ViTMAE or timm "
            "ViT checkpoints)"
        )
    encoder = {k: v for k, v in cfg.items() if k in classifier_args()}
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


def build_classifier(
    model_cfg: EncoderConfig,
    weights,
    *,
    num_classes: int,
    img_size: int,
    in_chans: int,
    head_norm: bool = False,
    fc_norm: bool | None = None,
    require_head: bool = False,
    layout_from_checkpoint: bool = False,
    verbose: bool = True,
) -> VisionTransformer:
    """The classifier a protocol trains or evaluates, with the checkpoint's weights loaded.

    Args:
        model_cfg: checkpoint / architecture name, pooling, drop path, constructor overrides.
        weights: :func:`read_encoder`'s result (None: random initialisation of ``model_cfg.name``).
        num_classes, img_size, in_chans: from the data. Another ``img_size`` than the checkpoint's
            is fine (the sin-cos position table is recomputed); other channels are refused.
        head_norm: BatchNorm without affine before the linear head (linear probing).
        fc_norm: LayerNorm on the pooled feature; None: with average pooling (timm's rule).
        require_head: the checkpoint's head must fit (evaluation of a trained classifier);
            otherwise a head that does not fit is left out with a note and trained anew.
        layout_from_checkpoint: pooling and head layout as the checkpoint's classifier recorded them.
    Raises:
        ConfigError: another architecture, other channels, a head that does not fit when required.
    """
    from openmae.registry import create_model

    name, encoder = _architecture(model_cfg, weights)
    pool = model_cfg.global_pool
    if pool == "auto":  # the paper's cls-token probe where there is a cls token
        pool = "avg" if name.startswith("convvit_") else "token"
    layout = {
        "num_classes": num_classes,
        "global_pool": pool,
        "fc_norm": fc_norm,
        "head_norm": head_norm,
        "drop_path_rate": model_cfg.drop_path_rate,
    }
    if layout_from_checkpoint and weights is not None and weights.arch == name:
        layout.update({k: weights.config[k] for k in ("global_pool", "fc_norm", "head_norm") if k in weights.config})
    kwargs = {**encoder, **model_cfg.kwargs, **layout, "img_size": img_size}
    file_chans = kwargs.get("in_chans", in_chans)
    if weights is not None and file_chans != in_chans:
        raise ConfigError(
            f"{weights.source} takes {file_chans}-channel images but the data gives {in_chans}; "
            f"pass --data.channels {file_chans}"
        )
    kwargs["in_chans"] = in_chans
    try:
        model = create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {name}: {e}") from None
    if weights is not None:
        report = load_classifier_weights(model, weights, require_head=require_head)
        if verbose:
            print(report.summary(), file=sys.stderr)
    return model


def build_feature_model(
    model_cfg: EncoderConfig, weights, *, img_size: int, in_chans: int, verbose: bool = True
) -> VisionTransformer:
    """A headless classifier whose output is the feature ``model_cfg.global_pool`` selects.

    Pretrained encoders give the cls token or the mean patch token after their final norm; a
    fine-tuned classifier with ``fc_norm`` (and no final norm) gives its fc_norm output.
    """
    tensors = checkpoint_tensors(weights) if weights is not None else {}
    fine_tuned = _has(tensors, "fc_norm.") and not _has(tensors, "norm.")
    cfg = dataclasses.replace(model_cfg, drop_path_rate=0.0)
    return build_classifier(
        cfg, weights, num_classes=0, img_size=img_size, in_chans=in_chans, fc_norm=fine_tuned, verbose=verbose
    )


def _head_kind(keys: set[str]) -> str:
    return "BatchNorm + linear (linear probe)" if any(k.startswith("head.1.") for k in keys) else "linear"


def load_classifier_weights(model: VisionTransformer, weights, require_head: bool = False):
    """Load a checkpoint into a classifier; returns interop's :class:`LoadReport`.

    The decoder and pretraining-only tensors are ignored. The trunk's final ``norm`` is left out
    when ``fc_norm`` replaces it (average pooling, the paper's fine-tuning), ``fc_norm`` when the
    model pools the cls token. A head loads only when its layout and class count fit.
    """
    from openmae.interop import load_into

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
        report = load_into(model, dataclasses.replace(weights, state=tensors, extras={}), arch=model.arch)
    except ValueError as e:
        raise ConfigError(f"cannot load {weights.source} into {model.arch}: {e}") from None
    report.notes = notes + report.notes
    return report


def _classes(tensors: dict[str, Tensor], head: set[str]) -> int:
    bias = [k for k in head if k.endswith("bias")]
    return int(tensors[bias[-1]].shape[0]) if bias else -1


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


def check_resume(path: Path | None, model: VisionTransformer) -> None:
    """Refuse to resume a checkpoint of another architecture or class count, before the engine tries."""
    if path is None:
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("openmae", "{}"))
    arch, cfg = meta.get("arch"), meta.get("config", {})
    hint = "use another --output, or --resume none to start afresh"
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


# -- freezing ----------------------------------------------------------------------------------


def freeze_for_tuning(model: nn.Module, tune_blocks: str | int) -> list[str]:
    """Partial fine-tuning: freeze all but the last K blocks, or all but the last block's MLP half.

    The blocks are the model's ``tunable_blocks()`` (a ViT's blocks, ConvViT's stage-3 blocks);
    of its ``readout_modules()``, the last two (``fc_norm``, the head) always train and any before
    them (a final ``norm``) train with any block. ``all`` freezes nothing (the fixed position table
    stays fixed). Returns the names left trainable.
    """
    spec = parse_tune_blocks(tune_blocks)
    if spec == "all":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = model.tunable_blocks()
    depth = len(blocks)
    *trunk_end, fc_norm, head = model.readout_modules()
    if spec == "mlp":
        tuned = [blocks[-1].norm2, blocks[-1].mlp, *trunk_end] if depth else []
    else:
        if spec > depth:
            raise ConfigError(f"finetune.tune_blocks {spec} is more than the model's {depth} blocks")
        tuned = blocks[depth - spec :] + (trunk_end if spec else [])
    train = {id(p) for m in (*tuned, fc_norm, head) for p in m.parameters()}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = id(p) in train
        if p.requires_grad:
            trainable.append(name)
    return trainable


# -- evaluation --------------------------------------------------------------------------------


def eval_loader(dataset: ImageDataset, batch_size: int, dist: DistInfo, num_workers: int = 0) -> DataLoader:
    """Every image once, in index order, rank r taking indices r, r + W, ... (nothing dropped)."""
    dataset.set_epoch(0)
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate)


def topk_correct(logits: Tensor, labels: Tensor, topk: Sequence[int] = TOPK) -> list[int]:
    """How many rows have their label among the k highest scores, for each k (capped at the class count)."""
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top == labels.unsqueeze(1)
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    dist: DistInfo | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of a classifier on a labelled dataset.

    Returns ``{"top1", "top5", "loss", "images"}``; the same on 1 or N processes.
    """
    dist = dist or DistInfo()
    device = torch.device(device)
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    totals = torch.zeros(2 + len(TOPK), dtype=torch.float64)  # images, loss sum, correct@k...
    batches = eval_loader(dataset, batch_size, dist, num_workers)
    for batch in _progress(batches, progress and dist.is_main, "evaluate"):
        if len(batch) == 0:
            continue
        images, labels = batch.images.to(device), batch.labels.to(device)
        with autocast():
            logits = model(images)
        logits = logits.float()
        totals[0] += len(labels)
        totals[1] += float(F.cross_entropy(logits, labels, reduction="sum"))
        totals[2:] += torch.tensor(topk_correct(logits, labels), dtype=torch.float64)
    model.train(was_training)
    totals = all_reduce_sum(totals.to(device), dist).cpu()
    n = max(float(totals[0]), 1.0)
    out = {f"top{k}": round(100.0 * float(c) / n, 4) for k, c in zip(TOPK, totals[2:])}
    return {**out, "loss": float(totals[1]) / n, "images": int(totals[0])}


def _progress(iterable, enabled: bool, label: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=label, unit="batch", dynamic_ncols=True, leave=False)


def pooled_features(model: nn.Module, images: Tensor, pool: str = "token") -> Tensor:
    """(N, C, H, W) -> (N, D): a classifier's pre-logits, or an MAE's cls / mean patch token
    after its final norm (its deterministic, unmasked ``encode``)."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if not hasattr(model, "encode"):
        raise TypeError(f"{type(model).__name__} has no encode(images); features need a ViT encoder")
    tokens = model.encode(images)  # (N, P + L, D): P prefix (cls) tokens, then the patch tokens
    prefix = model.num_prefix_tokens
    if pool == "token":
        if prefix == 0:
            raise ValueError(f"{type(model).__name__} has no cls token: pool 'avg' instead of 'token'")
        return tokens[:, 0]
    return tokens[:, prefix:].mean(dim=1)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    pool: str = "token",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    dist: DistInfo | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Features of every image of ``dataset``, row i for dataset index i, on every rank.

    Returns (features (N, D) float32, ok (N,) bool); ``ok`` is False for files that failed to
    decode (their row is zero). Deterministic: eval mode, fixed order and batches.
    """
    dist = dist or DistInfo()
    device = torch.device(device)
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    n = len(dataset)
    features: Tensor | None = None
    ok = torch.zeros(n, dtype=torch.float32)
    dim = getattr(model, "embed_dim", None)
    if dim is not None:
        features = torch.zeros(n, dim)
    for batch in _progress(eval_loader(dataset, batch_size, dist, num_workers), progress and dist.is_main, "features"):
        if len(batch) == 0:
            continue
        with autocast():
            f = pooled_features(model, batch.images.to(device), pool)
        if features is None:
            features = torch.zeros(n, f.shape[1])
        features[batch.indices] = f.float().cpu()
        ok[batch.indices] = 1.0
    model.train(was_training)
    if features is None:
        raise ValueError("no image of the dataset could be decoded")
    if dist.enabled:  # rows are disjoint across ranks: a sum gathers them
        features = all_reduce_sum(features.to(device), dist).cpu()
        ok = all_reduce_sum(ok.to(device), dist).cpu()
    return features, ok > 0


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN votes (Wu et al. 2018, as DINO's monitor): each of the k most cosine-similar
    training images votes for its class with weight exp(similarity / temperature).

    Args:
        train_features: (M, D); train_labels: (M,) int in [0, num_classes); test_features: (N, D).
    Returns:
        (N, num_classes) summed votes, to rank like logits.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # (n, M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores[start : start + chunk] = votes
    return scores


def knn_accuracy(
    model: nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "token",
    **extract: Any,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of weighted kNN on frozen features, training split as the memory bank."""
    f_train, ok_train = extract_features(model, train, pool=pool, **extract)
    f_test, ok_test = extract_features(model, test, pool=pool, **extract)
    y_train = torch.as_tensor(train.labels)[ok_train]
    y_test = torch.as_tensor(test.labels)[ok_test]
    scores = knn_classify(f_train[ok_train], y_train, f_test[ok_test], train.num_classes, k, temperature)
    n = max(len(y_test), 1)
    return {f"top{kk}": round(100.0 * c / n, 4) for kk, c in zip(TOPK, topk_correct(scores, y_test))} | {
        "images": len(y_test),
        "memory": len(y_train),
    }


class KNNMonitor:
    """A pretraining hook: kNN accuracy of the encoder's features every ``every`` epochs.

    Add it to a :class:`openmae.tasks.PretrainTask`'s ``hooks``; the engine logs what it returns
    (``knn/top1``, ``knn/top5``) to metrics.jsonl and TensorBoard. Use small splits
    (``DataConfig(limit=...)``): the memory bank is re-encoded each time.
    """

    def __init__(
        self,
        train: ImageDataset,
        test: ImageDataset,
        every: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "token",
        batch_size: int = 256,
    ) -> None:
        self.train, self.test = train, test
        self.every, self.k, self.temperature, self.pool, self.batch_size = every, k, temperature, pool, batch_size

    def __call__(self, task, ctx) -> dict[str, float] | None:
        if (ctx.epoch + 1) % self.every:
            return None
        metrics = knn_accuracy(
            task.model, self.train, self.test, k=self.k, temperature=self.temperature, pool=self.pool,
            batch_size=self.batch_size, device=ctx.device, precision=ctx.precision, dist=ctx.dist,
        )
        return {"knn/top1": metrics["top1"], "knn/top5": metrics["top5"]}


# -- tasks -------------------------------------------------------------------------------------


class HeldOutEvaluation:
    """Top-1 / top-5 on the held-out split every ``settings.every`` epochs and after the last one."""

    def __init__(self, dataset: ImageDataset, settings: EvalSettings, epochs: int, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.settings = settings
        self.epochs = epochs
        self.num_workers = num_workers

    def run(self, model: nn.Module, ctx) -> dict[str, float]:
        return evaluate(
            model, self.dataset, batch_size=self.settings.batch_size, device=ctx.device,
            precision=ctx.precision, dist=ctx.dist, num_workers=self.num_workers,
        )

    def on_epoch_end(self, model: nn.Module, ctx) -> dict[str, float] | None:
        every = self.settings.every
        if every == 0 or (ctx.epoch + 1) % every or ctx.epoch + 1 == self.epochs:
            return None  # the last epoch is evaluated by on_train_end
        return {f"test/{k}": v for k, v in self.run(model, ctx).items() if k != "images"}

    def on_train_end(self, model: nn.Module, ctx) -> dict[str, Any]:
        return {"test": self.run(model, ctx)}


class _ClassifierTask:
    name = "classifier"

    def __init__(self, model: VisionTransformer, evaluation: HeldOutEvaluation | None) -> None:
        self.model = model
        self.evaluation = evaluation

    def on_epoch_end(self, ctx) -> dict[str, float] | None:
        return self.evaluation.on_epoch_end(self.model, ctx) if self.evaluation else None

    def on_train_end(self, ctx) -> dict[str, Any]:
        return self.evaluation.on_train_end(self.model, ctx) if self.evaluation else {}


class FinetuneTask(_ClassifierTask):
    """Fine-tuning (end-to-end or partial): cross-entropy with label smoothing, or on mixup/cutmix
    soft targets; layer-wise lr decay through timm's parameter groups.

    Mixing draws from NumPy's generator, seeded per step from (seed, epoch, first index of the
    batch), so a run and its resumed copy mix the same way.
    """

    name = "finetune"

    def __init__(
        self,
        model: VisionTransformer,
        settings: FinetuneSettings,
        seed: int = 0,
        evaluation: HeldOutEvaluation | None = None,
    ) -> None:
        super().__init__(model, evaluation)
        self.settings = settings
        self.seed = seed
        self.trainable = freeze_for_tuning(model, settings.tune_blocks)
        self.mixup = None
        if settings.mixing():
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=settings.mixup,
                cutmix_alpha=settings.cutmix,
                prob=settings.mixup_prob,
                switch_prob=settings.mixup_switch_prob,
                mode="batch",
                label_smoothing=settings.smoothing,
                num_classes=model.num_classes,
            )

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Per-layer groups: lr scale ``layer_decay ** (depth + 1 - layer)``, layer 0 the patch
        embedding and tokens, layer i block i - 1, the last the head (timm's grouping, whose final
        norm shares the last block's rate). The engine multiplies ``lr_scale`` into the schedule."""
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(
            self.model,
            weight_decay,
            no_weight_decay_list=sorted(self.model.no_weight_decay()),
            layer_decay=self.settings.layer_decay,
        )

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        images, labels = batch.images, batch.labels
        if self.mixup is None:
            logits = model(images)
            return {"loss": F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.smoothing)}
        if len(images) % 2:  # batch mixing pairs image i with image N-1-i; a failed load can leave N odd
            images, labels = images[:-1], labels[:-1]
        with seeded_host_rngs(sample_seed(self.seed, epoch, int(batch.indices[0]), stream=2)):
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return {"loss": loss}


class LinearProbeTask(_ClassifierTask):
    """Linear probing: everything but the head frozen; the head is BatchNorm (no affine) + linear,
    trained with LARS as in the paper (or SGD / AdamW)."""

    name = "linprobe"

    def __init__(
        self, model: VisionTransformer, settings: LinprobeSettings, evaluation: HeldOutEvaluation | None = None
    ) -> None:
        super().__init__(model, evaluation)
        self.settings = settings
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def build_optimizer(self, groups: list[dict], lr: float, optim_cfg) -> torch.optim.Optimizer:
        if self.settings.optimizer == "adamw":
            return build_adamw(groups, lr, optim_cfg.betas)
        clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(clean, lr=lr, momentum=self.settings.momentum)
        from timm.optim import Lars

        for g in clean:
            # LARS scales the update of weight matrices by trust x |w| / |g|; biases take plain
            # momentum SGD (the reference excludes 1-D parameters), whatever the weight decay.
            g["always_adapt"] = all(p.ndim > 1 for p in g["params"])
        return Lars(clean, lr=lr, momentum=self.settings.momentum, trust_coeff=0.001)

    def __call__(self, model: nn.Module, batch, epoch: int) -> dict[str, Tensor]:
        logits = model(batch.images)
        return {"loss": F.cross_entropy(logits.float(), batch.labels)}


# -- runs --------------------------------------------------------------------------------------


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json`` in the output folder (atomic)."""
    from openmae.checkpoint import atomic_write_text

    path = Path(out_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def describe_model(model: VisionTransformer) -> dict[str, Any]:
    return {"model": model.arch, "pool": model.global_pool, "fc_norm": model.use_fc_norm, "num_classes": model.num_classes}


def train_protocol(protocol: str, task: _ClassifierTask, train: ImageDataset, cfg, config: dict[str, Any]) -> dict[str, Any]:
    """Run a classifier task on the engine; returns (and writes) its metrics: held-out top-1/top-5."""
    from openmae.engine import Trainer

    trainer = Trainer(task, train, cfg.train, cfg.optim, config)
    check_resume(trainer.find_resume(), task.model)
    summary = trainer.fit()
    metrics = {
        "protocol": protocol,
        **summary["test"],
        "checkpoint": cfg.model.checkpoint,
        **describe_model(task.model),
        "dataset": cfg.data.path or cfg.data.name,
        "trainable_parameters": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
        "epochs": cfg.train.epochs,
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "seconds": summary["seconds"],
        "eval_only": False,
    }
    if trainer.dist.is_main:
        write_metrics(cfg.train.output_dir, metrics)
    return metrics


def evaluate_checkpoint(protocol: str, cfg, head_norm: bool) -> dict[str, Any]:
    """``--eval-only``: held-out top-1/top-5 of a saved classifier, written to metrics.json."""
    from openmae.config import to_dict
    from openmae.distributed import barrier, init_distributed, resolve_device
    from openmae.engine import write_run_files
    from openmae.precision import resolve_precision

    if cfg.model.checkpoint is None:
        raise ConfigError("--eval-only needs --checkpoint: a classifier saved by this protocol")
    weights = read_encoder(cfg.model.checkpoint)
    _, test = labelled_splits(cfg.data, cfg.train.seed, protocol, cfg.eval.crop_pct)
    device = resolve_device(cfg.train.device)
    dist = init_distributed(device)
    precision = resolve_precision(cfg.train.precision, device)
    model = build_classifier(
        cfg.model, weights, num_classes=test.num_classes, img_size=cfg.data.img_size, in_chans=test.channels,
        head_norm=head_norm, require_head=True, layout_from_checkpoint=True, verbose=dist.is_main,
    ).to(device)
    result = evaluate(
        model, test, batch_size=cfg.eval.batch_size, device=device, precision=precision, dist=dist,
        num_workers=cfg.data.num_workers, progress=cfg.train.progress,
    )
    metrics = {
        "protocol": protocol, **result, "checkpoint": cfg.model.checkpoint, **describe_model(model),
        "dataset": cfg.data.path or cfg.data.name, "eval_only": True,
    }
    if dist.is_main:
        out = Path(cfg.train.output_dir)
        write_run_files(out, to_dict(cfg), dist)
        write_metrics(out, metrics)
    barrier(dist)
    return metrics
