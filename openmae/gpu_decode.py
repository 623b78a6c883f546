"""JPEG batches decoded on the training device (``--data.decode gpu``): nvJPEG on CUDA, batched.

Loader workers stop short of decoding: for a JPEG they read the file's bytes and draw the sample's
random crop, flip and jitter (:func:`draw_plan`: the draws :meth:`ImageTransform.pixels` makes, in its
order, from the generator the dataset seeded for this sample), so the determinism contract of
openmae.data holds unchanged. The main process then decodes the whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call and crops, resizes, flips and jitters each image
there (:func:`apply_plan`), with torchvision's functions on the device's tensors.

Everything else (PNG, WebP, TIFF, CMYK JPEGs, multi-band files) is decoded and transformed in the workers
as ``decode fast`` does, and travels as uint8 pixels beside the bytes. A JPEG the device refuses is decoded
on the CPU (libjpeg-turbo through torchvision, then the dataset's own fallback, PIL); one nothing decodes
is reported as failed. Decoding runs on any device, so the same code is tested on the CPU.

The output is close to, not equal to, the CPU pipeline's: nvJPEG's IDCT and chroma upsampling differ from
libjpeg-turbo's by a level or two, and ``decode fast`` decodes at a reduced DCT scale where the crop allows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _torchvision_decode_jpeg
from torchvision.transforms import v2

from openmae.transforms import ImageTransform, shorter_side_to

BICUBIC = v2.InterpolationMode.BICUBIC
_JITTER = v2.ColorJitter()  # applies drawn parameters; its own ranges are never used


class EncodedJpeg(Protocol):
    """A JPEG a loader worker opened without decoding it (openmae.data's ``JpegImage``)."""

    data: bytes  # the file
    orientation: int  # EXIF orientation, 1-8
    gray: bool  # decode to 1 channel (luma) rather than RGB
    fallback: Callable[[], Tensor]  # the dataset's exact decode, (C, H, W) uint8 upright; raises when it cannot

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the upright image."""
        ...


@dataclass(frozen=True)
class Plan:
    """One sample's drawn geometry, in the upright image's full-scale pixels.

    RandomResizedCrop: ``box`` (top, left, height, width) resized to (size, size). Otherwise the image is
    resized to ``resize`` (h, w) and cropped at ``crop`` (top, left), or at the centre when ``crop`` is None.
    """

    size: int
    box: tuple[int, int, int, int] | None = None
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = False
    jitter: dict[str, Any] | None = None  # torchvision ColorJitter parameters


def _shape_only(size: tuple[int, int]) -> Tensor:
    """A (1, H, W) tensor that allocates nothing: torchvision's crop draws read only the shape."""
    return torch.empty(()).expand(1, *size)


def draw_plan(transform: ImageTransform, size: tuple[int, int]) -> Plan:
    """The random draws ``transform.pixels`` makes for an image of upright ``size`` (H, W), in the same order
    from the same (already seeded) generator: crop box, then flip, then jitter. Decodes nothing."""
    box = resize = crop = None
    if transform.resized_crop is not None:
        p = transform.resized_crop.make_params([_shape_only(size)])
        box = (p["top"], p["left"], p["height"], p["width"])
    else:
        resize = shorter_side_to(size, transform.resize_to)
        if transform.random_crop is not None:
            p = transform.random_crop.make_params([_shape_only(resize)])
            crop = (p["top"], p["left"])
    # RandomHorizontalFlip keeps the image when torch.rand(1) >= p
    flip = transform.flip is not None and bool(torch.rand(1) < transform.flip.p)
    jitter = transform.jitter.make_params([]) if transform.jitter is not None else None
    return Plan(transform.size, box, resize, crop, flip, jitter)


def apply_plan(image: Tensor, plan: Plan) -> Tensor:
    """uint8 (C, H, W) upright image, on any device -> uint8 (C, plan.size, plan.size), as
    ``ImageTransform.pixels`` transforms it with these draws."""
    out = [plan.size, plan.size]
    if plan.box is not None:
        image = v2.functional.resized_crop(image, *plan.box, out, interpolation=BICUBIC, antialias=True)
    else:
        image = v2.functional.resize(image, list(plan.resize), interpolation=BICUBIC, antialias=True)
        image = v2.functional.crop(image, *plan.crop, *out) if plan.crop else v2.functional.center_crop(image, out)
    if plan.flip:
        image = v2.functional.horizontal_flip(image)
    if plan.jitter is not None:
        image = _JITTER.transform(image, plan.jitter)
    return image


def upright(image: Tensor, orientation: int) -> Tensor:
    """(C, H, W) as stored -> as PIL's ``exif_transpose`` turns an image of EXIF ``orientation`` (1-8)."""
    if orientation in (5, 6, 7, 8):  # transpose, rotate 270, transverse, rotate 90: all swap H and W
        image = image.transpose(-1, -2)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


@dataclass(frozen=True)
class _Jpeg:
    """A JPEG in an :class:`EncodedImages`: its bytes are ``data[start:end]`` of the batch's buffer."""

    position: int  # in the batch
    start: int
    end: int
    orientation: int
    gray: bool
    plan: Plan
    fallback: Callable[[], Tensor]


@dataclass
class EncodedImage:
    """A sample as a worker hands it over: a JPEG's bytes with its drawn :class:`Plan`."""

    jpeg: EncodedJpeg
    plan: Plan


def encode(transform: ImageTransform, image: Tensor | EncodedJpeg) -> Tensor | EncodedImage:
    """A worker's half of ``transform.pixels``: a JPEG leaves undecoded with its draws; a decoded image
    (any other file) is transformed here. Call it under the sample's seeded generator."""
    if isinstance(image, Tensor):
        return transform.pixels(image)
    return EncodedImage(image, draw_plan(transform, image.size))


@dataclass
class EncodedImages:
    """A batch's images between the workers and the device: the JPEGs' bytes back to back in one buffer (one
    shared-memory transfer, one pinned copy), and the images the workers decoded, stacked."""

    data: Tensor  # (bytes,) uint8
    jpegs: list[_Jpeg]
    pixels: Tensor  # (M, C, size, size): the others, uint8 (float32 for multi-band data)
    pixel_positions: list[int]

    def __len__(self) -> int:
        return len(self.jpegs) + len(self.pixel_positions)

    @classmethod
    def collect(cls, items: Sequence[Tensor | EncodedImage]) -> EncodedImages:
        """From :func:`encode`'s outputs, in batch order."""
        chunks, jpegs, pixels, pixel_positions, start = [], [], [], [], 0
        for position, item in enumerate(items):
            if isinstance(item, Tensor):
                pixels.append(item)
                pixel_positions.append(position)
                continue
            jpeg = item.jpeg
            chunks.append(jpeg.data)
            end = start + len(jpeg.data)
            jpegs.append(_Jpeg(position, start, end, jpeg.orientation, jpeg.gray, item.plan, jpeg.fallback))
            start = end
        data = (
            torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
            if chunks
            else torch.empty(0, dtype=torch.uint8)
        )
        stacked = torch.stack(pixels) if pixels else torch.empty(0, dtype=torch.uint8)
        return cls(data, jpegs, stacked, pixel_positions)

    def pin_memory(self) -> EncodedImages:
        """The buffers in page-locked memory: nvJPEG reads the bytes from there, the pixels copy without a stall."""
        return dataclasses.replace(self, data=_pinned(self.data), pixels=_pinned(self.pixels))

    def decode(self, device: torch.device | str) -> tuple[Tensor, list[int]]:
        """(pixels, failed): the batch's images as uint8 (N', C, size, size) on ``device`` in batch order, and
        the batch positions of the N - N' JPEGs nothing could decode (left out of ``pixels``).

        The JPEGs are decoded in one batched call per colour mode (nvJPEG on CUDA), then each is turned upright
        and transformed by its plan; the workers' images are copied over (non-blocking from pinned memory).
        """
        device = torch.device(device)
        out: dict[int, Tensor] = {}
        failed: list[int] = []
        for gray in (False, True):
            group = [j for j in self.jpegs if j.gray == gray]
            if not group:
                continue
            for jpeg, image in zip(group, self._decode_group(group, device)):
                if image is None:
                    failed.append(jpeg.position)
                else:
                    out[jpeg.position] = apply_plan(image, jpeg.plan)
        if self.pixel_positions:
            moved = self.pixels.to(device, non_blocking=self.pixels.is_pinned())
            out.update(zip(self.pixel_positions, moved))
        if not out:
            return torch.empty(0, 0, 0, 0, dtype=torch.uint8, device=device), sorted(failed)
        return torch.stack([out[p] for p in sorted(out)]), sorted(failed)

    def _decode_group(self, group: list[_Jpeg], device: torch.device) -> list[Tensor | None]:
        """Each JPEG of ``group`` (all of one colour mode) decoded upright on ``device``; None for one that no
        decoder reads."""
        mode = ImageReadMode.GRAY if group[0].gray else ImageReadMode.RGB
        files = [self.data[j.start : j.end] for j in group]
        try:
            decoded = decode_jpeg(files, mode=mode, device=device)
        except RuntimeError:  # the batched call gives no partial result: find the file(s) it refused
            return [_decode_one(file, jpeg, mode, device) for file, jpeg in zip(files, group)]
        return [upright(image, jpeg.orientation) for image, jpeg in zip(decoded, group)]


def _pinned(tensor: Tensor) -> Tensor:
    return tensor.pin_memory() if tensor.numel() else tensor  # an empty part (no JPEG, no other file) stays


def decode_jpeg(data: Tensor | list[Tensor], mode: ImageReadMode, device: torch.device) -> Tensor | list[Tensor]:
    """torchvision's ``decode_jpeg`` (CPU uint8 bytes in; nvJPEG on CUDA, libjpeg-turbo on the CPU), without its
    DeprecationWarning on every call: torchvision 0.29 deprecates its image decoders in favour of TorchCodec
    (``torchcodec.decoders.decode_jpeg``), which openmae does not depend on; this is the one call to move."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torchvision_decode_jpeg(data, mode=mode, device=device)


def _decode_one(file: Tensor, jpeg: _Jpeg, mode: ImageReadMode, device: torch.device) -> Tensor | None:
    """One JPEG, upright on ``device``: decoded there, else by libjpeg-turbo on the CPU, else by the dataset's
    own fallback (PIL, which reads some damaged files that libjpeg-turbo refuses); None when none of them can."""
    for where in dict.fromkeys([device, torch.device("cpu")]):
        try:
            return upright(decode_jpeg(file, mode=mode, device=where), jpeg.orientation).to(device)
        except RuntimeError:
            continue
    try:
        return jpeg.fallback().to(device)  # upright already
    except ValueError:  # openmae.data.BadImageError: the file cannot be used, and the batch reports it
        return None
