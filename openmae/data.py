"""Datasets, samplers and loaders (the transforms they apply are in openmae.transforms).

Three sources behind one ``ImageDataset``: Fashion-MNIST (IDX files, held in memory as uint8),
scikit-learn's 8x8 digits (in memory), and image folders (decoded on access: JPEGs by libjpeg-turbo
after the crop is drawn, at the smallest DCT scale that keeps the output's resolution; other files,
and every file with ``data.decode exact``, by PIL at full size).

Loaders carry uint8 pixels (``PixelBatch``) and normalise them where the batch lands: a quarter of
float32's bytes through the workers' shared memory and to the GPU, and the same values.

Determinism contract, relied on by exact resume and by DDP == single-process equality:

- the random transform of sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``:
  it runs under a forked CPU RNG seeded from that triple, so it does not depend on the number of
  workers, the rank, or which samples were loaded before (and it leaves the caller's RNG alone);
- the order of an epoch is a permutation drawn from ``seed + epoch``; with W ranks of batch b,
  local batch k of all ranks together is batch k of one process with batch W*b (``ShardedSampler``).

A file that cannot be decoded (corrupt, not an image, or more pixels than ``data.max_image_pixels``)
does not stop training: its sample comes back with image ``None``, ``collate`` drops it and lists its
index in ``Batch.failed``, and ``BadImageTracker`` stops the run once too large a fraction of the
images has failed (counted over all ranks), naming the files and why each failed.

Folders are walked so that each real file is listed once however it is linked: symlinked folders
are followed (also out of the root), a folder or file reached again (a symlink loop, a second link,
a hard link) is skipped, and a real path wins over a symlinked one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import heapq
import io
import math
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from openmae import bands, gpu_decode
from openmae.config import ConfigError, DataConfig
from openmae.shards import ShardIndex, ShardReader, ShardStream
from openmae.transforms import DeferredImage, ImageTransform, build_transform, eval_transform, normalize_pixels

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy")

# Normalisation defaults, per channel of the stored images.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Pixel statistics of the digits train split (80%, values 0..16 scaled to 0..255) at native 8x8.
DIGITS_MEAN, DIGITS_STD = (0.3055,), (0.3759,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# What a dataset was normalised with when the run recorded only its name (mean/std left null).
DATASET_NORMALIZATION = {
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "folder": (IMAGENET_MEAN, IMAGENET_STD),
    "shards": (IMAGENET_MEAN, IMAGENET_STD),
}

DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0  # fixed: the train/test split must not move with the run seed
MIN_SEEN_FOR_BAD_CHECK = 20  # or the whole dataset, if smaller
BAD_FILES_LISTED = 5  # in the message that stops a run; the summary keeps up to 100
DEFAULT_MAX_IMAGE_PIXELS: int | None = DataConfig.max_image_pixels


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data pipeline's defaults: Fashion-MNIST for 1 channel, ImageNet for 3."""
    if channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"no default normalisation for {channels}-channel images; pass mean and std")


# -- per-sample seeding ------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one sample; a pure function of its arguments.

    ``stream`` separates independent uses of the same sample (0: its transform, 1: its mask).
    """
    mask = (1 << 64) - 1  # SeedSequence wants non-negative entropy; negative run seeds still work
    words = [seed & mask, epoch & mask, index & mask] + ([stream] if stream else [])
    words = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)
    return int(words[0]) >> 1


# -- decoding ----------------------------------------------------------------------------------


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int and float grayscale to 0..255 by scaling, never by clipping."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        a = a / 257.0  # 65535 -> 255 exactly
    elif mode == "F" and a.min() >= 0 and a.max() <= 1:
        a = a * 255.0
    else:  # no known range: stretch this image's own range
        lo, hi = a.min(), a.max()
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.round(a).clip(0, 255).astype(np.uint8)


def _convert(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to 'L' (1 channel) or 'RGB' (3); transparency is composited over white."""
    if im.mode.startswith("I") or im.mode == "F":
        im = Image.fromarray(_wide_to_uint8(np.asarray(im), im.mode))
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode not in ("L", "RGB"):  # CMYK, P, 1, YCbCr, LAB, HSV, composited RGBA
        im = im.convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


class BadImageError(ValueError):
    """A file that cannot be used as an image; the message says why (without the path)."""


@contextlib.contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``limit`` (None: off) while the block runs, then restored.

    PIL warns above its limit and refuses above twice it; openmae refuses above ``limit`` itself (with
    the size in the message), so the warning is muted. The setting is module-wide: decode in one
    thread per process at a time (loader workers are processes).
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_large(width: int, height: int, limit: int) -> BadImageError:
    return BadImageError(f"too large: {width} x {height} pixels > limit {limit}; raise --data.max_image_pixels")


