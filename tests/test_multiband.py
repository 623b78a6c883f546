"""Images with any number of bands: 13-band uint16 TIFFs and .npy arrays, from reading a file to
pretraining, every evaluation command, embed and a chosen 3-band composite, all through the CLI.

The data are tiny (16 px, 24 training images in two classes whose bands differ in level), the MAE is
32 wide and one block deep, so each run takes a second or two; what is checked is that every step takes
13 bands, scales and normalises them as documented, and refuses what it cannot use in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from openmae.bands import BandFileError, band_statistics, read_bands, to_unit_range
from openmae.cli import main
from openmae.config import ConfigError, DataConfig
from openmae.data import build_dataset, decode_image, labelled_splits
from openmae.reconstruction import MASK_FILL, PANELS, Reconstruction, display_bands

pytestmark = pytest.mark.usefixtures("one_thread")

BANDS = 13
SIZE = 16
TINY = json.dumps(dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))
DATA = ["--data.channels", str(BANDS), "--img-size", str(SIZE), "--data.num_workers", "0"]
TRAIN = ["--epochs", "1", "--batch-size", "8", "--train.precision", "fp32", "--train.progress", "false"]


def band_image(rng: np.random.Generator, level: int, shape=(BANDS, SIZE, SIZE)) -> np.ndarray:
    """uint16 bands around ``level`` + 100 per band, as reflectances of a satellite tile might be."""
    offsets = (np.arange(shape[0]) * 100)[:, None, None]
    return (rng.integers(0, 3000, shape) + level + offsets).astype(np.uint16)


def write_tiffs(root: Path, train: int = 12, val: int = 4, bands: int = BANDS) -> Path:
    """ROOT/{train,val}/{dark,bright}/N.tif: uint16 (bands, 16, 16) TIFFs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name, level in (("dark", 1000), ("bright", 20000)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                tifffile.imwrite(folder / f"{i}.tif", band_image(rng, level, (bands, SIZE, SIZE)), photometric="minisblack")
    return root


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory) -> Path:
    return write_tiffs(tmp_path_factory.mktemp("tiffs"))


