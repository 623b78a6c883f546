"""Dense-prediction models on a pretrained encoder: a semantic segmentor (pyramid + UperNet / FPN
head) and torchvision's Faster R-CNN / Mask R-CNN on the same pyramids through an FPN.

- :func:`build_dense_encoder`: the encoder alone (no head, no decoder) from a registered name (random
  initialisation) or any checkpoint ``openmae.load_pretrained`` reads, at the image size of the dense
  task; its position table follows the new grid.
- :class:`Segmentor`: ``forward(images) -> logits`` at the input size, ``loss`` (cross-entropy with an
  ignore index), ``param_groups`` (layer-wise lr decay on the encoder).
- :func:`build_detector`: torchvision's detector with :class:`DetectionBackbone` (pyramid + FPN with
  a max-pooled extra level), anchors scaled to the levels' strides, image sizes for small images.
- :func:`dense_param_groups`: AdamW groups for either: the encoder's layers get the classifier's
  layer-wise decay (timm's grouping, as fine-tuning), everything new (pyramid, neck, heads) the full lr.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from openmae.dense.heads import HEADS
from openmae.dense.pyramid import VIT_SCALE_FACTORS, Pyramid, ViTPyramid, build_pyramid
from openmae.eval_config import EncoderConfig
from openmae.interop.classifier import ClassifierLayout, build_classifier, encoder_config, read_encoder
from openmae.models import create_model, list_models
from openmae.models.classifier import classifier_args, classifier_name
from openmae.optim import param_groups
from openmae.patches import to_2tuple

DETECTORS = ("faster_rcnn", "mask_rcnn")

# A dense encoder keeps the trunk's final norm (the pyramid reads normalised tokens) and has no head.
DENSE_READOUT = dict(num_classes=0, global_pool="avg", fc_norm=False)


# -- the encoder -----------------------------------------------------------------------------------


def build_dense_encoder(
    name_or_checkpoint: str | os.PathLike,
    img_size: int | Sequence[int] | None = None,
    in_chans: int | None = None,
    *,
    arch: str | None = None,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> nn.Module:
    """A headless ViT / ConvViT / Swin for :func:`build_pyramid`, random or from a checkpoint.

    Args:
        name_or_checkpoint: a registered name (``vit_*``, ``convvit_*``, ``swin_*``, or the pretraining
            name ``mae_vit_*`` / ``convmae_*`` / ``simmim_swin_*``, which picks its encoder), randomly
            initialised; or a checkpoint path (openmae run folder or file, official MAE / ConvMAE,
            Hugging Face, timm), whose decoder and head are dropped.
        img_size: the dense task's image size, int or (H, W); default the checkpoint's (or the
            variant's). A checkpoint's position table is recomputed for the new grid (fixed sin-cos)
            or resampled bicubically (learned) as every load does (:mod:`openmae.interop`).
        in_chans: image channels; default the checkpoint's. Others are refused.
        arch: the architecture, for files that do not record it (official ConvMAE: ``convvit_base_patch16``).
        drop_path_rate: stochastic depth (the papers fine-tune with 0.1-0.3 for dense tasks).
        overrides: further constructor arguments (``window_size=``, ``global_blocks=`` for ConvViT).
    Returns:
        The encoder; from a checkpoint its :class:`~openmae.interop.LoadReport` is in ``load_report``.
    Raises:
        FileNotFoundError: neither a registered name nor an existing path.
        ValueError: (``ConfigError``) an unreadable file, another architecture, other channels.
    """
    source = str(name_or_checkpoint)
    if source in list_models():
        name = classifier_name(source)
        if name is None:
            raise ValueError(
                f"{source} has no encoder for dense prediction; choose a vit_*, convvit_* or swin_* model "
                "(or its mae_vit_* / convmae_* / simmim_swin_* pretraining name)"
            )
        kwargs = {k: v for k, v in DENSE_READOUT.items() if k in classifier_args(name)}
        kwargs["drop_path_rate"] = drop_path_rate
        if img_size is not None:
            kwargs["img_size"] = img_size
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        return create_model(name, **kwargs, **overrides)
    if not Path(source).exists():
        raise FileNotFoundError(
            f"{source}: no such file or folder, and not a registered model name; pass a checkpoint or one of "
            "`openmae models` (vit_*, convvit_*, swin_*)"
        )
    weights = read_encoder(source)
    model_cfg = EncoderConfig(
        checkpoint=source, name=arch, global_pool="avg", drop_path_rate=drop_path_rate, kwargs=dict(overrides)
    )
    _, cfg = encoder_config(model_cfg, weights)
    size = to_2tuple(img_size if img_size is not None else cfg["img_size"])
    chans = in_chans if in_chans is not None else cfg.get("in_chans", 3)
    # the one loading path fits the position table to the new grid (and notes it in the load report)
    return build_classifier(model_cfg, weights, ClassifierLayout(num_classes=0, fc_norm=False), img_size=size,
                            in_chans=chans)


# -- parameter groups ------------------------------------------------------------------------------


def dense_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups with layer-wise lr decay on the encoder of a :class:`Segmentor` or detector.

    The encoder's parameters are grouped by its ``group_matcher`` (timm's layer ids, as classification
    fine-tuning: the stem first, one layer per block, the final norm after them); everything else
    (pyramid, neck, heads) stands one layer above the encoder, as a classifier's head, with scale 1.0.
    Layer i gets ``lr_scale = layer_decay ** (top - i)``. No weight decay on biases, norms, any 1-D
    parameter and the encoder's ``no_weight_decay()`` tensors (pos_embed, cls_token, Swin's relative
    position tables); frozen parameters (the sin-cos table) are left out.

    Returns:
        ``openmae.optim.param_groups`` groups (``params``, ``names``, ``weight_decay``, ``lr_scale``),
        for ``openmae.optim.build_adamw``.
    """
    pyramids = [m for m in model.modules() if isinstance(m, Pyramid)]
    if len(pyramids) != 1:
        raise ValueError(f"expected a model with one pyramid (Segmentor or build_detector's), found {len(pyramids)}")
    encoder = pyramids[0].encoder
    encoder_name = {id(p): n for n, p in encoder.named_parameters()}
    layer_of = group_parameters(encoder, encoder.group_matcher(coarse=False), reverse=True)  # name -> layer id
    top = max(layer_of.values()) + 1
    no_decay = set(encoder.no_weight_decay()) if hasattr(encoder, "no_weight_decay") else set()
    scales: dict[str, float] = {}
    skip: set[str] = set()
    for name, p in model.named_parameters():
        inner = encoder_name.get(id(p))
        scales[name] = layer_decay ** (top - layer_of.get(inner, top)) if inner is not None else 1.0
        if inner in no_decay:
            skip.add(name)
    return param_groups(model, weight_decay, skip=skip, lr_scale=scales.__getitem__)


# -- semantic segmentation -------------------------------------------------------------------------


class Segmentor(nn.Module):
    """Semantic segmentation: an encoder's pyramid and a UperNet or FPN head.

    Args:
        encoder: a headless ViT / ConvViT / Swin (:func:`build_dense_encoder`).
        num_classes: classes of the label maps (the ignore index aside).
        head: ``upernet`` (the papers') or ``fpn`` (lighter).
        ignore_index: label of pixels that count for nothing (ADE20K's and COCO-stuff's 255).
        channels: the head's width; default the head's (UperNet 256, FPN 128).
        norm: the head's normalisation, ``bn`` or ``gn`` (see :mod:`openmae.dense.heads`).
        dropout: Dropout2d before the classifier.
        pool_scales: UperNet's PPM grids.
        scale_factors, window_size, global_blocks, pyramid_channels: the ViT pyramid's options
            (:class:`~openmae.dense.pyramid.ViTPyramid`; ``pyramid_channels`` is its ``out_channels``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        head: str = "upernet",
        ignore_index: int = 255,
        channels: int | None = None,
        norm: str = "bn",
        dropout: float = 0.1,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        scale_factors: Sequence[float] = VIT_SCALE_FACTORS,
        window_size: int = 0,
        global_blocks: Sequence[int] | None = None,
        pyramid_channels: int | None = None,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone = build_pyramid(encoder, scale_factors, window_size, global_blocks, pyramid_channels)
        options: dict[str, Any] = dict(num_classes=num_classes, norm=norm, dropout=dropout)
        if channels is not None:
            options["channels"] = channels
        if head == "upernet":
            options["pool_scales"] = tuple(pool_scales)
        self.head = HEADS[head](self.backbone.out_channels, **options)
        self.head_name = head
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder

    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes, H, W), upsampled bilinearly from the finest level."""
        h, w = images.shape[-2:]
        logits = self.head(self.backbone(images))  # (N, K, h0, w0), h0 = ceil(H / s0)
        stride = next(iter(self.backbone.strides.values()))
        # upsample to the padded extent the map covers (h0 * s0 >= H), then crop, so pixels stay aligned
        size = (round(logits.shape[-2] * stride), round(logits.shape[-1] * stride))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Mean cross-entropy over the pixels whose label is not ``ignore_index``, in fp32.

        Args:
            logits: (N, K, H, W).
            masks: (N, H, W) integer labels in [0, K) or ``ignore_index``.
        """
        if masks.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"masks of shape {tuple(masks.shape)} do not fit logits {tuple(logits.shape)}; "
                "pass (N, H, W) label maps of the images' size"
            )
        masks = masks.long()
        if not (masks != self.ignore_index).any():  # nothing to learn from; keep the graph, no NaN
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, H, W) int64 class per pixel."""
        return self(images).argmax(dim=1)

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """AdamW groups (:func:`dense_param_groups`)."""
        return dense_param_groups(self, weight_decay, layer_decay)


# -- detection -------------------------------------------------------------------------------------


class DetectionBackbone(nn.Module):
    """A pyramid and torchvision's FeaturePyramidNetwork with a max-pooled extra level ("pool"), the
    backbone torchvision's detectors expect (``out_channels``: the FPN's width).

    Args:
        pyramid: :func:`build_pyramid`'s module.
        out_channels: width of every FPN level.
    """

    def __init__(self, pyramid: Pyramid, out_channels: int = 256):
        super().__init__()
        self.body = pyramid
        self.fpn = FeaturePyramidNetwork(
            list(pyramid.out_channels.values()), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        last = list(pyramid.strides.values())[-1]
        self.strides = {**pyramid.strides, "pool": 2 * last}  # FPN's names: the pyramid's, then "pool"

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """(N, C, H, W) -> {name: (N, out_channels, h_i, w_i)}, the pyramid's levels then "pool"."""
        return self.fpn(self.body(images))


def default_anchor_sizes(strides: Sequence[float], scale: float = 4.0) -> tuple[tuple[float, ...], ...]:
    """One anchor size per level, ``scale`` x its stride: 16-256 px for strides 4-64 (patch 16), 4-64 px
    for strides 1-16 (patch 4). The usual FPN rule is 8 x stride (32-512 px on 800-1333 px COCO
    images); half that suits small scenes (64 px with 10-40 px objects)."""
    return tuple((float(scale * s),) for s in strides)


def build_detector(
    encoder: nn.Module,
    *,
    kind: str = "faster_rcnn",
    num_classes: int,
    min_size: int | None = None,
    max_size: int | None = None,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    fpn_channels: int = 256,
    representation_size: int = 1024,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    scale_factors: Sequence[float] = VIT_SCALE_FACTORS,
    window_size: int = 0,
    global_blocks: Sequence[int] | None = None,
    **detector_options: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN or Mask R-CNN on the encoder's pyramid through an FPN.

    The model is torchvision's, unchanged: in training ``model(images, targets)`` returns its loss
    dict (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``, and
    ``loss_mask`` for Mask R-CNN); in eval ``model(images)`` returns per image ``boxes`` (x1, y1, x2,
    y2 in input pixels), ``labels``, ``scores`` (and ``masks`` (K, 1, H, W) probabilities). Targets
    hold ``boxes`` (K, 4) float, ``labels`` (K,) int64 in 1..num_classes-1 (and ``masks`` (K, H, W) uint8).

    Args:
        encoder: a headless ViT / ConvViT / Swin (:func:`build_dense_encoder`).
        kind: ``faster_rcnn`` or ``mask_rcnn``.
        num_classes: torchvision's count, background included: object classes + 1 (label 0 is the
            background).
        min_size, max_size: torchvision resizes each image so its short side is ``min_size`` unless its
            long side would exceed ``max_size``. Default: the encoder's ``img_size`` (short and long
            side), so images of that size are not rescaled (torchvision's 800 / 1333 would blow 64 px
            scenes up 12x). ConvViT and Swin pyramids take at most their ``img_size``: build them square.
        anchor_sizes: one tuple of sizes (input pixels) per FPN level, the extra "pool" level last;
            default :func:`default_anchor_sizes` with ``anchor_scale``.
        anchor_scale: anchor side over level stride for the default sizes.
        aspect_ratios: anchor height/width ratios, the same on every level.
        fpn_channels: the FPN's width (and the mask head's).
        representation_size: width of the box head's two fully connected layers.
        image_mean, image_std: the detector normalises each image with them; default 0 and 1 (no-op):
            images arrive normalised as the encoder was pretrained. One value per channel.
        scale_factors, window_size, global_blocks: the ViT pyramid's options.
        detector_options: further torchvision arguments (``box_detections_per_img``, ``rpn_*``, ...).
    """
    if kind not in DETECTORS:
        raise ValueError(f"kind must be one of {', '.join(DETECTORS)}, got {kind!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too (torchvision's convention): >= 2, got {num_classes}")
    pyramid = build_pyramid(encoder, scale_factors, window_size, global_blocks)
    backbone = DetectionBackbone(pyramid, fpn_channels)
    strides = list(backbone.strides.values())
    if anchor_sizes is None:
        sizes = default_anchor_sizes(strides, anchor_scale)
    else:
        sizes = tuple(tuple(float(s) for s in level) for level in anchor_sizes)
    if len(sizes) != len(strides):
        raise ValueError(
            f"anchor_sizes needs one tuple per FPN level ({', '.join(backbone.strides)}): {len(strides)}, "
            f"got {len(sizes)}"
        )
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    levels = list(pyramid.strides)  # RoI pooling reads the pyramid's levels, not "pool" (as torchvision's)
    img_size = to_2tuple(encoder.img_size)
    chans = encoder.in_chans
    mean = list(image_mean) if image_mean is not None else [0.0] * chans
    std = list(image_std) if image_std is not None else [1.0] * chans
    if len(mean) != chans or len(std) != chans:
        raise ValueError(f"image_mean and image_std need one value per channel ({chans}), got {mean} and {std}")
    # ViT pads to its patch itself; ConvViT and Swin must not be padded past their img_size
    divisible = 32 if isinstance(pyramid, ViTPyramid) else math.gcd(32, *img_size)
    options: dict[str, Any] = dict(
        min_size=min_size if min_size is not None else min(img_size),
        max_size=max_size if max_size is not None else max(img_size),
        image_mean=mean,
        image_std=std,
        size_divisible=divisible,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        # torchvision's box head at our width (it takes num_classes only when it builds these itself)
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
    )
    if kind == "mask_rcnn":
        options.update(
            mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes),
        )
    options.update(detector_options)
    return (MaskRCNN if kind == "mask_rcnn" else FasterRCNN)(backbone, **options)


__all__ = [
    "DETECTORS",
    "DetectionBackbone",
    "Segmentor",
    "build_dense_encoder",
    "build_detector",
    "default_anchor_sizes",
    "dense_param_groups",
]