def decode_image(
    path: str | os.PathLike | BinaryIO, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Tensor:
    """Decode one file to a uint8 (C, H, W) tensor, upright per its EXIF.

    Multi-band files (``.npy`` arrays, and TIFFs when ``channels`` is not 1 or 3) are read by
    :func:`openmae.bands.read_bands`: float32 on the [0, 1] scale for multi-band images.
    ``path`` may also be an open binary file (a sample read from shards), which PIL decodes.
    An image of more than ``max_pixels`` pixels (None: no limit) is refused from its header, before
    any pixel is decoded. Raises :class:`BadImageError` saying why a file cannot be used.
    """
    if isinstance(path, (str, os.PathLike)) and bands.is_band_file(path, channels):
        try:
            return bands.read_bands(path, channels, max_pixels)
        except bands.BandFileError as e:
            raise BadImageError(str(e)) from None
    try:
        with _pil_pixel_limit(None):  # reads the header only: the size is known before anything is decoded
            im = Image.open(path)
        with im, _pil_pixel_limit(max_pixels):
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            try:
                im.load()
            except Image.DecompressionBombError:  # a frame or tile larger than the image it belongs to
                raise _too_large(width, height, max_pixels) from None
            ImageOps.exif_transpose(im, in_place=True)
            array = np.array(_convert(im, channels))  # (H, W) or (H, W, 3), an owned copy
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found: deleted, or a broken link") from None
    except PermissionError:
        raise BadImageError("permission denied") from None
    except Image.UnidentifiedImageError:
        raise BadImageError("not an image file PIL can read") from None
    except Exception as e:  # noqa: BLE001 -- decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise BadImageError(f"cannot be decoded: {e or type(e).__name__}") from None
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def load_image(
    path: str | os.PathLike, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Tensor | None:
    """:func:`decode_image`, or None if the file cannot be used (:func:`decode_image` says why)."""
    try:
        return decode_image(path, channels, max_pixels)
    except BadImageError:
        return None


JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_SUFFIXES = (".jpg", ".jpeg")


class JpegImage:
    """A JPEG's bytes, decoded when a transform asks, by libjpeg-turbo (simplejpeg) at full, 1/2, 1/4 or 1/8
    scale (a :class:`~openmae.transforms.DeferredImage`).

    At full scale the pixels equal PIL's (the exact path) for RGB and grayscale JPEGs. A colour JPEG read as 1
    channel gives its luma plane, within a few levels of PIL's RGB -> L. Data libjpeg-turbo refuses or warns
    about (corrupt data PIL may still decode, or refuse with its reason) goes to ``fallback``, PIL at full size.

    Attributes:
        size: (H, W) of the upright image at full scale.
    """

    def __init__(
        self, data: bytes, stored: tuple[int, int], orientation: int, gray: bool, fallback: Callable[[], Tensor]
    ) -> None:
        self.data, self.stored, self.orientation, self.gray, self.fallback = data, stored, orientation, gray, fallback
        self.size = stored[::-1] if orientation in (5, 6, 7, 8) else stored  # those turn the image by 90 degrees

    def decode(self, reduction: int = 1) -> Tensor:
        """The upright image, uint8 (C, ceil(H / reduction), ceil(W / reduction)); reduction 1, 2, 4 or 8."""
        h, w = self.stored
        scaled = {} if reduction == 1 else {"min_height": -(-h // reduction), "min_width": -(-w // reduction)}
        try:
            array = simplejpeg.decode_jpeg(self.data, colorspace="GRAY" if self.gray else "RGB", **scaled)
        except ValueError:
            return self.fallback()
        # A (C, H, W) view of the (H, W, C) array, not a copy: torch's uint8 resize is fastest on channels-last.
        return _upright(torch.from_numpy(array).permute(2, 0, 1), self.orientation)


def _upright(image: Tensor, orientation: int) -> Tensor:
    """(C, H, W) turned as PIL's ``exif_transpose`` turns an image of this EXIF orientation (1-8)."""
    if orientation in (5, 6, 7, 8):  # transpose, rotate by 270 or by 90 degrees, transverse: all swap H and W
        image = image.transpose(-1, -2)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def jpeg_image(
    data: bytes, channels: int, max_pixels: int | None, fallback: Callable[[], Tensor]
) -> JpegImage | None:
    """``data`` as a :class:`JpegImage` when it is an RGB or grayscale JPEG within ``max_pixels``; None otherwise
    (another format, CMYK, too large, an unreadable header): the caller decodes it with PIL, which says why it fails.

    The header is read by libjpeg-turbo and the EXIF orientation by :func:`_exif_orientation` (PIL's parse
    costs a tenth of a decode); PIL reads the orientation only where an XMP packet may hold it.
    """
    if channels not in (1, 3) or not data.startswith(JPEG_SIGNATURE):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("Gray", "YCbCr", "RGB") or (max_pixels is not None and width * height > max_pixels):
        return None
    orientation = _exif_orientation(data)
    if orientation is None:
        try:
            with _pil_pixel_limit(None), Image.open(io.BytesIO(data)) as im:  # the header only
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)  # EXIF, else XMP, as exif_transpose
        except Exception:  # noqa: BLE001 -- whatever PIL raises on this header, it raises again on the exact path
            return None
    orientation = orientation if orientation in range(1, 9) else 1
    return JpegImage(data, (height, width), orientation, channels == 1, fallback)


def _exif_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag of a JPEG's APP1 segment; 1 without one; None when PIL must decide (an XMP
    packet, which PIL also reads, or EXIF this reader does not follow)."""
    pos, xmp = 2, False
    try:
        while data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0xD9, 0xDA):  # end of image, start of scan: no more headers
                break
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xE1 and data.startswith(b"Exif\0\0", pos + 4):
                found = _tiff_orientation(data[pos + 10 : pos + 2 + length])
                if found != 1:  # a turn, or None: unreadable. 1 may be an absent tag, which XMP may supply
                    return found
            xmp = xmp or (marker == 0xE1 and data.startswith(b"http://ns.adobe.com/xap/", pos + 4))
            pos += 2 + length
    except IndexError:
        return None
    return None if xmp else 1


def _tiff_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 (a SHORT) of IFD0 of EXIF's TIFF block; 1 when absent; None when unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == 0x0112:
            return int.from_bytes(entry[8:10], order) if int.from_bytes(entry[2:4], order) == 3 else None
    return None if ifd + 2 > len(tiff) else 1


def open_image(
    path: str | os.PathLike, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Tensor | JpegImage:
    """A JPEG file (by its suffix and signature) as a :class:`JpegImage` that decodes when the transform has
    drawn its crop; any other file decoded now by :func:`decode_image`, which raises :class:`BadImageError`."""
    exact = functools.partial(decode_image, path, channels, max_pixels)
    if Path(path).suffix.lower() not in JPEG_SUFFIXES:
        return exact()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return exact()  # it says why
    return jpeg_image(data, channels, max_pixels, exact) or exact()


def open_shard_sample(
    reader: ShardReader, index: int, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, fast: bool = True
) -> Tensor | JpegImage:
    """Sample ``index`` of webdataset shards (:class:`~openmae.shards.ShardReader`), as :func:`open_image` opens
    a file (``fast``) or :func:`decode_image` decodes one; raises :class:`BadImageError` saying why it cannot be used."""
    try:
        data = reader.read(index)
    except OSError as e:
        raise BadImageError(f"cannot be read: {e}") from None
    exact = functools.partial(decode_image, io.BytesIO(data), channels, max_pixels)
    return (fast and jpeg_image(data, channels, max_pixels, exact)) or exact()


# -- dataset -----------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images in memory (uint8 arrays) or on disk (paths), with labels and a seeded transform.

    ``dataset[i]`` is ``(image, label, i)``: image a float32 (C, img_size, img_size) tensor,
    normalised with ``mean``/``std``, or ``None`` when the file could not be decoded (the index
    travels with it so that ``collate`` can report which file); label an int, -1 if unlabelled.
    Nothing is remembered about failures here: loader workers are separate processes, so
    :meth:`failure_reason` decodes a failed file again to say why. :meth:`sample` with
    ``normalize=False`` gives the image before normalisation (what loaders carry).

    Attributes:
        classes: class names, index = label; [] when unlabelled.
        channels: C of the images produced.
        paths: file paths (folders), else None.
        labels: (N,) int64 array.
        mean, std: the normalisation, ``channels`` floats each.
        seed, epoch: with the index, these seed each sample's transform (see ``set_epoch``).
        max_pixels: files with more pixels than this are refused before decoding (None: no limit).
        decode: "fast": JPEG files reach an :class:`~openmae.transforms.ImageTransform` undecoded
            (:class:`JpegImage`), to decode at the scale its crop needs; "exact": PIL decodes every file in full;
            "gpu": as fast, except that loaders carry JPEGs undecoded to the device (:class:`EncodedBatch`).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Tensor], Tensor],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        images: np.ndarray | None = None,
        paths: Sequence[str] | None = None,
        classes: Sequence[str] = (),
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "fast",
        shards: ShardReader | None = None,
    ) -> None:
        """Exactly one of ``images`` ((N, H, W) grayscale or (N, H, W, C) uint8) and ``paths``; with ``shards``
        the samples are read from webdataset shards, ``paths`` naming them (``SHARD.tar:KEY``)."""
        if decode not in ("fast", "exact", "gpu"):
            raise ValueError(f"decode must be 'fast', 'exact' or 'gpu', got {decode!r}")
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset needs exactly one of images= (an in-memory array) or paths= (files)")
        if images is not None and (
            images.dtype != np.uint8
            or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, channels)))
        ):
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, H, W, {channels}), got {images.dtype} {images.shape}"
            )
        self.images = images
        self.paths = [str(p) for p in paths] if paths is not None else None
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self):
            raise ValueError(f"{len(self.labels)} labels for {len(self)} images")
        self.transform = transform
        self.channels = channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.classes = list(classes)
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.decode = decode
        self.shards = shards

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; call before the loader starts its workers."""
        self.epoch = epoch

    def load(self, index: int) -> Tensor | None:
        """The untransformed (C, H, W) image, uint8 (float32 for multi-band data);
        None if its file cannot be decoded."""
        if self.shards is not None:
            with contextlib.suppress(BadImageError):
                return open_shard_sample(self.shards, index, self.channels, self.max_pixels, fast=False)
            return None
        if self.paths is not None:
            return load_image(self.paths[index], self.channels, self.max_pixels)
        image = torch.tensor(self.images[index])  # a copy: transforms must never write into the array
        image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
        if image.shape[0] == 1 and self.channels == 3:
            image = image.repeat(3, 1, 1)
        return image

    def failure_reason(self, index: int) -> str:
        """Why sample ``index`` failed to load, found by decoding its file again."""
        if self.paths is None:
            return "could not be loaded"
        try:
            if self.shards is not None:
                open_shard_sample(self.shards, index, self.channels, self.max_pixels, fast=False)
            else:
                decode_image(self.paths[index], self.channels, self.max_pixels)
        except BadImageError as e:
            return str(e)
        return "failed once, loads now (a transient read error?)"

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int]:
        return self.sample(index)

    def sample(self, index: int, normalize: bool = True) -> tuple[Tensor | None, int, int]:
        """``dataset[index]``; with ``normalize=False`` and an :class:`~openmae.transforms.ImageTransform` the
        image comes before its normalisation (uint8), for :func:`collate_pixels` to normalise on the device."""
        index = int(index)
        transform = self.transform
        if not normalize and isinstance(transform, ImageTransform):
            transform = transform.pixels
            if self.decode == "gpu":  # a JPEG leaves undecoded, with its drawn crop (EncodedBatch decodes it)
                transform = functools.partial(gpu_decode.encode, self.transform)
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: transforms draw from it, and torch.manual_seed would also
            # seed every accelerator, at ~100x the cost.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            try:  # a JpegImage decodes inside the transform, after the crop is drawn
                image = transform(self._open(index))
            except BadImageError:
                image = None
        return image, int(self.labels[index]), index

    def _open(self, index: int) -> Tensor | DeferredImage:
        """What the transform gets: an in-memory image, a decoded file, or a JPEG it decodes itself."""
        if self.shards is not None:
            fast = self.decode in ("fast", "gpu") and isinstance(self.transform, ImageTransform)
            return open_shard_sample(self.shards, index, self.channels, self.max_pixels, fast)
        if self.paths is None:
            return self.load(index)
        if self.decode in ("fast", "gpu") and isinstance(self.transform, ImageTransform):
            return open_image(self.paths[index], self.channels, self.max_pixels)
        return decode_image(self.paths[index], self.channels, self.max_pixels)


# -- sources -----------------------------------------------------------------------------------


class _Source(NamedTuple):
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]  # defaults, per stored channel (1 for grayscale sources)
    std: tuple[float, ...]
    images: np.ndarray | None = None
    paths: list[str] | None = None
    shards: ShardReader | None = None  # webdataset shards; paths then name their samples


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or .gz) into a (N, ...) uint8 array.

    With ``limit`` only the first ``limit`` items are read, so quick runs skip decompressing the rest.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[:2] != b"\0\0":
            raise ValueError(f"{path} is not an IDX file (header {magic!r})")
        type_code, ndim = magic[2], magic[3]
        if type_code != 0x08:
            raise ValueError(f"{path}: only unsigned-byte IDX data (type 0x08) is supported, got 0x{type_code:02x}")
        header = f.read(4 * ndim)
        if ndim == 0 or len(header) != 4 * ndim:
            raise ValueError(f"{path}: truncated or empty IDX header")
        dims = struct.unpack(f">{ndim}I", header)
        count = dims[0] if limit is None else min(dims[0], limit)
        item_size = math.prod(dims[1:])
        data = f.read(count * item_size)
    if len(data) != count * item_size:
        raise ValueError(f"{path} is truncated: expected {count * item_size} bytes of data, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:]).copy()


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Install the dataset with "
        "`apt-get install dataset-fashion-mnist` (it goes to /usr/share/datasets/fashion-mnist), "
        "or pass `--data DIR` with a folder holding the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)."
    )


