"""The fast image pipeline: JPEGs decoded after the crop is drawn (at a reduced DCT scale when the crop
allows), uint8 batches normalised where they land; the same determinism contract and, at full scale,
the same pixels as the exact PIL path."""

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.transforms import v2

from openmae.config import AUGMENTATIONS, ConfigError, DataConfig
from openmae.data import (
    BadImageTracker,
    Batch,
    JpegImage,
    PixelBatch,
    build_dataset,
    build_loader,
    collate,
    decode_image,
    open_image,
)
from openmae.transforms import ImageTransform, build_transform, jpeg_reduction, normalize_pixels

PHOTO = skimage.data.astronaut()  # (512, 512, 3)


def jpeg(path: Path, size: tuple[int, int] = (120, 90), mode: str = "RGB", seed: int = 0, **save) -> Path:
    """A JPEG of a random crop of the astronaut photo, resized to ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 200, 2)
    image = Image.fromarray(PHOTO[y : y + 300, x : x + 300]).resize(size, Image.BICUBIC).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90, **save)
    return path


def jpeg_folder(root: Path, count: int = 12, size: tuple[int, int] = (120, 90)) -> Path:
    for k in range(count):
        jpeg(root / f"{k:02d}.jpg", size if k % 3 else size[::-1], seed=k, progressive=k % 4 == 1)
    return root


def folder(root: Path, img_size: int, decode: str = "fast", **kw) -> DataConfig:
    return DataConfig(name="folder", path=str(root), img_size=img_size, decode=decode, num_workers=0, **kw)


def old_compose(cfg: DataConfig, channels: int, mean, std, train: bool) -> v2.Compose:
    """build_transform as it was: one v2.Compose, normalising per sample."""
    size, bicubic = cfg.img_size, v2.InterpolationMode.BICUBIC
    kind = cfg.augment if train else "none"
    if kind in ("rrc", "rrc_jitter"):
        steps = [v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), interpolation=bicubic, antialias=True),
                 v2.RandomHorizontalFlip()]
        if kind == "rrc_jitter":
            steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0))
    elif kind == "crop":
        steps = [v2.Resize(round(size / 0.875), interpolation=bicubic, antialias=True), v2.RandomCrop(size),
                 v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(size, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


# -- the transform -----------------------------------------------------------------------------


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_transform_on_tensors_equals_the_torchvision_compose_draw_for_draw(augment):
    cfg = DataConfig(name="digits", img_size=16, augment=augment)
    gen = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        mean, std = [0.4] * channels, [0.3] * channels
        for train in (True, False):
            new, old = build_transform(cfg, channels, mean, std, train), old_compose(cfg, channels, mean, std, train)
            for shape in ((37, 50), (9, 15)):
                image = torch.randint(0, 256, (channels, *shape), dtype=torch.uint8, generator=gen)
                for seed in range(2):
                    torch.manual_seed(seed)
                    ours, after = new(image), torch.rand(1)
                    torch.manual_seed(seed)
                    theirs, after_theirs = old(image), torch.rand(1)
                    assert torch.equal(ours, theirs) and torch.equal(after, after_theirs)  # same values, same draws


def test_jpeg_reduction_keeps_the_output_resolution():
    assert jpeg_reduction((448, 500), (224, 224)) == 2
    assert jpeg_reduction((447, 500), (224, 224)) == 1  # 223 rows at half scale: too few
    assert jpeg_reduction((2000, 1800), (224, 224)) == 8
    assert jpeg_reduction((1000, 1000), (224, 224)) == 4
    assert jpeg_reduction((10, 10), (224, 224)) == 1  # upsampling: decode in full


def test_normalize_pixels_batched_equals_per_sample():
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    per_sample = torch.stack([normalize_pixels(p, mean, std) for p in pixels])
    assert torch.equal(normalize_pixels(pixels, mean, std), per_sample)
    whole = v2.functional.normalize(v2.functional.to_dtype(pixels, torch.float32, scale=True), list(mean), list(std))
    assert torch.equal(whole, per_sample)  # the one-image-at-a-time CPU path changes nothing
    floats = torch.rand(2, 13, 4, 4)  # multi-band data already on the [0, 1] scale: normalised only
    assert torch.allclose(normalize_pixels(floats, [0.5] * 13, [0.25] * 13), (floats - 0.5) / 0.25)


# -- decoding ----------------------------------------------------------------------------------


def test_fast_decode_equals_pil_at_full_scale_and_reduces_by_powers_of_two(tmp_path):
    path = jpeg(tmp_path / "a.jpg", size=(161, 97))
    image = open_image(path, 3)
    assert isinstance(image, JpegImage) and image.size == (97, 161)
    assert torch.equal(image.decode(1), decode_image(path, 3))
    for k in (2, 4, 8):
        assert image.decode(k).shape == (3, -(-97 // k), -(-161 // k))


def test_grayscale_and_cmyk_jpegs(tmp_path):
    gray = jpeg(tmp_path / "gray.jpg", mode="L")
    for channels in (1, 3):  # a grayscale JPEG: the fast path is exact, as 1 channel or repeated to 3
        fast = open_image(gray, channels)
        assert isinstance(fast, JpegImage) and torch.equal(fast.decode(1), decode_image(gray, channels))
    color = jpeg(tmp_path / "color.jpg")
    luma = open_image(color, 1).decode(1).float()  # a colour JPEG as 1 channel: its Y plane, near PIL's RGB -> L
    assert luma.shape == (1, 90, 120) and (luma - decode_image(color, 1).float()).abs().mean() < 0.5
    cmyk = jpeg(tmp_path / "cmyk.jpg", mode="CMYK")
    assert Image.open(cmyk).mode == "CMYK"
    decoded = open_image(cmyk, 3)  # libjpeg-turbo does not convert CMYK: PIL decodes it, as before
    assert isinstance(decoded, torch.Tensor) and torch.equal(decoded, decode_image(cmyk, 3))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera"  # another tag before it
    exif.endian = ">" if orientation % 2 else "<"  # big- and little-endian TIFF blocks
    path = jpeg(tmp_path / "o.jpg", size=(40, 24), exif=exif.tobytes())
    fast = open_image(path, 3)
    exact = decode_image(path, 3)  # PIL's exif_transpose
    assert isinstance(fast, JpegImage) and fast.size == tuple(exact.shape[-2:])
    assert torch.equal(fast.decode(1), exact)
    assert fast.decode(2).shape[-2:] == (-(-exact.shape[1] // 2), -(-exact.shape[2] // 2))


def test_xmp_orientation_is_honoured_as_pil_reads_it(tmp_path):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    path = jpeg(tmp_path / "x.jpg", size=(40, 24), xmp=xmp)
    fast, exact = open_image(path, 3), decode_image(path, 3)
    assert exact.shape == (3, 40, 24) and fast.size == (40, 24) and torch.equal(fast.decode(1), exact)


def test_bad_jpegs_still_count_as_bad_images(tmp_path):
    root = jpeg_folder(tmp_path / "data", count=5)
    good = (root / "00.jpg").read_bytes()
    (root / "90_truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "91_garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2)
    (root / "92_png_inside.jpg").write_bytes(b"not a jpeg at all")
    ds = build_dataset(folder(root, 16))
    assert [Path(p).name for p in ds.paths[5:]] == ["90_truncated.jpg", "91_garbage.jpg", "92_png_inside.jpg"]
    batch = next(iter(build_loader(ds, batch_size=8, shuffle=False)))
    assert len(batch) == 5 and batch.failed == [5, 6, 7]
    tracker = BadImageTracker(ds)
    tracker.update(batch)
    exact = build_dataset(folder(root, 16, decode="exact"))
    for i in (5, 6, 7):  # the reasons are PIL's, as on the exact path
        assert ds[i][0] is None and exact[i][0] is None
        assert ds.failure_reason(i) == exact.failure_reason(i) != "failed once, loads now (a transient read error?)"


def test_data_libjpeg_turbo_warns_about_goes_to_pil(tmp_path):
    data = jpeg(tmp_path / "a.jpg").read_bytes()
    assert data.endswith(b"\xff\xd9")
    path = tmp_path / "extraneous.jpg"  # junk before the end marker: libjpeg-turbo warns, PIL decodes
    path.write_bytes(data[:-2] + b"\x00" * 7 + b"\xff\xd9")
    fast = open_image(path, 3)
    assert isinstance(fast, JpegImage) and torch.equal(fast.decode(1), decode_image(path, 3))


# -- the dataset and loader --------------------------------------------------------------------


def test_fast_path_is_deterministic_per_seed_epoch_and_index(tmp_path):
    root = jpeg_folder(tmp_path / "data", count=8, size=(160, 120))
    ds = build_dataset(folder(root, 24), seed=3)
    first = [ds[i][0] for i in range(8)]
    assert all(torch.equal(first[i], ds[i][0]) for i in reversed(range(8)))  # any order
    ds.set_epoch(1)
    assert sum(torch.equal(first[i], ds[i][0]) for i in range(8)) < 2
    again = build_dataset(folder(root, 24), seed=3)
    assert all(torch.equal(first[i], again[i][0]) for i in range(8))
    for workers in (0, 2):
        torch.manual_seed(workers)
        before = torch.get_rng_state()
        ds.set_epoch(0)
        seen = {}
        for batch in build_loader(ds, batch_size=4, seed=1, num_workers=workers):
            seen.update(zip(batch.indices.tolist(), batch.images, strict=True))
        assert torch.equal(torch.get_rng_state(), before) and sorted(seen) == list(range(8))
        assert all(torch.equal(seen[i], first[i]) for i in seen)


def test_fast_and_exact_paths_agree(tmp_path):
    root = jpeg_folder(tmp_path / "data", count=12, size=(200, 150))
    for img_size, augment, most in ((96, "rrc", 0.0), (16, "rrc", 10.0), (16, "none", 10.0), (24, "crop", 10.0)):
        fast = build_dataset(folder(root, img_size, augment=augment), seed=2)
        exact = build_dataset(folder(root, img_size, "exact", augment=augment), seed=2)
        diffs = [(fast.sample(i, normalize=False)[0].float() - exact.sample(i, normalize=False)[0].float()).abs()
                 for i in range(len(fast))]
        mean_diff = float(torch.stack(diffs).mean())
        # 96 px crops of 150-200 px images never reduce: the same pixels. At 16 px they decode at 1/2-1/8
        # scale: the crop box moves by under half an output pixel and the resampling differs a little
        # (two random crops of these photos differ by 50-75 levels).
        assert mean_diff <= most, (img_size, augment, mean_diff)
        assert (mean_diff == 0) == (most == 0)


def test_tiny_and_huge_crops(tmp_path):
    big = jpeg(tmp_path / "big" / "a.jpg", size=(1200, 900))
    tiny = DataConfig(name="folder", path=str(big.parent), img_size=32, crop_scale=[0.001, 0.002], num_workers=0)
    fast, exact = build_dataset(tiny), build_dataset(dataclass_replace(tiny, decode="exact"))
    # a crop of ~40 px of a 1200x900 image: decoded in full (a reduction would leave it below 32 px)
    assert torch.equal(fast[0][0], exact[0][0])
    huge = dataclass_replace(tiny, crop_scale=[0.9, 1.0], img_size=16)
    fast, exact = build_dataset(huge), build_dataset(dataclass_replace(huge, decode="exact"))
    decoded = []
    image = open_image(big, 3)
    image.decode = lambda k, decode=image.decode: decoded.append(k) or decode(k)  # a spy on the reduction
    fast.transform.pixels(image)
    assert decoded == [8]  # 900 px rows at 1/8 scale still give the 16 px output 112 rows
    a, b = fast.sample(0, normalize=False)[0].float(), exact.sample(0, normalize=False)[0].float()
    assert a.shape == b.shape == (3, 16, 16) and (a - b).abs().mean() < 6


def dataclass_replace(cfg: DataConfig, **changes) -> DataConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_uint8_batches_normalise_to_the_per_sample_values(tmp_path):
    root = jpeg_folder(tmp_path / "data", count=8)
    ds = build_dataset(folder(root, 16), seed=5)
    assert isinstance(ds.transform, ImageTransform)
    expected = collate([ds[i] for i in range(8)])
    batch = next(iter(build_loader(ds, batch_size=8, shuffle=False, num_workers=2)))
    assert isinstance(batch, PixelBatch) and batch.pixels.dtype == torch.uint8
    on_device = batch.to("cpu")
    assert isinstance(on_device, Batch) and on_device.images.dtype == torch.float32
    assert torch.equal(on_device.images, expected.images) and torch.equal(batch.images, expected.images)
    assert torch.equal(on_device.indices, expected.indices) and torch.equal(on_device.labels, expected.labels)
    if torch.cuda.is_available():
        gpu = batch.pin_memory().to("cuda", non_blocking=True)
        assert torch.allclose(gpu.images.cpu(), expected.images, atol=1e-6)


def test_decode_setting_is_checked():
    with pytest.raises(ConfigError, match="data.decode must be one of fast, exact"):
        DataConfig(decode="turbo")

