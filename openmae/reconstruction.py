"""Reconstructions: what a masked autoencoder makes of masked images, as display-ready panels.

The panels of the MAE paper (Figures 2-4): the original, the masked input, the reconstruction and the
reconstruction with the visible patches pasted back, for one or several mask ratios.

Norm-pix models predict every patch normalised by its *own* mean and variance, which are unknown for
a removed patch at inference. :func:`reconstruct` never hides that; ``unnormalize`` picks how to show
the prediction, and the figure says which:

- ``"visible"``: a visible patch is un-normalised with its own statistics (known: it is in
  the input); a removed patch with the image's typical patch statistics, i.e. the average per-patch
  mean and the average per-patch variance of the visible patches of that image.
- ``"dataset"``: the dataset statistics only. Every predicted patch is taken as a patch of mean 0 and
  std 1 in the data pipeline's normalised space (the dataset's average patch), then mapped to pixels
  with the pipeline's per-channel mean/std: ``pixel = pred * std_c + mean_c``.
- ``"none"``: the normalised view. Every panel (the original too) is shown per-patch normalised,
  ``(x - mean) / std`` of each patch, with -2..+2 std mapped to black..white.

- ``"head"``: the model's pixel head (``pixel_head=True``): a linear readout of raw pixels from the
  decoder's output, trained beside the norm-pix head on detached features. ``"auto"`` (default) picks
  it when the model has one, else ``"visible"``.

Models trained on raw pixels (``norm_pix_loss=False``) need none of this; their mode is ``"pixels"``.

Figures are drawn by :mod:`openmae.visualize`. Everything here uses only the MAE model interface
(``forward(images, mask_ratio, noise=, mask=)`` -> ``MAEOutput``, ``patchify`` / ``unpatchify``,
``norm_pix_loss``, ``grid_size``, ``num_patches``, ``in_chans``, ``img_size``, ``patch_size``), so it
works for any masked-image model in the registry.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch import Tensor

from openmae.checkpoint import training_config
from openmae.data import DATASET_NORMALIZATION, BadImageError, decode_image
from openmae.interop import build_for, read_weights
from openmae.interop.architecture import load_into
from openmae.interop.native import resolve_weights_file
from openmae.interop.weights import DECODER_PREFIXES, FIXED, abbrev
from openmae.io import unwrap
from openmae.masking import MASK_TYPES, check_mask_ratio, num_kept, sample_mask
from openmae.patches import to_2tuple
from openmae.transforms import resize_center_crop

UNNORMALIZE_MODES = ("auto", "head", "visible", "dataset", "none")
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
MASK_FILL = 0.5  # removed patches are shown mid-grey, as in the paper's figures
PATCH_EPS = 1.0e-6  # the norm-pix target's epsilon: (x - mean) / sqrt(var + eps)

_MODE_TEXT = {
    "pixels": "pixel target: the prediction is shown as it is",
    "head": "norm-pix target, shown through the pixel head: a linear readout of raw pixels from the decoder's "
    "output, trained on detached features (it does not change what the model learns)",
    "visible": "norm-pix target, un-normalised with known statistics: visible patches with their own mean/std, "
    "removed patches with the average of the visible patches' (theirs are unknown at inference)",
    "dataset": "norm-pix target: patches un-normalised with dataset statistics only "
    "(each patch taken as mean 0, std 1 in the normalised image space)",
    "none": "norm-pix target: normalised view, every patch shown as (x - mean) / std, -2..+2 std = black..white",
}



class DecoderMissingError(ValueError):
    """Reconstruction was asked of a model or checkpoint without the MAE decoder."""


def decoder_missing_message(detail: str) -> str:
    return (
        f"reconstruction needs the decoder; this checkpoint holds the encoder only ({detail}). "
        "Use a full pretraining checkpoint or an exported MAE with its decoder (official: *_full.pth / "
        "visualize files; the released mae_pretrain_vit_*.pth hold the encoder only)."
    )


def require_decoder(model: nn.Module, source: str | None = None) -> None:
    """Raise :class:`DecoderMissingError` unless ``model`` has a decoder with loaded weights.

    A model object without ``decoder_pred`` / ``forward_decoder`` has no decoder; a model whose
    ``load_report`` (when a loader attaches one) lists decoder weights as missing has a random one.
    """
    model = unwrap(model)
    where = f"{source}: " if source else ""
    if not hasattr(model, "decoder_pred") or not callable(getattr(model, "forward_decoder", None)):
        raise DecoderMissingError(decoder_missing_message(f"{where}{type(model).__name__} has no decoder_pred"))
    report = getattr(model, "load_report", None)  # openmae.interop attaches a LoadReport
    get = report.get if isinstance(report, dict) else lambda key: getattr(report, key, None)
    if get("has_decoder") is False:
        kind = f" ({get('kind')})" if get("kind") else ""
        raise DecoderMissingError(decoder_missing_message(f"{where}the file{kind} has no decoder weights"))
    decoder_keys = [k for k in (get("missing") or ()) if k.startswith("decoder") or k == "mask_token"]
    if decoder_keys:
        raise DecoderMissingError(
            decoder_missing_message(
                f"{where}decoder weights not in the file: {', '.join(sorted(decoder_keys)[:4])}, ..."
            )
        )


# -- checkpoints ------------------------------------------------------------------------------


def load_reconstruction_model(path: str | os.PathLike, allow_partial: bool = False, **overrides: Any) -> nn.Module:
    """``openmae.load_pretrained(path)``, refusing checkpoints without the decoder with a clear message.
    ``allow_partial`` accepts a file that lacks encoder tensors (they keep their initial values); the
    decoder must be whole either way.

    Raises:
        DecoderMissingError: the file has no (or part of the) decoder weights, or the model has no decoder.
    """
    weights = read_weights(path)
    model, arch = build_for(weights, overrides)
    decoder = [k for k in model.state_dict() if k.startswith(DECODER_PREFIXES) and k not in FIXED]
    absent = sorted(k for k in decoder if k not in weights.state)
    if not decoder:
        raise DecoderMissingError(decoder_missing_message(f"{path}: {arch} has no decoder_pred"))
    if len(absent) == len(decoder):
        raise DecoderMissingError(decoder_missing_message(f"{path} ({weights.kind}) has no decoder.* weights"))
    if absent:
        detail = f"{path}: decoder weights not in the file: {abbrev(absent)}"
        raise DecoderMissingError(decoder_missing_message(detail))
    model.load_report = load_into(
        model, weights, arch, strict=weights.format == "openmae", allow_partial=allow_partial
    )
    require_decoder(model, source=str(path))
    return model


def checkpoint_normalization(path: str | os.PathLike) -> tuple[list[float], list[float]] | None:
    """The per-channel mean/std a checkpoint's model was trained with, when its run recorded them.

    Reads the resolved run config's ``data`` section: a training checkpoint carries it in its
    metadata; an exported model has it in its run folder's ``config.yaml``. With null
    ``mean``/``std``, the defaults of the dataset ``name`` (fashion-mnist, digits, folder). None
    when neither records it.
    """
    try:
        file = resolve_weights_file(path)
    except (OSError, ValueError):
        return None
    config = training_config(file) if file.suffix == ".safetensors" else None
    run_config = file.parent / "config.yaml"
    if config is None and run_config.is_file():
        try:
            config = yaml.safe_load(run_config.read_text())
        except (OSError, yaml.YAMLError):
            config = None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return None
    mean, std = _floats(data.get("mean")), _floats(data.get("std"))
    if mean is not None and std is not None:
        return mean, std
    if data.get("name") in DATASET_NORMALIZATION:
        mean, std = DATASET_NORMALIZATION[data["name"]]
        return list(mean), list(std)
    return None


def _floats(value: Any) -> list[float] | None:
    """A per-channel list of numbers (one number counts as one channel), else None."""
    values = [value] if isinstance(value, (int, float)) else value
    numbers = isinstance(values, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)
    if numbers and values:
        return [float(x) for x in values]
    return None


# -- normalisation ----------------------------------------------------------------------------


def _channel_stats(values: Sequence[float] | Tensor | None, channels: int, like: Tensor, name: str) -> Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values for {channels}-channel images")
    return t.reshape(1, channels, 1, 1)


def normalize(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Pixel space (N, C, H, W) in [0, 1] -> the pipeline's space ``(x - mean_c) / std_c``. None: unchanged."""
    c = images.shape[1]
    m, s = _channel_stats(mean, c, images, "mean"), _channel_stats(std, c, images, "std")
    images = images if m is None else images - m
    return images if s is None else images / s


