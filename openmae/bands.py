"""Multi-band images: GeoTIFF/TIFF files (tifffile) and ``.npy`` arrays with any number of bands.

Satellite and medical images carry 4 to 13+ bands, often as 16-bit integers, which PIL cannot hold.
:func:`read_bands` reads one file to a (C, H, W) tensor; :func:`band_statistics` computes the
per-band mean and std that normalise them when a run does not give its own.

Scaling: integer data is mapped to [0, 1] by its dtype's range (uint8 / 255, uint16 / 65535,
int16 from -32768..32767, ...), so one file's values mean the same as another's whatever each holds;
floating-point data is kept as it is (it already has its own units) and must be finite. Multi-band
images travel as float32, 8-bit ones too, so that one dataset's samples always stack (a folder may mix
8- and 16-bit files); 1- and 3-channel arrays come back as uint8 like every other such image.

Which axis holds the bands is decided by the band count the run expects: a (H, W, C) or (C, H, W)
array whose first or last axis has C entries. An array where both do (C, C, C) is refused, as is one
where neither does, with its shape in the message. TIFFs with both are read as the file's own axes
say (``YXS``: bands last).

This module reads files; it knows nothing of datasets. openmae.data calls :func:`read_bands` from
its one decoder when :func:`is_band_file` says so, and turns :class:`BandFileError` into a bad image.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TIFF_SUFFIXES = (".tif", ".tiff")
NPY_SUFFIX = ".npy"
BAND_SUFFIXES = (*TIFF_SUFFIXES, NPY_SUFFIX)
STATS_IMAGES = 256  # a seeded sample of the training files: enough for per-band moments, under a second for small tiles
STATS_SEED = 0  # fixed: every split, command and rank of one dataset computes the same statistics
MIN_STD = 1e-6  # a band constant over the sample is only centred (std 1), not divided by ~0


class BandFileError(ValueError):
    """A file that cannot be read as a multi-band image; the message says why (without the path)."""


def is_band_file(path: str | os.PathLike, channels: int) -> bool:
    """Whether :func:`read_bands` reads ``path``: every ``.npy`` file, and every file of a run whose band
    count PIL cannot give (``channels`` other than 1 or 3). 1- and 3-channel TIFFs stay with PIL."""
    return Path(path).suffix.lower() == NPY_SUFFIX or channels not in (1, 3)


def read_bands(path: str | os.PathLike, channels: int, max_pixels: int | None = None) -> Tensor:
    """Read a ``.tif``/``.tiff``/``.npy`` file as a (channels, H, W) tensor.

    Args:
        path: the file.
        channels: the band count the run expects (``data.channels``); it also picks the band axis.
        max_pixels: refuse an image of more than this many pixels (H x W), before reading its data.

    Returns:
        float32 (C, H, W): integers scaled to [0, 1] by their dtype's range, floats as stored.
        1- and 3-channel ``.npy`` arrays come back as uint8 like every other 1- or 3-channel image
        (floats clipped to [0, 1] first), so the PIL-based evaluation transforms take them.

    Raises:
        BandFileError: not a band file, unreadable, another band count, too large, non-finite values.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in BAND_SUFFIXES:
        raise BandFileError(
            f"a {suffix or 'suffix-less'} file holds 1 or 3 channels, but data.channels is {channels}: multi-band "
            f"images must be {', '.join(BAND_SUFFIXES)} files"
        )
    try:
        if suffix == NPY_SUFFIX:
            array = _read_npy(path, channels, max_pixels)
        else:
            array = _read_tiff(path, channels, max_pixels)
    except BandFileError:
        raise
    except FileNotFoundError:
        raise BandFileError("file not found: deleted, or a broken link") from None
    except PermissionError:
        raise BandFileError("permission denied") from None
    except Exception as e:  # noqa: BLE001 -- numpy and tifffile raise ValueError, OSError, KeyError, struct.error, ...
        raise BandFileError(f"cannot be decoded: {_one_line(e)}") from None
    return _to_tensor(array, channels)


# -- readers -----------------------------------------------------------------------------------


def _read_npy(path: str | os.PathLike, channels: int, max_pixels: int | None) -> np.ndarray:
    """(C, H, W) array of a .npy file; only its header is read before the shape checks (memory map)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():  # an object array: never unpickled
            raise BandFileError("holds Python objects (a pickled array), not numbers; save a numeric array") from None
        raise
    return _bands_first(array, _bands_last(array.shape, channels, max_pixels, tiff_axes=None))


def _read_tiff(path: str | os.PathLike, channels: int, max_pixels: int | None) -> np.ndarray:
    """(C, H, W) array of the first image series of a TIFF; its shape is checked before any pixel is read."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise BandFileError("a TIFF without an image")
        series = tif.series[0]
        last = _bands_last(tuple(series.shape), channels, max_pixels, series.axes)
        try:
            array = series.asarray()
        except ValueError as e:
            if "imagecodecs" in str(e):
                raise BandFileError(f"its compression needs the imagecodecs package: pip install imagecodecs ({e})") from None
            raise
    return _bands_first(array, last)


