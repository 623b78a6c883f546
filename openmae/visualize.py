"""Reconstruction figures and training curves: see what the model sees.

The panels of the MAE paper (Figures 2-4): the original, the masked input, the reconstruction and the
reconstruction with the visible patches pasted back, for one or several mask ratios.

Norm-pix models predict every patch normalised by its *own* mean and variance, which are unknown for
a removed patch at inference. :func:`reconstruct` never hides that; ``unnormalize`` picks how to show
the prediction, and the figure says which:

- ``"visible"`` (default): a visible patch is un-normalised with its own statistics (known: it is in
  the input); a removed patch with the image's typical patch statistics, i.e. the average per-patch
  mean and the average per-patch variance of the visible patches of that image.
- ``"dataset"``: the dataset statistics only. Every predicted patch is taken as a patch of mean 0 and
  std 1 in the data pipeline's normalised space (the dataset's average patch), then mapped to pixels
  with the pipeline's per-channel mean/std: ``pixel = pred * std_c + mean_c``.
- ``"none"``: the normalised view. Every panel (the original too) is shown per-patch normalised,
  ``(x - mean) / std`` of each patch, with -2..+2 std mapped to black..white.

Models trained on raw pixels (``norm_pix_loss=False``) need none of this; their mode is ``"pixels"``.

Everything here uses only the MAE model interface (``forward(images, mask_ratio, noise=, mask=)`` ->
``MAEOutput``, ``patchify`` / ``unpatchify``, ``norm_pix_loss``, ``grid_size``, ``num_patches``,
``in_chans``, ``img_size``, ``patch_size``), so it works for any model in the registry.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from openmae.checkpoint import atomic_write, unwrap
from openmae.data import DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from openmae.data import load_image as read_image
from openmae.masking import MASK_TYPES, check_mask_ratio, num_kept, sample_mask
from openmae.patches import to_2tuple

UNNORMALIZE_MODES = ("visible", "dataset", "none")
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
MASK_FILL = 0.5  # removed patches are shown mid-grey, as in the paper's figures
PATCH_EPS = 1.0e-6  # the norm-pix target's epsilon: (x - mean) / sqrt(var + eps)

_DATASET_NORMALIZATION = {
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "folder": (IMAGENET_MEAN, IMAGENET_STD),
}

_MODE_TEXT = {
    "pixels": "pixel target: the prediction is shown as it is",
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


def load_reconstruction_model(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """``openmae.load_pretrained(path)``, refusing encoder-only checkpoints with a clear message.

    Raises:
        DecoderMissingError: the file has no decoder weights, or the loaded model has no decoder.
    """
    from openmae.checkpoint import load_pretrained

    keys = _safetensors_keys(path)
    if keys is not None and not any(k.removeprefix("model/").startswith("decoder") for k in keys):
        raise DecoderMissingError(decoder_missing_message(f"{path} has no decoder.* weights"))
    try:
        model = load_pretrained(path, **overrides)
    except ValueError as e:  # a loader that names the missing decoder keys
        if "missing" in str(e) and "decoder" in str(e):
            raise DecoderMissingError(decoder_missing_message(f"{path}: {e}")) from None
        raise
    require_decoder(model, source=str(path))
    return model


def _safetensors_keys(path: str | os.PathLike) -> list[str] | None:
    """Tensor names of an openmae safetensors checkpoint (file or directory), or None for other formats."""
    from safetensors import safe_open

    from openmae.checkpoint import resolve_weights_file

    try:
        file = resolve_weights_file(path)
        if file.suffix != ".safetensors":
            return None
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (OSError, ValueError, RuntimeError):
        return None  # let the loader report it


def checkpoint_normalization(path: str | os.PathLike) -> tuple[list[float], list[float]] | None:
    """The per-channel mean/std a checkpoint's model was trained with, if its metadata records them.

    Looks through the JSON metadata of a safetensors checkpoint for a ``data`` (or
    ``normalization``) object with non-null ``mean`` and ``std``, e.g. a training checkpoint's
    ``{"training": {"config": {"data": {"mean": [...], "std": [...]}}}}``; with null ``mean``/``std``
    the defaults of its dataset ``name`` (fashion-mnist, digits, folder). None when absent.
    """
    from safetensors import safe_open

    from openmae.checkpoint import resolve_weights_file

    try:
        file = resolve_weights_file(path)
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError, RuntimeError):
        return None
    for value in meta.values():
        try:
            found = _find_mean_std(json.loads(value))
        except (json.JSONDecodeError, TypeError):
            continue
        if found is not None:
            return found
    return None


def _find_mean_std(obj: Any) -> tuple[list[float], list[float]] | None:
    def as_list(v: Any) -> list[float] | None:
        if _number(v) is not None:
            return [float(v)]
        if isinstance(v, list) and v and all(_number(x) is not None for x in v):
            return [float(x) for x in v]
        return None

    if isinstance(obj, dict):
        for key in ("data", "normalization"):
            entry = obj.get(key)
            if isinstance(entry, dict):
                mean, std = as_list(entry.get("mean")), as_list(entry.get("std"))
                if mean is not None and std is not None:
                    return mean, std
                if entry.get("name") in _DATASET_NORMALIZATION:
                    mean, std = _DATASET_NORMALIZATION[entry["name"]]
                    return list(mean), list(std)
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _find_mean_std(child)
        if found is not None:
            return found
    return None


# -- normalisation ----------------------------------------------------------------------------


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data pipeline's defaults: Fashion-MNIST for 1 channel, ImageNet for 3."""
    if channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"no default normalisation for {channels}-channel images; pass mean and std")


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

    def row_label(self, ratio_index: int) -> str:
        if self.mask_type == "grid":
            return f"grid mask ({self.mask_ratios[ratio_index]:.0%})"
        prefix = "block mask" if self.mask_type == "block" else "mask"
        return f"{prefix} {self.mask_ratios[ratio_index]:.0%}"


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
    unnormalize: str = "visible",
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
        unnormalize: visible, dataset or none; how to show norm-pix predictions (module docstring).
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
    mode = unnormalize if model.norm_pix_loss else "pixels"
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
                rows.append(_panels(model, images, out.pred.detach().float().cpu(), mask, mode, mean, std))
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


