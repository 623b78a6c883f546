"""Figures: reconstruction panels laid out as in the MAE paper (Figures 2-4), and training curves.

:mod:`openmae.reconstruction` computes the panels; this module only draws them (matplotlib, no
pyplot state) and writes PNGs atomically.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from torch import Tensor

from openmae.io import atomic_write, unwrap
from openmae.reconstruction import PANELS, Reconstruction, reconstruct

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
    exactly :func:`figure_size` and drawing costs little. Panels of other than 1 or 3 channels are
    shown as their default composite (:meth:`Reconstruction.select_bands`); pick bands with it first.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch

    if rec.panels.shape[3] not in (1, 3):
        rec = rec.select_bands()

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
    unnormalize: str = "auto",
    tag: str = "reconstructions",
    bands: Sequence[int] | None = None,
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
        bands: the 1 or 3 channels to show (0-based; see :meth:`Reconstruction.select_bands`); default:
            all of 1- or 3-channel images, the first three bands of multi-band ones.
    Returns:
        The PNG path.
    """
    model = unwrap(model)
    mask_type = mask_type or getattr(model, "mask_type", "random")
    rec = reconstruct(model, images, mask_ratios, mask_type, seed, unnormalize, mean, std)
    if bands is not None or rec.panels.shape[3] not in (1, 3):
        rec = rec.select_bands(bands)
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
