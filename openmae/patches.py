"""Patches and fixed position embeddings.

Layout (shared with the official MAE code and Hugging Face ViTMAE, which pretrained weights rely on):
patch (h, w) holds pixels ``[h*p:(h+1)*p, w*p:(w+1)*p]`` flattened in (row, col, channel) order, and
tokens are row-major (index = h * W + w).

Position tables on another grid (fine-tuning or dense prediction at another resolution than
pretraining): :func:`resample_pos_embed` recomputes a fixed sin-cos table exactly and resamples a
learned one bicubically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair (H, W), got {x!r}")
    return (int(x[0]), int(x[1]))


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images into flattened patches.

    Args:
        images: (N, C, H, W), H and W divisible by ``patch_size``.
    Returns:
        (N, L, p*p*C) with L = (H/p) * (W/p), each patch in (row, col, channel) order.
    """
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(n, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, gh, gw, p, p, C)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: (N, L, p*p*C) with L = gh * gw.
        grid_size: (gh, gw), patches per column and per row.
    Returns:
        (N, C, gh*p, gw*p).
    """
    n, length, dim = patches.shape
    p = patch_size
    gh, gw = grid_size
    if length != gh * gw or dim != p * p * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {gh}x{gw} grid of "
            f"{p}x{p}x{channels} patches"
        )
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, gh, p, gw, p)
    return x.reshape(n, channels, gh * p, gw * p)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) as [sin | cos] with omega_i = 1 / 10000^(i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> Tensor:
    """Fixed 2D sin-cos position embedding for a (gh, gw) grid, in the official layout.

    Row-major tokens; the first half of ``dim`` encodes the column, the second half the row, each as
    [sin | cos]. With ``cls_token`` a zero row is prepended.

    Returns:
        (gh*gw [+1], dim) float32.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def is_sincos(grid_rows: Tensor, grid: tuple[int, int]) -> bool:
    """Whether (1, gh * gw, D) rows (no prefix rows) are the fixed 2D sin-cos table of ``grid``.

    The tolerance follows the dtype, so a table stored in half precision is still recognised.
    """
    dim = grid_rows.shape[-1]
    if not grid_rows.is_floating_point() or dim % 4 or dim == 0 or grid_rows.shape[-2] != grid[0] * grid[1]:
        return False
    atol = max(1e-5, 2 * torch.finfo(grid_rows.dtype).eps)
    ref = sincos_2d(dim, tuple(grid)).to(grid_rows.device)
    return torch.allclose(grid_rows.detach().reshape(ref.shape).float(), ref, atol=atol)


def resample_pos_embed(table: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], prefix: int) -> Tensor:
    """A position table for another grid.

    A fixed 2D sin-cos table (MAE, ConvMAE) is recomputed for the new grid, which is exact; any other
    (learned) table is resampled bicubically, as timm and the MAE fine-tuning code do. The ``prefix``
    leading rows (the cls token's) are kept as they are.

    Args:
        table: (1, prefix + gh * gw, D), rows row-major on ``src_grid``.
        src_grid, dst_grid: (gh, gw) token grids.
        prefix: rows before the grid (1 with a cls token, else 0).
    Returns:
        (1, prefix + gh' * gw', D), same dtype and device.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return table
    head, grid = table[:, :prefix], table[:, prefix:]
    dim = table.shape[-1]
    if grid.shape[1] != src_grid[0] * src_grid[1]:
        raise ValueError(
            f"the position table holds {grid.shape[1]} grid rows, not the {src_grid[0]}x{src_grid[1]} grid it was "
            "said to cover; pass the image size it was trained at"
        )
    if is_sincos(grid, src_grid):
        new = sincos_2d(dim, tuple(dst_grid)).unsqueeze(0).to(table)
    else:
        x = grid.reshape(1, *src_grid, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        # in float32: bicubic interpolation is not implemented for half precision on every device
        x = F.interpolate(x.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
        new = x.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)  # (1, gh' * gw', D)
    return torch.cat([head, new], dim=1)