@pytest.fixture(scope="module")
def pretrained(tiffs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["pretrain", "--data", tiffs, *DATA, *TRAIN, "--model", "mae_vit_micro_patch4", "--model.kwargs", TINY,
            "--train.recon_bands", "3", "2", "1", "--output", out]
    assert main([str(a) for a in argv]) == 0
    return out


# -- reading -------------------------------------------------------------------------------------


def test_integers_scale_by_their_dtype_range_and_floats_stay(tmp_path):
    a = np.array([[0, 65535], [257, 32768]], dtype=np.uint16)
    assert np.allclose(to_unit_range(a), a / 65535.0)
    assert np.allclose(to_unit_range(np.array([-32768, 0, 32767], dtype=np.int16)), [0.0, 32768 / 65535, 1.0])
    floats = np.array([-3.5, 0.25, 1e4], dtype=np.float64)
    assert to_unit_range(floats).dtype == np.float32 and np.allclose(to_unit_range(floats), floats)
    with pytest.raises(BandFileError, match="1 NaN or infinite"):
        to_unit_range(np.array([0.0, np.nan], dtype=np.float32))

    rng = np.random.default_rng(1)
    wide = band_image(rng, 1000)
    tifffile.imwrite(tmp_path / "wide.tif", wide)
    image = read_bands(tmp_path / "wide.tif", BANDS)
    assert image.dtype == torch.float32 and image.shape == (BANDS, SIZE, SIZE)
    assert torch.allclose(image, torch.from_numpy(wide / 65535.0).float())
    narrow = rng.integers(0, 255, (BANDS, 8, 8), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "narrow.tif", narrow)
    # 8-bit bands travel as float32 too, so that a folder mixing 8- and 16-bit files stacks into batches
    as_read = read_bands(tmp_path / "narrow.tif", BANDS)
    assert as_read.dtype == torch.float32 and torch.allclose(as_read, torch.from_numpy(narrow / 255.0).float())


def test_band_axis_follows_the_band_count(tmp_path):
    rng = np.random.default_rng(2)
    chw = rng.random((BANDS, 10, 12)).astype(np.float32)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", chw.transpose(1, 2, 0))
    for name in ("chw", "hwc"):
        assert torch.equal(read_bands(tmp_path / f"{name}.npy", BANDS), torch.from_numpy(chw)), name
    # a TIFF of (H, W, C) written as samples per pixel reads the same
    tifffile.imwrite(tmp_path / "contig.tif", chw.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    assert torch.equal(read_bands(tmp_path / "contig.tif", BANDS), torch.from_numpy(chw))
    # compressed GeoTIFF-style files (LZW needs imagecodecs, a dependency)
    tifffile.imwrite(tmp_path / "lzw.tif", (chw * 1000).astype(np.uint16), compression="lzw")
    assert read_bands(tmp_path / "lzw.tif", BANDS).shape == (BANDS, 10, 12)

    np.save(tmp_path / "cube.npy", np.zeros((BANDS, 5, BANDS), dtype=np.uint8))
    with pytest.raises(BandFileError, match=r"ambiguous: both its first and last axes have 13"):
        read_bands(tmp_path / "cube.npy", BANDS)
    with pytest.raises(BandFileError, match=r"has 12 bands \(shape \(13, 10, 12\)\) but data.channels is 4"):
        read_bands(tmp_path / "chw.npy", 4)
    np.save(tmp_path / "plane.npy", chw[0])
    with pytest.raises(BandFileError, match="has 1 band but data.channels is 13"):
        read_bands(tmp_path / "plane.npy", BANDS)
    with pytest.raises(BandFileError, match="too large: 12 x 10 pixels > limit 100"):
        read_bands(tmp_path / "chw.npy", BANDS, max_pixels=100)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(BandFileError, match="Python objects"):
        read_bands(tmp_path / "objects.npy", 1)


def test_the_one_decoder_dispatches_band_files(tmp_path):
    from PIL import Image

    from openmae.data import BadImageError

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(BadImageError, match=r"\.png file holds 1 or 3 channels, but data.channels is 13"):
        decode_image(tmp_path / "photo.png", BANDS)
    # 1- and 3-channel arrays come back as uint8 like every other such image (floats clipped to [0, 1])
    np.save(tmp_path / "rgb.npy", np.full((6, 6, 3), 0.5, dtype=np.float32))
    rgb = decode_image(tmp_path / "rgb.npy", 3)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 6, 6) and int(rgb[0, 0, 0]) == 128


# -- statistics and the dataset ------------------------------------------------------------------


def test_statistics_are_computed_from_the_training_files_and_used_by_every_split(tiffs):
    cfg = DataConfig(path=str(tiffs), channels=BANDS, img_size=SIZE, num_workers=0)
    train = build_dataset(cfg, "train")
    files = sorted((tiffs / "train").rglob("*.tif"))
    stacked = np.stack([tifffile.imread(f) / 65535.0 for f in files])  # (N, C, H, W)
    assert np.allclose(train.mean, stacked.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(train.std, stacked.std(axis=(0, 2, 3)), atol=1e-6)
    test = build_dataset(cfg, "test", augment=False)
    assert test.mean == train.mean and test.std == train.std  # the held-out split is normalised like training
    image, label, _ = train[0]
    assert image.shape == (BANDS, SIZE, SIZE) and image.dtype == torch.float32 and label in (0, 1)
    # a sample is a pure function of (seed, epoch, index), for float data too
    assert torch.equal(train[3][0], train[3][0])
    # given statistics win; a sample of the files is used once there are more than asked for
    given = build_dataset(DataConfig(path=str(tiffs), channels=BANDS, mean=[0.5], std=[0.25], num_workers=0))
    assert given.mean == (0.5,) * BANDS and given.std == (0.25,) * BANDS
    few = band_statistics(files, BANDS, sample=5)
    assert few != band_statistics(files, BANDS) and few == band_statistics(files, BANDS, sample=5)


def test_evaluation_transforms_take_any_band_count(tiffs):
    from openmae.eval_config import FinetuneData, FinetuneSettings
    from openmae.transforms import finetune_transform

    data = FinetuneData(path=str(tiffs), channels=BANDS, img_size=12, num_workers=0)
    train, test = labelled_splits(data, seed=0, protocol="finetune")
    assert test[0][0].shape == (BANDS, 12, 12) and train.num_classes == 2
    recipe = finetune_transform(
        FinetuneData(path=str(tiffs), channels=BANDS, img_size=12, augment="rrc"), FinetuneSettings(auto_augment=None),
        train.mean, train.std,
    )
    train.transform = recipe
    assert train[1][0].shape == (BANDS, 12, 12) and torch.equal(train[1][0], train[1][0])
    with pytest.raises(ConfigError, match="RandAugment"):
        finetune_transform(
            FinetuneData(path=str(tiffs), channels=BANDS, augment="rrc"), FinetuneSettings(), train.mean, train.std
        )


# -- composites ----------------------------------------------------------------------------------


def test_band_composites_pick_stretch_and_keep_the_mask_grey():
    assert display_bands(13) == (0, 1, 2) and display_bands(2) == (0,) and display_bands(3) == (0, 1, 2)
    assert display_bands(1) == (0,) and display_bands(13, [3, 2, 1]) == (3, 2, 1)
    with pytest.raises(ValueError, match="band 13 out of range: the images have 13 bands, numbered 0 to 12"):
        display_bands(13, [13, 2, 1])
    with pytest.raises(ValueError, match="1 band .gray. or 3"):
        display_bands(13, [1, 2])

    n, r, c, h, w = 2, 1, 5, 8, 8
    panels = torch.rand(n, r, 4, c, h, w) * 0.1  # dim data, as 16-bit reflectances are on [0, 1]
    mask = torch.zeros(n, r, 4, dtype=torch.bool)
    mask[:, :, 1] = True  # the top-right 4x4 patch removed
    panels[:, :, 1] = torch.where(mask[:, :, 1, None, None, None], MASK_FILL, panels[:, :, 0])[:, :, None].squeeze(2)
    rec = Reconstruction(panels, mask, (0.25,), "random", "visible", "described", 0)
    shown = rec.select_bands([4, 0, 2], stretch=False)
    assert torch.equal(shown.panels, panels[:, :, :, [4, 0, 2]]) and "bands 4, 0, 2 of 5 shown as R, G, B" in shown.description
    stretched = rec.select_bands([4, 0, 2])  # stretched by default for 5 bands
    original = stretched.panel("original")
    assert original.min() == 0 and original.max() == 1  # the 2-98% range fills black..white
    masked = stretched.panel("masked")[:, :, :, :4, 4:]
    assert torch.all(masked == MASK_FILL)  # removed patches stay grey, not stretched to white
    visible = PANELS.index("masked")
    assert torch.equal(stretched.panels[:, :, visible, :, 4:, :], original[:, :, :, 4:, :])


# -- end to end ----------------------------------------------------------------------------------


def test_pretraining_records_the_statistics_and_draws_the_chosen_bands(pretrained, tiffs):
    config = yaml.safe_load((pretrained / "config.yaml").read_text())
    train = build_dataset(DataConfig(path=str(tiffs), channels=BANDS, num_workers=0))
    assert config["data"]["channels"] == BANDS
    assert config["data"]["mean"] == list(train.mean) and config["data"]["std"] == list(train.std)
    assert len(config["data"]["mean"]) == BANDS
    assert (pretrained / "reconstructions" / "epoch_0001.png").exists()
    assert json.loads((pretrained / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("protocol", ["knn", "linprobe", "finetune"])
def test_every_evaluation_runs_on_13_bands(protocol, pretrained, tiffs, tmp_path):
    out = tmp_path / protocol
    if protocol == "knn":
        argv = [protocol, "--knn.k", "3", "--run.precision", "fp32", "--run.progress", "false"]
    else:
        argv = [protocol, *TRAIN]
    argv += ["--checkpoint", pretrained, "--data", tiffs, *DATA, "--output", out]
    assert main([str(a) for a in argv]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 8 and 0 <= metrics["top1"] <= 100
    recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert len(recorded["mean"]) == BANDS


def test_embed_and_reconstruct_on_13_bands(pretrained, tiffs, tmp_path):
    from openmae.io import read_safetensors

    argv = ["embed", tiffs / "val", "--checkpoint", pretrained, "--out", tmp_path / "f.safetensors", "--no-progress",
            "--precision", "fp32"]
    assert main([str(a) for a in argv]) == 0
    tensors, meta = read_safetensors(tmp_path / "f.safetensors")
    assert tensors["features"].shape == (8, 32) and len(json.loads(meta["openmae"])["mean"]) == BANDS
    figure = tmp_path / "rec.png"
    argv = ["reconstruct", tiffs / "val" / "dark", "--checkpoint", pretrained / "model.safetensors", "--out", figure,
            "--bands", "3", "2", "1", "--max-images", "2"]
    assert main([str(a) for a in argv]) == 0 and figure.stat().st_size > 0


def test_npy_folders_pretrain(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "data").mkdir()
    for i in range(8):  # (H, W, C) float32 and (C, H, W) int16 side by side
        np.save(tmp_path / "data" / f"{i}.npy", rng.normal(size=(SIZE, SIZE, 5)).astype(np.float32))
        np.save(tmp_path / "data" / f"int{i}.npy", rng.integers(-500, 500, (5, SIZE, SIZE)).astype(np.int16))
    argv = ["pretrain", "--data", tmp_path / "data", "--data.channels", "5", "--img-size", str(SIZE),
            "--data.num_workers", "0", *TRAIN, "--model", "mae_vit_micro_patch4", "--model.kwargs", TINY,
            "--train.recon_every", "0", "--output", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert len(recorded["mean"]) == 5 and all(s > 0 for s in recorded["std"])


# -- bad input -----------------------------------------------------------------------------------


def test_bad_multiband_input_gets_one_line(cli_fails, tiffs, pretrained, tmp_path):
    quick = [*DATA, *TRAIN, "--model", "mae_vit_micro_patch4", "--model.kwargs", TINY, "--output", tmp_path / "o"]
    four = write_tiffs(tmp_path / "four", train=2, val=1, bands=4)
    cli_fails(["pretrain", "--data", four, *quick], ["has 4 bands (shape (4, 16, 16)) but data.channels is 13", "per-band statistics"])
    cli_fails(["pretrain", "--data", tiffs, *quick, "--data.augment", "rrc_jitter"], ["rrc_jitter", "13"])
    cli_fails(["pretrain", "--dataset", "digits", "--data.channels", "5"], ["data.channels 5", "digits"])
    cli_fails(["pretrain", "--data", tiffs, "--data.channels", "0"], ["data.channels must be a number of bands >= 1"])
    cli_fails(["pretrain", "--data", tiffs, *quick, "--train.recon_bands", "13"], ["band 13 out of range"])
    cli_fails(["finetune", "--data", tiffs, *DATA, "--data.augment", "rrc", "--output", tmp_path / "f"], ["RandAugment"])
    rec = ["reconstruct", tiffs / "val" / "dark", "--checkpoint", pretrained / "model.safetensors", "--out",
           tmp_path / "r.png"]
    cli_fails([*rec, "--bands", "3", "2", "13"], ["--bands", "band 13 out of range", "numbered 0 to 12"])
    cli_fails([*rec, "--bands", "3", "2"], ["--bands takes 1 band (gray) or 3"])
    cli_fails(["reconstruct", four / "val" / "dark", *rec[2:]], ["has 4 bands (shape (4, 16, 16)) but data.channels is 13"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.png").exists()
