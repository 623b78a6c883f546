"""Image transforms: uint8 (C, H, W) tensors in, normalised float32 tensors out.

- :func:`build_transform`: pretraining's recipes (torchvision v2): RandomResizedCrop + flip
  (the paper's), fixed-size crop + flip, optional colour jitter, or the deterministic resize +
  centre crop, as an :class:`ImageTransform`: its uint8 half runs in the loader's workers (on a
  :class:`DeferredImage`, a JPEG, it draws the crop first and decodes no more pixels than the crop
  needs), its normalisation where the batch lands.
- :func:`eval_transform` and :func:`finetune_transform`: the evaluation protocols' recipes, built
  from timm's pieces (RandAugment, random erasing) and run deterministically per sample by
  :class:`PILTransform`.
- :func:`resize_center_crop`: one image to a model's input size (reconstruction figures).

Every random draw happens under the per-sample RNG that openmae.data seeds, so a sample's transform
is a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from openmae.config import ConfigError, DataConfig
from openmae.eval_config import FinetuneSettings
from openmae.patches import to_2tuple

BICUBIC = v2.InterpolationMode.BICUBIC
# DCT scaling: libjpeg-turbo's SIMD paths decode a JPEG at 1/2, 1/4 or 1/8 of its size for less
# than a full decode; its other factors (3/8, 5/8, ...) measured slower than decoding in full.
JPEG_REDUCTIONS = (8, 4, 2)


class DeferredImage(Protocol):
    """An image whose upright size is known before its pixels are decoded (openmae.data's JPEGs), so a
    transform can draw its crop first and then decode at the smallest scale that still covers it."""

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the upright image at full scale."""
        ...

    def decode(self, reduction: int) -> Tensor:
        """The upright image as uint8 (C, ceil(H / reduction), ceil(W / reduction)), reduction 1, 2, 4 or 8;
        a reader may return it larger (at full scale), so callers read the size they got."""
        ...


def jpeg_reduction(region: tuple[int, int], out: tuple[int, int]) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) at which ``region`` (h, w full-scale pixels) still has at least
    ``out`` (h, w) pixels: the crop is then resampled from no fewer pixels than the output has."""
    return next((k for k in JPEG_REDUCTIONS if region[0] // k >= out[0] and region[1] // k >= out[1]), 1)


def shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(h, w) with the shorter side resized to ``side``, rounded as torchvision's ``Resize(side)`` rounds it."""
    h, w = size
    return (side, int(side * w / h)) if h <= w else (int(side * h / w), side)