def _fashion_mnist(path: str | None, split: str, limit: int | None) -> _Source:
    folder = Path(path) if path is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"), limit)  # (N, 28, 28)
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"), limit)  # (N,)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {folder}: {len(images)} {prefix} images but {len(labels)} labels")
    return _Source(labels.astype(np.int64), FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, images=images)


def _digits(split: str, limit: int | None) -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    n_train = int(DIGITS_TRAIN_FRACTION * len(images))
    keep = order[:n_train] if split == "train" else order[n_train:]
    keep = keep[:limit]
    classes = [str(d) for d in range(10)]
    return _Source(digits.target[keep].astype(np.int64), classes, DIGITS_MEAN, DIGITS_STD, images=images[keep])


def image_files(path: str | os.PathLike) -> list[Path]:
    """One image file, or :func:`find_images` of a folder; refuses a path that holds none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image or folder: {path}")
    if path.is_file():
        return [path]
    found = find_images(path)
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return found


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root``, each real file once, sorted by path components.

    Recursive; hidden files and folders are skipped; only regular files (and broken links, so that
    they are reported) with an image extension count. Symlinks are followed, also out of ``root``,
    but each real folder and file is listed once: a symlink loop, a second link to a folder or file,
    or a hard link to a file already listed is skipped. The real tree is walked before any symlink,
    so a file is listed under its real path when it has one below ``root``, else under its first
    link in sorted order. The result lists the same way on every machine.
    """
    root = Path(root)
    seen_folders: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found: list[tuple[tuple[str, ...], Path]] = []
    links: list[tuple[tuple[str, ...], Path]] = []  # a heap: followed after the real tree, in path order

    def is_image(name: str) -> bool:
        return Path(name).suffix.lower() in IMAGE_EXTENSIONS

    def add_file(parts: tuple[str, ...], path: Path, st: os.stat_result) -> None:
        if (st.st_dev, st.st_ino) not in seen_files:
            seen_files.add((st.st_dev, st.st_ino))
            found.append((parts, path))

    def walk(folder: Path, parts: tuple[str, ...], st: os.stat_result) -> None:
        if (st.st_dev, st.st_ino) in seen_folders:
            return
        seen_folders.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as os.walk does
            return
        for entry in entries:
            if entry.name.startswith("."):  # .git, macOS ._ forks, checkpoints
                continue
            path, sub = folder / entry.name, (*parts, entry.name)
            if entry.is_symlink():
                heapq.heappush(links, (sub, path))
                continue
            try:
                entry_st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(entry_st.st_mode):
                walk(path, sub, entry_st)
            elif stat.S_ISREG(entry_st.st_mode) and is_image(entry.name):
                add_file(sub, path, entry_st)

    walk(root, (), os.stat(root))
    while links:
        parts, path = heapq.heappop(links)
        try:
            target = os.stat(path)
        except OSError:  # broken, or a link to itself: listed if it names an image, so that it is reported
            if is_image(path.name):
                add_file(parts, path, os.lstat(path))
            continue
        if stat.S_ISDIR(target.st_mode):
            walk(path, parts, target)
        elif stat.S_ISREG(target.st_mode) and is_image(path.name):
            add_file(parts, path, target)
    return [path for _, path in sorted(found, key=lambda item: item[0])]


