"""--data.decode gpu: workers pass JPEG bytes and drawn crops, the batch is decoded on the device.

The decode runs on any device, so on the CPU it is compared with the exact pipeline (PIL, full size) for the
same seeds: torchvision's libjpeg-turbo and PIL's decode alike, so the pixels agree within a level. On CUDA
(skipped without one) nvJPEG is compared with the CPU within a few levels.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from openmae import gpu_decode, runs
from openmae.cli import main
from openmae.config import DataConfig
from openmae.data import EncodedBatch, PixelBatch, build_dataset, build_loader, collate_encoded, collate_pixels
from openmae.transforms import build_transform
from tests.test_engine import tiny_config

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five photo JPEGs (two turned by their EXIF orientation), one PNG, in two class folders."""
    root = tmp_path_factory.mktemp("jpegs")
    photo = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    for i, orientation in enumerate([1, 1, 6, 3, 1]):
        y, x = rng.integers(0, 200, 2)
        image = Image.fromarray(photo[y : y + 150, x : x + 110])
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        image.save(root / f"c{i % 2}" / f"{i}.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(photo[100:180, 50:140]).save(root / "c0" / "p.png")
    return root


def _pixels(root, decode: str, augment: str = "rrc", channels: int | None = None, epoch: int = 1) -> PixelBatch:
    """Every sample of the folder as one uint8 batch, decoded as ``decode`` says (gpu: on the CPU)."""
    cfg = DataConfig(name="folder", path=str(root), img_size=SIZE, decode=decode, augment=augment, channels=channels)
    dataset = build_dataset(cfg, "train", augment=True, seed=5)
    dataset.set_epoch(epoch)
    samples = [dataset.sample(i, normalize=False) for i in range(len(dataset))]
    mean, std = dataset.transform.mean, dataset.transform.std
    if decode == "gpu":
        return collate_encoded(samples, mean, std).decoded("cpu")
    return collate_pixels(samples, mean, std)


@pytest.mark.parametrize("augment", ["rrc", "crop", "none", "rrc_jitter"])
def test_batched_decode_on_the_cpu_matches_the_cpu_pipeline_for_the_same_seeds(folder, augment):
    exact, gpu = _pixels(folder, "exact", augment), _pixels(folder, "gpu", augment)
    assert gpu.pixels.shape == exact.pixels.shape == (6, 3, SIZE, SIZE) and gpu.pixels.dtype == torch.uint8
    assert gpu.indices.tolist() == exact.indices.tolist() and gpu.labels.tolist() == exact.labels.tolist()
    assert (gpu.pixels.int() - exact.pixels.int()).abs().max() <= 1  # same crops, flips, jitter; decoders agree
    torch.testing.assert_close(gpu.to("cpu").images, exact.images, atol=0.02, rtol=0)


def test_another_epoch_draws_other_crops_and_grayscale_decodes_to_luma(folder):
    assert (_pixels(folder, "gpu", epoch=2).pixels.int() - _pixels(folder, "gpu").pixels.int()).abs().float().mean() > 5
    exact, gpu = _pixels(folder, "exact", channels=1), _pixels(folder, "gpu", channels=1)
    assert gpu.pixels.shape == (6, 1, SIZE, SIZE)
    # libjpeg's luma plane against PIL's RGB -> L, as decode fast reads a colour JPEG as one channel
    assert (gpu.pixels.int() - exact.pixels.int()).abs().float().mean() < 1.5


def test_workers_pass_bytes_and_plans_and_other_formats_decoded(folder):
    cfg = DataConfig(name="folder", path=str(folder), img_size=SIZE, decode="gpu")
    dataset = build_dataset(cfg, "train", augment=True, seed=5)
    batch = next(iter(build_loader(dataset, batch_size=6, shuffle=False, num_workers=1)))  # pickled by a worker
    assert isinstance(batch, EncodedBatch) and len(batch) == 6
    png = [i for i, p in enumerate(dataset.paths) if p.endswith(".png")]
    assert batch.encoded.pixel_positions == png and batch.encoded.pixels.shape == (1, 3, SIZE, SIZE)
    jpeg_bytes = sum(Path(p).stat().st_size for p in dataset.paths if p.endswith(".jpg"))
    assert len(batch.encoded.jpegs) == 5 and batch.encoded.data.numel() == jpeg_bytes
    moved = batch.to("cpu")
    torch.testing.assert_close(moved.images, batch.images)
    assert moved.images.dtype == torch.float32 and moved.indices.tolist() == list(range(6))


def test_a_jpeg_no_decoder_reads_is_listed_as_failed(folder, tmp_path):
    for path in folder.rglob("*"):
        if path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()[:120, :120]).save(buf, "JPEG", quality=90)
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header reads
    gpu, exact = _pixels(tmp_path, "gpu"), _pixels(tmp_path, "exact")
    assert len(gpu) == len(exact) == 6 and gpu.failed == exact.failed == [6]
    assert gpu.indices.tolist() == exact.indices.tolist()
    assert (gpu.pixels.int() - exact.pixels.int()).abs().max() <= 1


