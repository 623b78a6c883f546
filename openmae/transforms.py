"""Image transforms: uint8 (C, H, W) tensors in, normalised float32 tensors out.

- :func:`build_transform`: pretraining's recipes (torchvision v2): RandomResizedCrop + flip
  (the paper's), fixed-size crop + flip, optional colour jitter, or the deterministic resize +
  centre crop.
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

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from openmae.config import ConfigError, DataConfig
from openmae.eval_config import FinetuneSettings
from openmae.patches import to_2tuple


def build_transform(
    cfg: DataConfig, channels: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> v2.Compose:
    """uint8 (C, H, W) tensor -> normalised float32 (C, img_size, img_size).

    Args:
        cfg: ``augment``, ``img_size`` and ``crop_scale`` are read from it.
        channels: channel count of the input; saturation jitter needs 3.
        mean, std: per-channel normalisation, ``channels`` values each.
        train: the random ``cfg.augment`` recipe; False gives the deterministic eval transform
            (resize the shorter side to img_size, then center crop), whatever ``cfg.augment`` says.
    """
    size = cfg.img_size
    bicubic = v2.InterpolationMode.BICUBIC
    kind = cfg.augment if train else "none"
    if kind in ("rrc", "rrc_jitter"):  # MAE's pretraining recipe
        steps: list[Callable] = [
            v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if kind == "rrc_jitter":
            steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0))
    elif kind == "crop":
        steps = [
            v2.Resize(round(size / 0.875), interpolation=bicubic, antialias=True),  # the 224/256 eval ratio
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(),
        ]
    else:
        steps = [v2.Resize(size, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


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