def _split_roots(root: Path) -> tuple[Path, Path | None]:
    """(train root, eval root): train/ with val/ (or test/) when present, else the whole folder and None."""
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
    return root, None


def _class_folders(folder: Path) -> set[str]:
    """Names of the first-level subfolders, each real folder once (as :func:`find_images` walks them).

    Hidden folders are skipped, and so is a symlink to ``folder`` itself, to a real subfolder, or to
    the target of an earlier link: it is another name for a folder already counted, not a class.
    """
    st = folder.stat()
    seen = {(st.st_dev, st.st_ino)}
    names = set()
    for path in sorted(folder.iterdir(), key=lambda p: (p.is_symlink(), p.name)):  # real folders first
        try:
            st = path.stat()
        except OSError:  # a broken link or a loop
            continue
        if path.name.startswith(".") or not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        names.add(path.name)
    return names


def _image_folder(path: str, split: str, limit: int | None) -> _Source:
    root = Path(path)
    train_root, eval_root = _split_roots(root)
    if split == "test" and eval_root is None:
        raise ValueError(
            f"{root} has no train/ + val/ (or test/) subfolders, so it has no test split; "
            "lay it out as ROOT/train/... and ROOT/val/... to evaluate on held-out images"
        )
    split_root = train_root if split == "train" else eval_root
    files = find_images(split_root)
    if not files:
        raise ValueError(
            f"no images found in {split_root} (searched recursively for {' '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    files = files[:limit]
    parts = [f.relative_to(split_root).parts for f in files]
    if all(len(p) > 1 for p in parts):  # every image in a class folder
        # Both splits name their classes from the same folders, so label indices agree between them.
        names = _class_folders(train_root) | (_class_folders(eval_root) if eval_root is not None else set())
        classes = sorted(names)
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p[0]] for p in parts], dtype=np.int64)
    else:
        classes, labels = [], np.full(len(files), -1, dtype=np.int64)
    return _Source(labels, classes, IMAGENET_MEAN, IMAGENET_STD, paths=[str(f) for f in files])