def _bands_first(array: np.ndarray, last: bool) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) -> (C, H, W) when ``last``; an owned, contiguous copy in memory
    (not a view of a memory-mapped file)."""
    array = array.reshape(1, *array.shape) if array.ndim == 2 else array
    return np.array(array.transpose(2, 0, 1) if last else array, order="C", copy=True)


def _bands_last(shape: tuple[int, ...], channels: int, max_pixels: int | None, tiff_axes: str | None) -> bool:
    """Whether an array of ``shape`` holds its bands on its last axis (else first, or a 2-D single band).

    A 3-D array has its bands on the axis of length ``channels``, first or last; when both are, a
    TIFF's own axes decide (``...S``: samples of a pixel stored together) and an .npy is refused.
    Refuses other band counts, other shapes, empty images and images of more than ``max_pixels``.
    """
    if len(shape) == 2:
        last, (h, w), c = False, shape, 1
    elif len(shape) == 3:
        first, last = shape[0] == channels, shape[2] == channels
        if first and last:
            if tiff_axes is None or len(tiff_axes) != 3:
                raise BandFileError(
                    f"shape {shape} is ambiguous: both its first and last axes have {channels} entries, so it "
                    "can be (C, H, W) or (H, W, C); save it with its bands on an axis of another length"
                )
            last = tiff_axes[-1] == "S"
        if not (first or last):  # the shorter end axis is the likely band axis
            raise BandFileError(f"has {_bands(min(shape[0], shape[2]))} (shape {shape}) but data.channels is {channels}")
        c, h, w = (shape[2], *shape[:2]) if last else shape
    else:
        raise BandFileError(f"has shape {shape}; an image is (H, W), (C, H, W) or (H, W, C) with {_bands(channels)}")
    if c != channels:
        raise BandFileError(f"has {_bands(c)} but data.channels is {channels}")
    if h < 1 or w < 1:
        raise BandFileError(f"is empty: shape {shape}")
    if max_pixels is not None and h * w > max_pixels:
        raise BandFileError(f"too large: {w} x {h} pixels > limit {max_pixels}; raise --data.max_image_pixels")
    return last


def _bands(n: int) -> str:
    return f"{n} band{'' if n == 1 else 's'}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- scaling -----------------------------------------------------------------------------------


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """Integers to [0, 1] by their dtype's range; booleans to 0/1; floats as they are (all float32).

    Refuses complex and non-numeric arrays, and floats that are not all finite (a NaN would poison
    every loss it reaches).
    """
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.float32)
    if kind in "ui":
        info = np.iinfo(array.dtype)
        # float32 holds every 8- and 16-bit value exactly, so those scale in float32 (half the memory traffic)
        work = np.float32 if array.dtype.itemsize <= 2 else np.float64
        out = array.astype(work)
        if kind == "i":
            out -= work(info.min)
        out *= work(1.0 / (float(info.max) - info.min))
        return out.astype(np.float32, copy=False)
    if kind == "f":
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            bad = int(out.size - np.isfinite(out).sum())
            raise BandFileError(f"holds {bad} NaN or infinite values; fill them (e.g. with 0) before training")
        return out
    raise BandFileError(f"holds {array.dtype} values; multi-band images hold integers or floats")


def _to_tensor(array: np.ndarray, channels: int) -> Tensor:
    if channels not in (1, 3):
        return torch.from_numpy(to_unit_range(array))
    if array.dtype == np.uint8:  # with every other 1- or 3-channel image, as uint8
        return torch.from_numpy(array)
    return torch.from_numpy(np.round(np.clip(to_unit_range(array), 0.0, 1.0) * 255.0).astype(np.uint8))


def pixels(image: Tensor) -> Tensor:
    """A decoded image (uint8 or float32 (C, H, W)) as float32 values on the [0, 1] scale."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


# -- statistics --------------------------------------------------------------------------------


def band_statistics(
    paths: Sequence[str | os.PathLike], channels: int, max_pixels: int | None = None, sample: int = STATS_IMAGES
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band (mean, std) of the pixels of up to ``sample`` of ``paths`` (a fixed seeded choice), on the
    [0, 1] scale the pipeline normalises (before resizing). Files that cannot be read are skipped.

    Rounded to 6 decimals, so that the values written to config.yaml read well and compare equal when
    a run resumes. Computed once per process for the same files (every split and the reconstruction
    hook ask again). Raises ValueError when none of the sampled files can be read, with the reasons.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to compute per-band statistics from")
    count = min(sample, len(paths))
    chosen = np.sort(np.random.default_rng(STATS_SEED).choice(len(paths), size=count, replace=False))
    return _statistics(tuple(paths[i] for i in chosen), channels, max_pixels)


@functools.lru_cache(maxsize=8)
def _statistics(paths: tuple[str, ...], channels: int, max_pixels: int | None) -> tuple[tuple[float, ...], ...]:
    total = np.zeros(channels)
    squares = np.zeros(channels)
    n = 0
    failures: list[str] = []
    for path in paths:
        try:
            image = pixels(read_bands(path, channels, max_pixels)).double()  # (C, H, W)
        except BandFileError as e:
            failures.append(f"{path} {e}")
            continue
        flat = image.reshape(channels, -1)
        total += flat.sum(dim=1).numpy()
        squares += (flat * flat).sum(dim=1).numpy()
        n += flat.shape[1]
    if n == 0:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ValueError(
            f"cannot compute per-band statistics: none of the {len(paths)} sampled training files reads as a "
            f"{channels}-band image: {failures[0]}{more}"
        )
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    std = np.where(std < MIN_STD, 1.0, std)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