def denormalize(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Inverse of :func:`normalize`: ``x * std_c + mean_c`` on (N, C, H, W). None: unchanged. No clamping."""
    c = images.shape[1]
    m, s = _channel_stats(mean, c, images, "mean"), _channel_stats(std, c, images, "std")
    images = images if s is None else images * s
    return images if m is None else images + m


def patch_normalize(patches: Tensor, eps: float = PATCH_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """The norm-pix target: each patch normalised by its own mean and (unbiased) variance.

    patches: (N, L, P) -> (normalised (N, L, P), mean (N, L, 1), var (N, L, 1)).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as the training target
    return (patches - mean) / (var + eps) ** 0.5, mean, var


def unnormalize_patches(
    pred: Tensor, patches: Tensor, mask: Tensor, mode: str = "visible", eps: float = PATCH_EPS
) -> Tensor:
    """Map norm-pix predictions back to the input's (pipeline-normalised) space.

    Args:
        pred: (N, L, P) predicted patches, each normalised by its own mean/std.
        patches: (N, L, P) the input patches (``model.patchify(images)``); only visible ones are read.
        mask: (N, L), 1/True = removed.
        mode: ``"visible"``: visible patches with their own mean/var (an exact inverse of the target
            there), removed patches with the average per-patch mean and variance of the image's
            visible patches. ``"dataset"`` / ``"none"``: ``pred`` unchanged (mean 0, std 1 per patch
            in normalised space; the caller maps it to pixels or to the normalised view).
    Returns:
        (N, L, P).
    """
    if mode not in UNNORMALIZE_MODES:
        raise ValueError(f"unnormalize must be one of {', '.join(UNNORMALIZE_MODES)}, got {mode!r}")
    if mode != "visible":
        return pred
    _, mean, var = patch_normalize(patches.float(), eps)
    visible = (~mask.bool()).unsqueeze(-1).to(mean.dtype)  # (N, L, 1)
    count = visible.sum(dim=1, keepdim=True).clamp_min(1.0)  # (N, 1, 1)
    typical_mean = (mean * visible).sum(dim=1, keepdim=True) / count
    typical_var = (var * visible).sum(dim=1, keepdim=True) / count
    mean = torch.where(visible.bool(), mean, typical_mean)
    var = torch.where(visible.bool(), var, typical_var)
    return pred.float() * (var + eps) ** 0.5 + mean


# -- reconstruction ---------------------------------------------------------------------------


@dataclass
class Reconstruction:
    """The panels of a reconstruction figure, display-ready.

    Attributes:
        panels: (N, R, 4, C, H, W) float in [0, 1]: for each image and mask ratio, the panels named
            by :data:`PANELS` (original, masked, reconstruction, reconstruction + visible). Pixel
            space, except in mode ``"none"`` (the normalised view, see the module docstring).
        mask: (N, R, L) bool, True = removed.
        mask_ratios: the R requested ratios (for ``grid`` masks: the fraction removed).
        mask_type: random, block or grid.
        mode: pixels, visible, dataset or none: how predictions were un-normalised.
        description: the sentence the figure shows for ``mode``.
        seed: the seed the masks were drawn with.
    """

    panels: Tensor
    mask: Tensor
    mask_ratios: tuple[float, ...]
    mask_type: str
    mode: str
    description: str
    seed: int

    def panel(self, name: str) -> Tensor:
        """One panel for all images and ratios: (N, R, C, H, W)."""
        if name not in PANELS:
            raise KeyError(f"unknown panel {name!r}; panels are {', '.join(PANELS)}")
        return self.panels[:, :, PANELS.index(name)]

    def as_dict(self) -> dict[str, Tensor]:
        """``{panel name: (N, R, C, H, W)}``."""
        return {name: self.panel(name) for name in PANELS}

    def numpy(self) -> np.ndarray:
        """(N, R, 4, H, W, C) float32 in [0, 1], ready for ``plt.imshow``."""
        return self.panels.permute(0, 1, 2, 4, 5, 3).numpy().astype(np.float32)

    def select_bands(self, bands: Sequence[int] | None = None, stretch: bool | None = None) -> Reconstruction:
        """The panels with only the channels a figure can show: ``bands`` (1 or 3 indices, 0-based, shown
        as gray or as R, G, B; default :func:`display_bands`), for images of any channel count.

        ``stretch`` (default: for images other than 1 or 3 channels) maps each shown band of an image
        linearly from its 2nd..98th percentile in the original panel to 0..1, the same for all of the
        image's panels: multi-band data (16-bit reflectances, say) often fills a small part of [0, 1].
        Not applied to the normalised view (mode ``"none"``).
        """
        channels = self.panels.shape[3]
        chosen = display_bands(channels, bands)
        if stretch is None:
            stretch = channels not in (1, 3)
        panels = self.panels[:, :, :, list(chosen)]  # (N, R, 4, B, H, W)
        description = self.description
        if chosen != tuple(range(channels)):
            description += f"; bands {', '.join(map(str, chosen))} of {channels} shown" + (
                " as R, G, B" if len(chosen) == 3 else ""
            )
        if stretch and self.mode != "none":
            original = panels[:, 0, 0].flatten(2)  # (N, B, H*W): the first row's original image
            lo = original.quantile(0.02, dim=-1)[:, None, None, :, None, None]
            hi = original.quantile(0.98, dim=-1)[:, None, None, :, None, None]
            panels = ((panels - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
            removed = self.removed_pixels()[:, :, None]  # (N, R, 1, H, W): the grey stays grey
            panels[:, :, PANELS.index("masked")] = torch.where(removed, MASK_FILL, panels[:, :, PANELS.index("original")])
            description += "; each band stretched from its 2-98% range in the image to black..white"
        return dataclasses.replace(self, panels=panels, description=description)

    def removed_pixels(self) -> Tensor:
        """(N, R, H, W) bool, True where a removed patch lies (square patches tiling the image)."""
        n, r, length = self.mask.shape
        h, w = self.panels.shape[-2:]
        p = round((h * w / length) ** 0.5)
        grid = self.mask.reshape(n, r, h // p, w // p)
        return grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def row_label(self, ratio_index: int) -> str:
        if self.mask_type == "grid":
            return f"grid mask ({self.mask_ratios[ratio_index]:.0%})"
        prefix = "block mask" if self.mask_type == "block" else "mask"
        return f"{prefix} {self.mask_ratios[ratio_index]:.0%}"


def display_bands(channels: int, bands: Sequence[int] | None = None) -> tuple[int, ...]:
    """The channels a figure of ``channels``-channel images shows: ``bands`` checked (1 or 3 indices in
    0..channels-1), else all of a 1- or 3-channel image, the first three bands of a multi-band one, or the
    first band alone when there are two. Raises ValueError naming the valid range."""
    if bands is None:
        return tuple(range(channels)) if channels in (1, 3) else ((0, 1, 2) if channels > 3 else (0,))
    bands = tuple(int(b) for b in bands)
    if len(bands) not in (1, 3):
        raise ValueError(f"show 1 band (gray) or 3 (R G B), not {len(bands)}: {' '.join(map(str, bands))}")
    outside = [b for b in bands if not 0 <= b < channels]
    if outside:
        raise ValueError(
            f"band {' '.join(map(str, outside))} out of range: the images have {channels} band"
            f"{'' if channels == 1 else 's'}, numbered 0 to {channels - 1}"
        )
    return bands


def _ratios(mask_ratios: float | Sequence[float], mask_type: str) -> tuple[float, ...]:
    ratios = (float(mask_ratios),) if isinstance(mask_ratios, (int, float)) else tuple(float(r) for r in mask_ratios)
    if not ratios:
        raise ValueError("give at least one mask ratio")
    for r in ratios:
        check_mask_ratio(r)
    if mask_type == "grid" and len(ratios) > 1:
        warnings.warn("grid masks always remove 3 of every 4 patches; the mask ratios are ignored", stacklevel=3)
        ratios = ratios[:1]
    return ratios


def reconstruct(
    model: nn.Module,
    images: Tensor,
    mask_ratios: float | Sequence[float] = (0.75,),
    mask_type: str = "random",
    seed: int = 0,
    unnormalize: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Reconstruction:
    """Mask, reconstruct and lay out the panels of a batch of images, once per mask ratio.

    The same ``seed`` gives the same masks and panels; the global RNG is left alone (the masks are
    drawn from a private CPU generator). Random masks share one noise draw across ratios, so they
    are nested: the patches visible at 95% are also visible at 75%. The model is run in eval mode
    (restored afterwards) in fp32 on its own device.

    Args:
        model: an MAE-style model with its decoder (see the module docstring for the interface).
        images: (N, C, H, W) as the data pipeline feeds the model, i.e. normalised with ``mean``/``std``.
        mask_ratios: one ratio or several; each gives one row per image.
        mask_type: random, block or grid (grid ignores the ratio: it removes 3 of every 4 patches).
        seed: seeds the masks.
        unnormalize: auto, head, visible, dataset or none; how to show norm-pix predictions (module docstring).
            Ignored for models trained on raw pixels.
        mean, std: the pipeline's per-channel normalisation, to show images in pixel space; None if
            ``images`` are already pixels in [0, 1].
    Returns:
        A :class:`Reconstruction` with (N, R, 4, C, H, W) panels in [0, 1].
    """
    model = unwrap(model)
    require_decoder(model)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
    if unnormalize not in UNNORMALIZE_MODES:
        raise ValueError(f"unnormalize must be one of {', '.join(UNNORMALIZE_MODES)}, got {unnormalize!r}")
    ratios = _ratios(mask_ratios, mask_type)
    length = model.num_patches
    for ratio in ratios:
        if mask_type != "grid" and num_kept(length, ratio) < 1:
            raise ValueError(f"mask ratio {ratio} keeps none of the model's {length} patches; use a lower ratio")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    has_head = getattr(model, "pixel_head", False)
    if unnormalize == "auto":
        unnormalize = "head" if has_head else "visible"
    if unnormalize == "head" and not has_head:
        raise ValueError(
            f"{type(model).__name__} has no pixel head to show; pick --unnormalize visible, dataset or none, "
            "or pretrain with --model.kwargs \"{pixel_head: true}\""
        )
    mode = unnormalize if model.norm_pix_loss or unnormalize == "head" else "pixels"
    images = images.detach().float().cpu()
    n = images.shape[0]
    device = next(model.parameters()).device

    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.rand(n, length, generator=generator)  # one draw for all ratios: nested masks
    rows, masks, removed = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ratio in ratios:
                if mask_type == "random":
                    given = {"noise": noise.to(device)}
                else:
                    given = {"mask": sample_mask(mask_type, n, to_2tuple(model.grid_size), ratio, generator).to(device)}
                out = model(images.to(device), ratio, **given)
                mask = out.mask.detach().bool().cpu()  # (N, L)
                pred = out.pixel_pred if mode == "head" else out.pred  # the head reads out pixels
                rows.append(_panels(model, images, pred.detach().float().cpu(), mask, mode, mean, std))
                masks.append(mask)
                removed.append(mask.float().mean().item())
    finally:
        model.train(was_training)
    if mask_type == "grid":
        ratios = (removed[0],)
    return Reconstruction(
        panels=torch.stack(rows, dim=1),  # (N, R, 4, C, H, W)
        mask=torch.stack(masks, dim=1),  # (N, R, L)
        mask_ratios=ratios,
        mask_type=mask_type,
        mode=mode,
        description=_MODE_TEXT[mode],
        seed=int(seed),
    )


def _panels(
    model: nn.Module,
    images: Tensor,
    pred: Tensor,
    mask: Tensor,
    mode: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Tensor:
    """(N, 4, C, H, W) in [0, 1]; images (N, C, H, W) normalised, pred (N, L, P), mask (N, L) True = removed."""
    patches = model.patchify(images)  # (N, L, P), the pipeline's normalised space
    if mode == "none":  # everything in the per-patch normalised view
        normed, _, _ = patch_normalize(patches)
        original = 0.5 + model.unpatchify(normed) / 4.0
        recon = 0.5 + model.unpatchify(pred) / 4.0
    else:
        original = denormalize(images, mean, std)
        if mode == "visible":
            pred = unnormalize_patches(pred, patches, mask, "visible")
        recon = denormalize(model.unpatchify(pred), mean, std)  # "dataset": pred as mean 0 / std 1
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand_as(patches).contiguous()) > 0.5  # (N, C, H, W)
    masked = torch.where(removed, torch.full_like(original, MASK_FILL), original)
    pasted = torch.where(removed, recon, original)
    return torch.stack([original, masked, recon, pasted], dim=1).clamp(0.0, 1.0)


# -- images from disk -------------------------------------------------------------------------


def read_image(path: str | os.PathLike, channels: int, size: int | tuple[int, int]) -> Tensor:
    """Read an image (openmae.data's decoder) as (C, H, W) float pixels on the [0, 1] scale: shorter
    side resized (bicubic), centre-cropped. ``channels`` 1 converts to grayscale, 3 to RGB; other
    counts read multi-band .tif/.tiff/.npy files holding that many bands."""
    try:
        image = decode_image(path, channels)  # uint8 (C, H, W); float32 for multi-band data beyond 8 bits
    except BadImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return resize_center_crop(image, size)