def _shards(path: str, split: str, limit: int | None, shuffle_buffer: int) -> _Source:
    """A split of the shards ``openmae shard`` wrote (the test split is their ``val``), labelled as its folder was."""
    reader = ShardIndex.read(path).reader("train" if split == "train" else "val", limit, shuffle_buffer)
    labels = np.asarray(reader.labels, dtype=np.int64)
    return _Source(labels, reader.classes, IMAGENET_MEAN, IMAGENET_STD, paths=reader.names(), shards=reader)


def _per_channel(values: Sequence[float], channels: int, what: str, user_given: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if not user_given and channels == 1:  # RGB defaults for a grayscale view: their average
        return (sum(values) / len(values),)
    raise ValueError(f"data.{what} needs 1 or {channels} values (one per channel), got {list(values)}")


def build_dataset(cfg: DataConfig, split: str = "train", augment: bool = True, seed: int = 0) -> ImageDataset:
    """The dataset ``cfg`` names, for one split.

    Args:
        cfg: which source, resolution, channels, augmentation, normalisation and ``limit``.
        split: "train" or "test" (Fashion-MNIST t10k; the 20% digits hold-out; a folder's val/ or test/).
        augment: False gives the deterministic eval transform whatever ``cfg.augment`` says.
        seed: seeds each sample's augmentation together with the epoch and the index.

    Folders are labelled when every image of the split sits in a first-level subfolder; the classes
    are then the sorted first-level subfolder names (of train/ and val/ together, so that both splits
    share one index space). Otherwise every label is -1 and ``classes`` is empty.

    Normalisation defaults: Fashion-MNIST 0.2860/0.3530; digits 0.3055/0.3759 (its train split's
    pixel statistics); folders ImageNet's, averaged over RGB for 1-channel folders; multi-band folders
    (``channels`` other than 1 or 3) their own per-band statistics, from a seeded sample of the
    training files (:func:`openmae.bands.band_statistics`), whichever split is asked for.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    channels = cfg.num_channels()
    if channels < 1 or (channels not in (1, 3) and cfg.name != "folder"):
        raise ValueError(f"data.channels must be 1 or 3 for {cfg.name} (any count >= 1 for folders), got {channels}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"data.limit must be a positive number of images, got {cfg.limit}")
    if cfg.name == "fashion-mnist":
        source = _fashion_mnist(cfg.path, split, cfg.limit)
    elif cfg.name == "digits":
        source = _digits(split, cfg.limit)
    elif cfg.name == "folder":
        source = _image_folder(cfg.path, split, cfg.limit)
    elif cfg.name == "shards":
        source = _shards(cfg.path, split, cfg.limit, cfg.shuffle_buffer)
    else:
        raise ValueError(f"unknown dataset {cfg.name!r}; expected fashion-mnist, digits, folder or shards")
    if channels not in (1, 3) and (cfg.mean is None or cfg.std is None):
        train_paths = source.paths if split == "train" else _image_folder(cfg.path, "train", cfg.limit).paths
        mean, std = bands.band_statistics(train_paths, channels, cfg.max_image_pixels)
        source = source._replace(mean=mean, std=std)
    mean = _per_channel(cfg.mean if cfg.mean is not None else source.mean, channels, "mean", cfg.mean is not None)
    std = _per_channel(cfg.std if cfg.std is not None else source.std, channels, "std", cfg.std is not None)
    if min(std) <= 0:
        raise ValueError(f"data.std must be positive, got {list(std)}")
    return ImageDataset(
        source.labels,
        build_transform(cfg, channels, mean, std, train=augment),
        channels,
        mean,
        std,
        images=source.images,
        paths=source.paths,
        classes=source.classes,
        seed=seed,
        max_pixels=cfg.max_image_pixels,
        decode=cfg.decode,
        shards=source.shards,
    )


# -- labelled splits (the evaluation protocols) -------------------------------------------


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


# -- sampling and loading ----------------------------------------------------------------------


class ShardedSampler(Sampler[int]):
    """One rank's share of an epoch's order; the same samples and batches on any number of ranks.

    Epoch ``e`` permutes the dataset with ``seed + e`` (or keeps it in order), drops the tail that
    does not fill a global batch of ``world_size * batch_size``, and rank r takes ``perm[r::W]``.
    So local batch k of all ranks together is batch k of a single process with batch W*b, rank r's
    local row j being that batch's row ``r + j*W``.
    """

    def __init__(
        self,
        dataset_len: int,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dataset_len < world_size * batch_size:
            raise ValueError(
                f"the dataset has {dataset_len} images, fewer than one global batch "
                f"({world_size} ranks x {batch_size}); lower the batch size or use more data"
            )
        self.dataset_len = dataset_len
        self.world_size = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; a resumed run skips the ``skip_batches`` local batches it already did.

        The skip belongs to this epoch only: the next ``set_epoch`` call starts from its first batch.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def global_order(self) -> Tensor:
        """(W * b * num_batches,) dataset indices of this epoch, for all ranks together."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_len)
        global_batch = self.world_size * self.batch_size
        return order[: self.dataset_len // global_batch * global_batch]

    def _local(self) -> Tensor:
        return self.global_order()[self.rank :: self.world_size][self.skip_batches * self.batch_size :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._local().tolist())

    def __len__(self) -> int:
        per_rank = self.dataset_len // (self.world_size * self.batch_size) * self.batch_size
        return max(0, per_rank - self.skip_batches * self.batch_size)


@dataclass
class Batch:
    """Collated samples. When every sample failed, ``images`` is an empty (0, 0, 0, 0) tensor
    (the shape is unknown without a decoded image) and ``len(batch) == 0``: skip such a batch."""

    images: Tensor  # (N, C, H, W) float32, normalised
    labels: Tensor  # (N,) int64, -1 = unlabelled
    indices: Tensor  # (N,) int64 dataset indices
    failed: list[int]  # dataset indices whose file could not be decoded; not in the tensors

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return dataclasses.replace(
            self, images=self.images.pin_memory(), labels=self.labels.pin_memory(), indices=self.indices.pin_memory()
        )


@dataclass
class PixelBatch:
    """A :class:`Batch` as loaders carry it: images still uint8 (a quarter of float32's bytes through the
    workers' shared memory, pinned memory and the copy to a GPU), normalised where they land.

    ``to(device)`` gives the :class:`Batch` of normalised float32 images on ``device``; ``images``
    normalises on the CPU, once. Either gives the values the dataset's transform gives per sample.
    """

    pixels: Tensor  # (N, C, H, W) uint8 (float32 for multi-band data of more than 8 bits), before normalisation
    labels: Tensor
    indices: Tensor
    failed: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @functools.cached_property
    def images(self) -> Tensor:
        """(N, C, H, W) float32, normalised (on the CPU, computed on first use)."""
        return normalize_pixels(self.pixels, self.mean, self.std)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The normalised batch on ``device``: uint8 crosses to it, the normalisation runs there."""
        pixels = self.pixels.to(device, non_blocking=non_blocking)
        return Batch(
            images=normalize_pixels(pixels, self.mean, self.std),
            labels=self.labels.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
            failed=self.failed,
        )

    def pin_memory(self) -> PixelBatch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return dataclasses.replace(
            self, pixels=self.pixels.pin_memory(), labels=self.labels.pin_memory(), indices=self.indices.pin_memory()
        )


def _stack(samples: Sequence[tuple[Tensor | None, int, int]]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(images, labels, indices, failed) of the samples; those whose image is None are only listed in failed."""
    good = [s for s in samples if s[0] is not None]
    failed = [int(s[2]) for s in samples if s[0] is None]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, 0, 0, 0), empty, empty.clone(), failed
    return (
        default_collate([s[0] for s in good]),  # in a loader worker, stacked straight into shared memory
        torch.tensor([s[1] for s in good], dtype=torch.int64),
        torch.tensor([s[2] for s in good], dtype=torch.int64),
        failed,
    )


def collate(samples: Sequence[tuple[Tensor | None, int, int]]) -> Batch:
    """Stack ``ImageDataset`` samples, dropping (and listing in ``failed``) those whose image is None."""
    return Batch(*_stack(samples))


def collate_pixels(
    samples: Sequence[tuple[Tensor | None, int, int]], mean: Sequence[float], std: Sequence[float]
) -> PixelBatch:
    """:func:`collate` for samples before normalisation (``ImageDataset.sample(i, normalize=False)``)."""
    return PixelBatch(*_stack(samples), tuple(mean), tuple(std))


@dataclass
class EncodedBatch:
    """A :class:`PixelBatch` whose JPEGs are still encoded (``data.decode gpu``): bytes with each sample's drawn
    crop, decoded together on a device by :meth:`decoded` (nvJPEG on CUDA; see :mod:`openmae.gpu_decode`).

    ``to(device)`` gives the normalised :class:`Batch` there; ``images`` decodes on the CPU. A JPEG no decoder
    reads is dropped there and listed in ``failed``, so count failures on the decoded batch.
    """

    encoded: gpu_decode.EncodedImages
    labels: Tensor
    indices: Tensor
    failed: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.encoded)

    def decoded(self, device: torch.device | str) -> PixelBatch:
        """The batch's uint8 pixels decoded and transformed on ``device``."""
        pixels, bad = self.encoded.decode(device)
        keep = torch.tensor(sorted(set(range(len(self))) - set(bad)), dtype=torch.int64)
        failed = self.failed + self.indices[bad].tolist()
        return PixelBatch(pixels, self.labels[keep], self.indices[keep], failed, self.mean, self.std)

    @property
    def images(self) -> Tensor:
        """(N, C, H, W) float32, normalised, decoded on the CPU."""
        return self.decoded("cpu").images

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.decoded(device).to(device, non_blocking=non_blocking)

    def pin_memory(self) -> EncodedBatch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return dataclasses.replace(
            self, encoded=self.encoded.pin_memory(), labels=self.labels.pin_memory(), indices=self.indices.pin_memory()
        )