# -- figures ----------------------------------------------------------------------------------

PANEL_INCHES = 2.0
LABEL_INCHES = 0.4  # left margin for the row labels
HEADER_INCHES = 0.8  # top margin for the description and column titles
DPI = 100


def figure_size(
    rows: int, cols: int = len(PANELS), panel_inches: float = PANEL_INCHES, dpi: int = DPI
) -> tuple[int, int]:
    """(width, height) in pixels of a :func:`save_figure` PNG with ``rows`` image x ratio rows."""
    width = (LABEL_INCHES + cols * panel_inches) * dpi
    height = (HEADER_INCHES + rows * panel_inches) * dpi
    return int(round(width)), int(round(height))


def render_figure(
    rec: Reconstruction,
    titles: Sequence[str] | None = None,
    heading: str | None = None,
    panel_inches: float = PANEL_INCHES,
    dpi: int = DPI,
):
    """A matplotlib ``Figure``: one row per image x mask ratio, one column per panel.

    The panels are resized to whole pixels (nearest-neighbour when enlarging, so patches stay
    sharp) and drawn as one image with ``figimage``; no axes, no tight layout, so the size is
    exactly :func:`figure_size` and drawing costs little.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch

    n, r, cols = rec.panels.shape[:3]
    titles = list(titles) if titles is not None else [f"image {i + 1}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    rows = n * r
    width_in = LABEL_INCHES + cols * panel_inches
    height_in = HEADER_INCHES + rows * panel_inches
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    chars = max(40, int(width_in * 72 / 4.2))  # ~4 pt per character at 7 pt
    lines = ([_shorten(heading, chars)] if heading else []) + textwrap.wrap(rec.description, chars)
    fig.text(0.5, 1 - 0.06 / height_in, "\n".join(lines), ha="center", va="top", fontsize=7)
    for col, name in enumerate(PANELS):
        x = (LABEL_INCHES + (col + 0.5) * panel_inches) / width_in
        fig.text(x, 1 - (HEADER_INCHES - 0.06) / height_in, name, ha="center", va="bottom", fontsize=9)
    for i in range(n):
        for j in range(r):
            y = 1 - (HEADER_INCHES + (i * r + j + 0.5) * panel_inches) / height_in
            label = f"{_shorten(titles[i], 28)}\n{rec.row_label(j)}"
            fig.text(LABEL_INCHES / 2 / width_in, y, label, ha="center", va="center", rotation=90, fontsize=7)
    fig.figimage(_mosaic(rec, round(panel_inches * dpi)), xo=round(LABEL_INCHES * dpi), yo=0, origin="upper")
    return fig


def _mosaic(rec: Reconstruction, cell: int) -> np.ndarray:
    """All panels on a white (rows * cell, cols * cell, 3) uint8 canvas, each fitted into its cell."""
    from PIL import Image

    n, r, cols = rec.panels.shape[:3]
    side = cell - 2 * max(1, round(0.04 * cell))  # a white margin around each panel
    canvas = np.full((n * r * cell, cols * cell, 3), 255, dtype=np.uint8)
    panels = (rec.numpy() * 255.0).round().astype(np.uint8)  # (N, R, 4, H, W, C)
    h, w = panels.shape[3:5]
    scale = side / max(h, w)
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    for i in range(n):
        for j in range(r):
            for col in range(cols):
                img = panels[i, j, col]
                img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
                img = np.asarray(Image.fromarray(img).resize((pw, ph), resample))
                top = (i * r + j) * cell + (cell - ph) // 2
                left = col * cell + (cell - pw) // 2
                canvas[top : top + ph, left : left + pw] = img
    return canvas


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_figure(
    rec: Reconstruction,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    heading: str | None = None,
    panel_inches: float = PANEL_INCHES,
    dpi: int = DPI,
) -> Path:
    """Write the reconstruction figure as a PNG of :func:`figure_size` pixels (atomically).

    Args:
        rec: from :func:`reconstruct`.
        path: the PNG to write.
        titles: one name per image (default ``image 1`` ...), shown with the mask ratio on each row.
        heading: an extra first line (e.g. the model and checkpoint).
    """
    fig = render_figure(rec, titles, heading, panel_inches, dpi)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib ``Figure`` to an (H, W, 3) uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_reconstructions(
    model: nn.Module,
    images: Tensor,
    writer: Any | None,
    out_dir: str | os.PathLike,
    epoch: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    mask_ratios: float | Sequence[float] = (0.75,),
    mask_type: str | None = None,
    seed: int = 0,
    unnormalize: str = "visible",
    tag: str = "reconstructions",
) -> Path:
    """Reconstruct a fixed batch during training: ``out_dir/reconstructions/epoch_XXXX.png`` + TensorBoard.

    Call on the main process with the same held-out ``images`` and ``seed`` every time, so the
    figures differ only by training. Runs in eval mode without gradients and restores the mode.

    Args:
        model: the model being trained (DDP / compile wrappers are unwrapped).
        images: (N, C, H, W) normalised as the loader yields them (a handful: each is a figure row).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` or None; gets the figure as image ``tag``
            at step ``epoch``.
        out_dir: the run's output directory.
        epoch: names the file (``epoch_0005.png``) and is the TensorBoard step.
        mean, std: the pipeline's per-channel normalisation.
        mask_type: default: the model's own ``mask_type`` (random if it has none).
    Returns:
        The PNG path.
    """
    model = unwrap(model)
    mask_type = mask_type or getattr(model, "mask_type", "random")
    rec = reconstruct(model, images, mask_ratios, mask_type, seed, unnormalize, mean, std)
    fig = render_figure(rec, heading=f"epoch {epoch}")
    path = Path(out_dir) / "reconstructions" / f"epoch_{int(epoch):04d}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    if writer is not None:
        writer.add_image(tag, figure_to_array(fig), global_step=int(epoch), dataformats="HWC")
    return path


# -- training curves --------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse ``metrics.jsonl``: (step records, epoch-end records), in training order.

    Lines that are not JSON objects (a line cut short by a crash) are skipped. A step that is not
    larger than the previous one means the run was resumed from an earlier checkpoint: the records
    it replays are dropped, so the last run's values win. Epoch-end records get ``_step``: their own
    ``step``, else that of the last step record before them.
    """
    steps: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if "epoch_end" in record:
                own = _number(record.get("step"))
                epochs.append({**record, "_step": own if own is not None else (steps[-1]["step"] if steps else None)})
                continue
            step = _number(record.get("step"))
            if step is None:
                continue
            if steps and step <= steps[-1]["step"]:  # resumed: forget what is replayed
                steps = [s for s in steps if s["step"] < step]
                epochs = [e for e in epochs if e["_step"] is None or e["_step"] < step]
            steps.append(record)
    return steps, epochs


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot training loss against step (and the learning rate on a second axis) as a PNG.

    Reads the engine's ``metrics.jsonl``: step records (``step``, ``loss``, ``lr``, ...) and
    epoch-end records (``epoch_end``, ``loss``), drawn as dots at the epoch's last step. Missing or
    non-finite values are skipped (the figure counts them); with no step records, epoch-end losses
    are plotted against the epoch.
    """
    from matplotlib.figure import Figure

    steps, epochs = read_metrics(metrics_path)
    fig = Figure(figsize=(8.0, 4.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    skipped = 0

    def series(records: list[dict[str, Any]], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
        nonlocal skipped
        xs, ys = [], []
        for rec in records:
            x, y = _number(rec.get(xkey)), _number(rec.get(ykey))
            if ykey in rec and (y is None or not math.isfinite(y)):
                skipped += 1
            if x is not None and y is not None and math.isfinite(y):
                xs.append(x)
                ys.append(y)
        return xs, ys

    handles = []
    if steps:
        ax.set_xlabel("step")
        handles += ax.plot(*series(steps, "step", "loss"), lw=1.0, color="tab:blue", label="loss")
        ex, ey = series(epochs, "_step", "loss")
    else:
        ax.set_xlabel("epoch")
        ex, ey = series(epochs, "epoch_end", "loss")
    if ex:
        handles += ax.plot(ex, ey, "o", ms=4, color="tab:orange", label="epoch mean loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lx, ly = series(steps, "step", "lr")
    if lx:
        ax2 = ax.twinx()
        handles += ax2.plot(lx, ly, "--", lw=1.0, color="tab:green", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss values logged yet", transform=ax.transAxes, ha="center", va="center")
    heading = title or f"training loss: {Path(metrics_path).parent.name or Path(metrics_path).name}"
    if skipped:
        heading += f" ({skipped} missing or non-finite values skipped)"
    ax.set_title(heading, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.88, top=0.9, bottom=0.12)
    png_path = Path(png_path)
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return png_path


# -- images from disk -------------------------------------------------------------------------


def list_images(path: str | os.PathLike) -> list[Path]:
    """An image file, or the image files directly in a folder (sorted by name)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image or folder: {path}")
    if path.is_file():
        return [path]
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not found:
        raise FileNotFoundError(f"no image files in {path}")
    return found


def load_image(path: str | os.PathLike, channels: int, size: int | tuple[int, int]) -> Tensor:
    """Read an image as (C, H, W) float pixels in [0, 1]: shorter side resized (bicubic), centre-cropped.

    ``channels`` 1 converts to grayscale, 3 to RGB (odd modes as the data pipeline converts them).
    """
    from torchvision.transforms.v2 import functional as TF

    if channels not in (1, 3):
        raise ValueError(f"can read images as 1 or 3 channels, not {channels}")
    image = read_image(path, channels)  # uint8 (C, H, W), None when unreadable
    if image is None:
        raise ValueError(f"cannot read image {path}: the file is corrupt or not an image")
    th, tw = to_2tuple(size)
    h, w = image.shape[-2:]
    scale = max(th / h, tw / w)  # cover the target, then crop the middle
    image = TF.resize(image, [max(th, round(h * scale)), max(tw, round(w * scale))],
                      interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(image, [th, tw]).float() / 255.0
