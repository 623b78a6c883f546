"""Patches and fixed position embeddings.

Layout (shared with the official MAE code and Hugging Face ViTMAE, which pretrained weights rely on):
patch (h, w) holds pixels ``[h*p:(h+1)*p, w*p:(w+1)*p]`` flattened in (row, col, channel) order, and
tokens are row-major (index = h * W + w).
"""

from __future__ import annotations

import torch
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