def collate_encoded(
    samples: Sequence[tuple[Tensor | gpu_decode.EncodedImage | None, int, int]], mean: Sequence[float],
    std: Sequence[float],
) -> EncodedBatch:
    """:func:`collate_pixels` for ``data.decode gpu`` samples: JPEGs undecoded, the other images as pixels."""
    good = [s for s in samples if s[0] is not None]
    return EncodedBatch(
        encoded=gpu_decode.EncodedImages.collect([s[0] for s in good]),
        labels=torch.tensor([s[1] for s in good], dtype=torch.int64),
        indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
        failed=[int(s[2]) for s in samples if s[0] is None],
        mean=tuple(mean),
        std=tuple(std),
    )


class _PixelSamples(Dataset):
    """``dataset``'s samples before normalisation; the loader's :class:`PixelBatch` normalises them."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int]:
        return self.dataset.sample(index, normalize=False)


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A loader for one epoch of one rank: ``ShardedSampler`` order, ``collate``d ``Batch``es of ``batch_size``,
    or what ``collate_fn`` makes of the samples (openmae.dense's segmentation and detection batches).

    With openmae's ``ImageTransform`` the workers send ``PixelBatch``es: uint8, a quarter of float32's bytes
    through shared memory and to a GPU, normalised by ``to(device)`` on the device (``.images`` on the CPU),
    to the values of ``dataset[i]``; with ``decode`` "gpu", ``EncodedBatch``es, JPEGs decoded by ``to(device)``.

    A dataset read from shards is streamed instead (``shuffle``): each rank and worker reads shards of its own,
    in the order :func:`openmae.shards.rank_order` gives.

    Build one per epoch: the workers are not persistent, so they start with this epoch's
    ``dataset.set_epoch``. The loader never draws from the global RNG (its worker seed comes
    from a private generator; transforms are seeded per sample), so it does not disturb the
    training RNG stream a resumed run must reproduce.
    """
    dataset.set_epoch(epoch)
    sampler = ShardedSampler(len(dataset), world_size, rank, shuffle=shuffle, seed=seed, batch_size=batch_size)
    sampler.set_epoch(epoch, skip_batches)
    source: Dataset = dataset
    if collate_fn is None and isinstance(getattr(dataset, "transform", None), ImageTransform):
        source = _PixelSamples(dataset)
        pack = collate_encoded if getattr(dataset, "decode", None) == "gpu" else collate_pixels
        collate_fn = functools.partial(pack, mean=dataset.transform.mean, std=dataset.transform.std)
    if getattr(dataset, "shards", None) is not None and shuffle:  # streamed: every rank and worker its own shards
        stream = ShardStream(
            source.__getitem__, dataset.shards, batch_size=batch_size, world_size=world_size, rank=rank, seed=seed,
            num_workers=num_workers,
        )
        stream.set_epoch(epoch, skip_batches)
        return DataLoader(
            stream, batch_size=batch_size, num_workers=stream.workers, collate_fn=collate_fn or collate,
            pin_memory=pin_memory, drop_last=True,
        )
    return DataLoader(
        source,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed + epoch),
    )


