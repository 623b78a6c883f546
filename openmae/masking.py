"""Mask samplers. Convention everywhere: ``mask`` is (N, L) with 1/True = removed, as in MAE.

A mask becomes an order of tokens through ``ids_shuffle`` (kept tokens first) and its inverse
``ids_restore``. Random masking follows the reference exactly: ``ids_shuffle = argsort(noise)``
ascending, so small noise is kept and large noise is removed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

MASK_TYPES = ("random", "block", "grid")


class Masking(NamedTuple):
    mask: Tensor  # (N, L) float, 1 = removed
    ids_shuffle: Tensor  # (N, L) kept first
    ids_restore: Tensor  # (N, L) inverse permutation of ids_shuffle
    len_keep: int


def num_kept(length: int, mask_ratio: float) -> int:
    """How many of ``length`` patches a ratio keeps visible: ``int(length * (1 - mask_ratio))``, as
    the reference. Raises ValueError when that is 0 (the encoder would see no patch), naming the
    grid and the largest ratio that keeps one."""
    check_mask_ratio(mask_ratio)
    keep = int(length * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask ratio {mask_ratio} keeps none of the model's {length} patches (int({length} x (1 - {mask_ratio})) = "
            f"{keep}); use a ratio of at most {largest_mask_ratio(length)}"
        )
    return keep


def largest_mask_ratio(length: int, decimals: int = 3) -> float:
    """The largest ratio, rounded down to ``decimals``, that keeps at least one of ``length`` patches."""
    if length < 1:
        raise ValueError(f"a grid needs at least one patch, got {length}")
    step = 10**-decimals
    ratio = math.floor((1 - 1 / length) / step) * step
    while ratio > 0 and int(length * (1 - round(ratio, decimals))) < 1:  # float rounding at the edge
        ratio -= step
    return round(max(ratio, 0.0), decimals)


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}: at least one patch must stay visible")


def masking_from_noise(noise: Tensor, len_keep: int) -> Masking:
    """Reference random masking. noise: (N, L); the ``len_keep`` smallest values are kept."""
    n, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original token order
    return Masking(mask, ids_shuffle, ids_restore, len_keep)


def masking_from_mask(mask: Tensor) -> Masking:
    """Turn an explicit (N, L) mask (1/True = removed; the same count in every row) into an order.

    Kept tokens come first in their original (row-major) order.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (N, L), got shape {tuple(mask.shape)}")
    removed = mask.bool()
    counts = removed.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"every row of an explicit mask must remove the same number of patches (got {counts.tolist()}); "
            "batched encoding needs equal-length sequences"
        )
    length = mask.shape[1]
    len_keep = length - (int(counts[0]) if counts.numel() else 0)
    if len_keep < 1:
        raise ValueError("an explicit mask must keep at least one patch visible")
    ids_shuffle = torch.argsort(removed.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Masking(removed.float(), ids_shuffle, ids_restore, len_keep)


def random_mask(
    batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform random mask without replacement: (N, L) bool, exactly L - len_keep removed per row."""
    length = grid[0] * grid[1]
    noise = torch.rand(batch, length, generator=generator)
    return masking_from_noise(noise, num_kept(length, mask_ratio)).mask.bool()


def block_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    aspect: float = 0.3,
) -> Tensor:
    """BEiT-style block-wise mask: rectangles of random area and aspect ratio until the target count.

    Blocks are drawn with area in [min_block, remaining] and log-uniform aspect ratio in
    [aspect, 1/aspect]; when blocks stop fitting, random single patches top the count up so every row
    removes exactly L - len_keep patches (batched encoding needs equal lengths).

    Returns:
        (N, L) bool, True = removed.
    """
    gh, gw = grid
    length = gh * gw
    target = length - num_kept(length, mask_ratio)
    out = torch.zeros(batch, gh, gw, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def randint(lo: int, hi: int) -> int:  # inclusive lo, exclusive hi
        return int(torch.randint(lo, hi, (), generator=generator))

    for n in range(batch):
        m = out[n]
        count, failures = 0, 0
        while count < target and failures < 10:
            remaining = target - count
            area = uniform(min(min_block, remaining), remaining)
            ratio = math.exp(uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (1 <= h <= gh and 1 <= w <= gw):
                failures += 1
                continue
            top, left = randint(0, gh - h + 1), randint(0, gw - w + 1)
            patch = m[top : top + h, left : left + w]
            new = int((~patch).sum())
            if 0 < new <= remaining:
                patch.fill_(True)
                count += new
                failures = 0
            else:
                failures += 1
        if count < target:  # top up with random free patches
            free = (~m).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=generator)[: target - count]]
            m.view(-1)[pick] = True
    return out.reshape(batch, length)


def grid_mask(batch: int, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """Grid-wise mask (MAE Fig. 6): keep one of every 2x2 patches, remove the other three.

    The kept corner of each 2x2 cell is drawn once per batch, so every row removes the same count
    even for odd grids.

    Returns:
        (N, L) bool, True = removed.
    """
    gh, gw = grid
    dy, dx = (int(v) for v in torch.randint(0, 2, (2,), generator=generator))
    rows = torch.arange(gh).reshape(-1, 1)
    cols = torch.arange(gw).reshape(1, -1)
    keep = ((rows % 2) == dy) & ((cols % 2) == dx)
    if not keep.any():  # a 1-wide grid with the other offset: keep the first patch instead
        keep.view(-1)[0] = True
    return (~keep).flatten().unsqueeze(0).expand(batch, -1).clone()


def sample_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample an (N, L) bool mask (True = removed) by name: ``random``, ``block`` or ``grid``.

    ``grid`` ignores ``mask_ratio``: it always removes 3 of every 4 patches.
    """
    if kind == "random":
        return random_mask(batch, grid, mask_ratio, generator)
    if kind == "block":
        return block_mask(batch, grid, mask_ratio, generator)
    if kind == "grid":
        return grid_mask(batch, grid, generator)
    raise ValueError(f"unknown mask type {kind!r}; choose one of {', '.join(MASK_TYPES)}")