def normalize_pixels(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (C, H, W) or (N, C, H, W) -> float32 ``(pixels / 255 - mean) / std``: ToDtype(scale=True) + Normalize,
    on any device, with the same values per sample or batched. Float input (multi-band data already on the
    [0, 1] scale) is only normalised.

    A CPU batch is normalised one image at a time, in place in the output: each image then stays in cache
    through the three passes, where a whole batch does not (64 images of 224 px on a busy 2-core EPYC: 0.55 ms
    an image, against 0.90 for the whole batch at once and 1.46 normalising each sample, then stacking). The
    steps are torchvision's, so the values are the same bit for bit.
    """
    if pixels.numel() == 0:
        return pixels.float()
    mean, std = list(mean), list(std)
    if pixels.dim() == 4 and pixels.device.type == "cpu":
        out = torch.empty(pixels.shape, dtype=torch.float32)
        for image, row in zip(pixels, out):
            row.copy_(image)  # as to_dtype's .to(float32)
            if not image.is_floating_point():
                row.mul_(1.0 / 255)  # to_dtype's scaling
            v2.functional.normalize(row, mean, std, inplace=True)
        return out
    return v2.functional.normalize(v2.functional.to_dtype(pixels, torch.float32, scale=True), mean, std)


class ImageTransform:
    """openmae's pretraining and held-out transform, in two halves so that a loader can carry uint8 pixels and
    normalise them where they land (``openmae.data.PixelBatch``):

    - :meth:`pixels`: every random step, uint8 (C, H, W) -> uint8 (C, size, size) (float32 stays float32).
      It also takes a :class:`DeferredImage`: the crop is drawn from the image's size first, then the image is
      decoded reduced (:func:`jpeg_reduction`) when the crop still has the output's resolution at that scale.
    - :meth:`normalize`: ToDtype + Normalize, per sample or on a batch.

    Calling it does both. On a tensor the result equals, draw for draw and bit for bit, the ``v2.Compose`` of
    the same torchvision steps (RandomResizedCrop, flip, ColorJitter, Resize + RandomCrop / CenterCrop,
    ToDtype, Normalize) under the same seed; a reduced decode moves the crop box by under half a reduced pixel.
    """

    def __init__(
        self,
        kind: str,
        size: int,
        crop_scale: Sequence[float],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.kind, self.size = kind, size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.resized_crop = self.random_crop = self.jitter = None
        if kind in ("rrc", "rrc_jitter"):  # MAE's pretraining recipe
            self.resized_crop = v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=BICUBIC, antialias=True)
        elif kind == "crop":
            self.random_crop = v2.RandomCrop(size)
        self.resize_to = round(size / 0.875) if kind == "crop" else size  # crop: the 224/256 eval ratio
        self.flip = v2.RandomHorizontalFlip() if kind != "none" else None
        if kind == "rrc_jitter":
            self.jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0)

    def pixels(self, image: Tensor | DeferredImage) -> Tensor:
        """The augmented image before normalisation: (C, size, size), the input's dtype."""
        out = (self.size, self.size)
        full = tuple(image.shape[-2:]) if isinstance(image, Tensor) else image.size
        if self.resized_crop is not None:
            box = self.resized_crop.make_params([_shape_only(full)])  # the draws RandomResizedCrop makes
            image = _decoded(image, jpeg_reduction((box["height"], box["width"]), out))
            image = v2.functional.crop(image, *_rescaled_box(box, full, tuple(image.shape[-2:])))
            image = v2.functional.resize(_channels_last(image), list(out), interpolation=BICUBIC, antialias=True)
        else:  # shorter side to resize_to, then a random or the centre crop
            resized = shorter_side_to(full, self.resize_to)
            image = _decoded(image, jpeg_reduction(full, resized))
            image = v2.functional.resize(_channels_last(image), list(resized), interpolation=BICUBIC, antialias=True)
            image = self.random_crop(image) if self.random_crop is not None else v2.functional.center_crop(image, list(out))
        if self.flip is not None:
            image = self.flip(image)
        if self.jitter is not None:
            image = self.jitter(image)
        return image

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (..., C, size, size) -> normalised float32; see :func:`normalize_pixels`."""
        return normalize_pixels(pixels, self.mean, self.std)

    def __call__(self, image: Tensor | DeferredImage) -> Tensor:
        return self.normalize(self.pixels(image))

    def __repr__(self) -> str:
        return f"ImageTransform({self.kind!r}, size={self.size}, mean={self.mean}, std={self.std})"


def _shape_only(size: tuple[int, int]) -> Tensor:
    """A (1, H, W) tensor that allocates nothing: torchvision's crop draws read only the shape."""
    return torch.empty(()).expand(1, *size)


def _channels_last(image: Tensor) -> Tensor:
    """A uint8 (C, H, W) image laid out channels-last (a copy unless it already is): torch's uint8 antialiased
    resize gives the same values on it, copy included ~3x faster than on (C, H, W) rows and 1.4x faster than
    on a strided view of a decoded (H, W, C) array."""
    if image.dtype != torch.uint8 or image.shape[0] == 1:
        return image
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _decoded(image: Tensor | DeferredImage, reduction: int) -> Tensor:
    return image if isinstance(image, Tensor) else image.decode(reduction)


def _rescaled_box(box: dict, full: tuple[int, int], got: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a full-scale crop box on the image as decoded (reduced, or the same)."""
    if got == full:
        return box["top"], box["left"], box["height"], box["width"]
    sy, sx = got[0] / full[0], got[1] / full[1]
    top, left = round(box["top"] * sy), round(box["left"] * sx)
    bottom, right = round((box["top"] + box["height"]) * sy), round((box["left"] + box["width"]) * sx)
    return top, left, max(1, bottom - top), max(1, right - left)


def build_transform(
    cfg: DataConfig, channels: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> ImageTransform:
    """uint8 (C, H, W) tensor (or a :class:`DeferredImage`) -> normalised float32 (C, img_size, img_size).

    Args:
        cfg: ``augment``, ``img_size`` and ``crop_scale`` are read from it.
        channels: channel count of the input; saturation jitter needs 3.
        mean, std: per-channel normalisation, ``channels`` values each.
        train: the random ``cfg.augment`` recipe; False gives the deterministic eval transform
            (resize the shorter side to img_size, then center crop), whatever ``cfg.augment`` says.
    """
    kind = cfg.augment if train else "none"
    return ImageTransform(kind, cfg.img_size, cfg.crop_scale, channels, mean, std)


def resize_center_crop(image: Tensor, size: int | tuple[int, int]) -> Tensor:
    """uint8 (C, H, W) -> float (C, *size) pixels in [0, 1]: resized (bicubic) to cover ``size``,
    then centre-cropped. A float image (multi-band data, already on the [0, 1] scale) keeps its values."""
    th, tw = to_2tuple(size)
    h, w = image.shape[-2:]
    scale = max(th / h, tw / w)  # cover the target, then crop the middle
    resized = v2.functional.resize(
        image, [max(th, round(h * scale)), max(tw, round(w * scale))],
        interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
    )
    cropped = v2.functional.center_crop(resized, [th, tw])
    return cropped.float() / 255.0 if cropped.dtype == torch.uint8 else cropped.float()  # float: multi-band data


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


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0, channels: int | None = None
) -> PILTransform | v2.Compose:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), center-crop ``img_size``, normalise.

    1 or 3 channels (``channels``, default ``len(mean)``): timm's transform on PIL images. Other band
    counts, which PIL cannot hold: the same steps on tensors (uint8 or float32 input).
    """
    if (channels or len(mean)) not in (1, 3):
        scale_size = math.floor(img_size / crop_pct)  # as timm computes it
        return v2.Compose([
            v2.Resize(scale_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])
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
) -> PILTransform | v2.Compose:
    """The fine-tuning recipe from timm's pieces: RandomResizedCrop(``data.crop_scale``, bicubic)
    + flip + RandAugment (``settings.auto_augment``) + normalise + random erasing
    (``settings.reprob``, per-pixel noise). ``data.augment == "none"`` turns all of it off.
    Multi-band images (not 1 or 3 channels) get the same steps on tensors, without RandAugment."""
    from timm.data import create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    from torchvision.transforms import Compose

    if data.augment == "none":
        return eval_transform(data.img_size, mean, std)
    if len(mean) not in (1, 3):  # PIL cannot hold the bands: the tensor steps, without RandAugment
        if settings.auto_augment:
            raise ConfigError(
                f"finetune.auto_augment (RandAugment) works on 1- or 3-channel images, not {len(mean)} bands; "
                "pass --rand-augment none (crops, flips and random erasing stay)"
            )
        return v2.Compose([
            v2.RandomResizedCrop(
                data.img_size, scale=tuple(data.crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.RandomErasing(p=settings.reprob, value="random"),  # per-pixel noise, as timm's re_mode="pixel"
        ])
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