def test_draw_plan_makes_the_transforms_draws_in_its_order():
    cfg = DataConfig(name="folder", path=".", img_size=SIZE, augment="rrc_jitter")
    transform = build_transform(cfg, 3, [0.5] * 3, [0.25] * 3, train=True)
    torch.manual_seed(0)
    plan = gpu_decode.draw_plan(transform, (150, 110))
    after_plan = torch.rand(1)
    torch.manual_seed(0)
    transform.pixels(torch.zeros(3, 150, 110, dtype=torch.uint8))
    assert torch.rand(1) == after_plan  # the same number of draws: the next sample's stream is unchanged
    top, left, height, width = plan.box
    assert 0 <= top and top + height <= 150 and 0 <= left and left + width <= 110 and plan.jitter is not None


@pytest.mark.slow
def test_the_engine_decodes_before_counting_failures_and_trains_as_decode_exact(folder, tmp_path, monkeypatch):
    """The training loop on the CPU with the refusal set aside: the same losses as decode exact, and a JPEG that
    only fails when the batch is decoded counted and named as a bad file."""
    data = tmp_path / "data"  # not the runs' parent: their loss curves are images too
    data.mkdir()
    for path in folder.rglob("*"):
        if path.is_file():
            (data / path.name).write_bytes(path.read_bytes())
    (data / "bad.jpg").write_bytes((data / "0.jpg").read_bytes()[:3000])

    class AnyDevice(runs.Trainer):
        def __init__(self, *args, data, **kwargs):
            super().__init__(*args, data=dataclasses.replace(data, decode="fast"), **kwargs)
            self.data = data

    monkeypatch.setattr(runs, "Trainer", AnyDevice)
    summaries = {}
    for decode in ("exact", "gpu"):
        cfg = tiny_config(tmp_path / decode, epochs=1, batch_size=3, recon_every=0)
        cfg.data = DataConfig(name="folder", path=str(data), img_size=16, decode=decode, num_workers=0)
        cfg.data.max_bad_fraction = 0.5
        summaries[decode] = runs.run_pretrain(cfg)
    exact, gpu = summaries["exact"], summaries["gpu"]
    assert gpu["steps"] == exact["steps"] == 2 and gpu["final_loss"] == pytest.approx(exact["final_loss"], abs=1e-5)
    assert gpu["bad_images"]["bad_files"] == exact["bad_images"]["bad_files"] == [str(data / "bad.jpg")]


def test_decode_gpu_without_cuda_is_refused_in_one_line(folder, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    assert main(["pretrain", "--data", str(folder), "--data.decode", "gpu", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error: data.decode gpu" in err and "--data.decode fast" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_nvjpeg_batch_on_cuda_is_close_to_the_cpu_decode(folder):
    cfg = DataConfig(name="folder", path=str(folder), img_size=SIZE, decode="gpu")
    dataset = build_dataset(cfg, "train", augment=True, seed=5)
    batch = next(iter(build_loader(dataset, batch_size=6, shuffle=False, pin_memory=True)))
    on_gpu, on_cpu = batch.decoded("cuda"), batch.decoded("cpu")
    assert on_gpu.pixels.device.type == "cuda" and on_gpu.indices.tolist() == on_cpu.indices.tolist()
    diff = (on_gpu.pixels.cpu().int() - on_cpu.pixels.int()).abs().float()
    assert diff.mean() < 1.5 and diff.max() <= 24  # nvJPEG's IDCT and chroma upsampling differ slightly
    assert batch.to("cuda", non_blocking=True).images.device.type == "cuda"