# -- bad images --------------------------------------------------------------------------------


def describe_failures(dataset: ImageDataset, failed_indices: Sequence[int]) -> list[str]:
    """File paths (folders) or ``index N`` (in-memory datasets) of failed samples."""
    if dataset.paths is not None:
        return [dataset.paths[i] for i in failed_indices]
    return [f"index {i}" for i in failed_indices]


class BadImagesError(ValueError, RuntimeError):
    """Too many images failed to load (or none loaded); the message names files and why they failed.

    A ValueError (bad input: the CLI reports it as one line) and, as before, a RuntimeError.
    """


class BadImageTracker:
    """Counts decoding failures over a run and stops it when they are more than a set fraction.

    Counts are kept per process. ``reduce_sum`` (a tensor in, its sum over ranks out; identity
    without a process group) makes every verdict and summary use the counts of all ranks, so all
    ranks stop together: under DDP one rank stopping alone leaves the others waiting in a collective.
    Every rank must then call :meth:`check` and :meth:`summary` at the same points.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        min_seen: int = MIN_SEEN_FOR_BAD_CHECK,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.dataset = dataset
        self.min_seen = max(1, min(min_seen, len(dataset)))  # a small dataset is judged once it was all seen
        self.reduce_sum = reduce_sum or (lambda t: t)
        self.seen = 0  # images attempted, good or bad (a file counts again each epoch)
        self.failed: list[int] = []  # dataset index of each failed attempt
        self._known: set[int] = set()

    def update(self, batch: Batch) -> list[str]:
        """Count a batch; returns the files that failed for the first time (to log them)."""
        self.seen += len(batch) + len(batch.failed)
        self.failed += batch.failed
        new = [i for i in dict.fromkeys(batch.failed) if i not in self._known]
        self._known.update(new)
        return describe_failures(self.dataset, new)

    @property
    def fraction(self) -> float:
        return len(self.failed) / self.seen if self.seen else 0.0

    def bad_files(self) -> list[str]:
        return describe_failures(self.dataset, sorted(self._known))

    def totals(self) -> tuple[int, int]:
        """(images attempted, failed attempts) over all ranks: one all-reduce of two numbers."""
        seen, failed = self.reduce_sum(torch.tensor([self.seen, len(self.failed)], dtype=torch.int64)).tolist()
        return int(seen), int(failed)

    def bad_indices(self) -> list[int]:
        """Sorted dataset indices of every file that failed on any rank.

        Under DDP one all-reduce of a (len(dataset),) int32 mask: called when stopping and at the end.
        """
        mask = torch.zeros(len(self.dataset), dtype=torch.int32)
        mask[sorted(self._known)] = 1
        return torch.nonzero(self.reduce_sum(mask)).flatten().tolist()

    def check(self, max_bad_fraction: float, epoch_end: bool = False) -> None:
        """Raise :class:`BadImagesError` when more than ``max_bad_fraction`` of the attempts failed.

        Judged once ``min_seen`` images (or the whole dataset, if smaller) were tried, and always at
        an epoch's end (``epoch_end``), where a run in which no image at all could be loaded stops
        whatever ``max_bad_fraction`` allows.
        """
        seen, failed = self.totals()
        if not seen or not (epoch_end or seen >= self.min_seen):
            return
        if failed == seen and epoch_end:
            problem = f"none of the {seen} images tried could be loaded"
            fix = "point --data at images PIL can open, or re-encode these files"
        elif failed / seen > max_bad_fraction:
            problem = (
                f"{failed} of {seen} images ({failed / seen:.1%}) could not be loaded, "
                f"more than data.max_bad_fraction={max_bad_fraction:g}"
            )
            fix = "delete or re-encode these files, or raise --data.max_bad_fraction to train on without them"
        else:
            return
        bad = self.bad_indices()
        files = describe_failures(self.dataset, bad[:BAD_FILES_LISTED])
        listed = ", ".join(f"{f} ({self.dataset.failure_reason(i)})" for i, f in zip(bad, files))
        more = f" and {len(bad) - len(files)} more" if len(bad) > len(files) else ""
        raise BadImagesError(f"{problem}: {listed}{more}; {fix}")

    def summary(self) -> dict[str, Any]:
        """For the end-of-run report: counts and up to 100 bad files with the reason each failed (all ranks)."""
        seen, failed = self.totals()
        bad = self.bad_indices() if failed else []
        files = describe_failures(self.dataset, bad[:100])
        return {
            "images_seen": seen,
            "failed_loads": failed,
            "failed_fraction": failed / seen if seen else 0.0,
            "bad_files": files,
            "bad_file_reasons": {f: self.dataset.failure_reason(i) for i, f in zip(bad, files)},
            "num_bad_files": len(bad),
        }
