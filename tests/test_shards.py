"""Webdataset shards: `openmae shard` writes them and their index, webdataset reads them, each rank and
loader worker streams shards of its own in a (seed, epoch) order that a resumed run continues exactly,
bad images inside shards are counted, and pretraining / probing run from them through the CLI."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.cli import main
from openmae.commands.pretrain import run_pretrain
from openmae.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from openmae.data import BadImageTracker, build_dataset, build_loader
from openmae.io import read_safetensors
from openmae.shards import ShardIndex, ShardStream, rank_order, shard_order, worker_samples

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
              "decoder_num_heads": 2}
RUN = ["--model", "mae_vit_micro_patch4", "--model.kwargs", json.dumps(TINY_MODEL), "--img-size", "16",
       "--train.precision", "fp32", "--train.progress", "false", "--train.batch_size", "4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def image(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> Path:
    """A small photo crop (skimage's astronaut) or random pixels, as PNG or JPEG by the suffix."""
    from skimage import data

    rng = np.random.default_rng(seed)
    if seed % 2:
        photo = data.astronaut()
        y, x = rng.integers(0, 400, 2)
        pixels = photo[y : y + size[0], x : x + size[1]]
    else:
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return path


def labelled_folder(root: Path, train: int = 24, val: int = 8) -> Path:
    """root/train/{cat,dog}/ and root/val/{cat,dog}/, PNGs and JPEGs alternating."""
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            name = f"{i:02d}.{('png', 'jpg')[i // 2 % 2]}"
            image(root / split / ("cat", "dog")[i % 2] / name, seed=i + 100 * (split == "val"))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Shards of 5 images (24 train images: 5 shards, the last of 4; 8 val: 2 shards)."""
    root = tmp_path_factory.mktemp("shards")
    labelled_folder(root / "src")
    assert main(["shard", str(root / "src"), str(root / "dst"), "--shard-size", "5"]) == 0
    return root / "dst"


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


# -- writing ----------------------------------------------------------------------------------------


def test_shards_hold_each_image_as_it_was_with_its_label(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["format"] == "openmae-shards" and index["classes"] == ["cat", "dog"]
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert [s["name"] for s in train["shards"]] == [f"train-{n:06d}.tar" for n in range(5)]
    assert [s["samples"] for s in train["shards"]] == [5, 5, 5, 5, 4] and train["samples"] == 24
    assert [s["samples"] for s in val["shards"]] == [5, 3] and val["samples"] == 8
    assert all(s["bytes"] == (shards / s["name"]).stat().st_size for s in train["shards"] + val["shards"])
    names = members(shards / "train-000000.tar")  # webdataset's layout: KEY.cls and KEY.EXT per sample
    assert len(names) == 10 and names[0] == "000000000.cls" and names[1].rsplit(".", 1)[0] == "000000000"

    # every sample's bytes are a source file's, its label that file's class folder; the val split keeps
    # the folder's order, the train split is shuffled (each shard mixes the classes)
    src = shards.parent / "src"
    by_bytes = {p.read_bytes(): p for p in src.rglob("*.*")}
    for split, n in (("train", 24), ("val", 8)):
        reader = ShardIndex.read(shards).reader(split)
        sources = [by_bytes[reader.read(i)] for i in range(n)]
        assert sorted(sources) == sorted((src / split).rglob("*.*"))
        assert [["cat", "dog"][y] for y in reader.labels] == [p.parent.name for p in sources]
        assert (sources == sorted(sources)) == (split == "val")
        exts = [name.split(".", 1)[1] for name in members(shards / f"{split}-000000.tar") if not name.endswith(".cls")]
        assert exts == [p.suffix.lstrip(".") for p in sources[:5]]  # each image under its own extension


def test_webdataset_reads_them(shards):
    import webdataset as wds

    samples = list(wds.WebDataset(str(shards / "train-{000000..000004}.tar"), shardshuffle=False))
    reader = ShardIndex.read(shards).reader("train")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(24)]
    assert [int(s["cls"]) for s in samples] == reader.labels
    assert [s.get("jpg", s.get("png")) for s in samples] == [reader.read(i) for i in range(24)]


def test_the_same_folder_gives_the_same_bytes_and_overwrite_replaces_them(shards, tmp_path):
    src = shards.parent / "src"
    assert main(["shard", str(src), str(tmp_path / "again"), "--shard-size", "5"]) == 0
    for p in shards.iterdir():
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name
    # fewer, larger shards over the old ones: the old shards past the new set are removed
    assert main(["shard", str(src), str(tmp_path / "again"), "--shard-size", "100", "--overwrite"]) == 0
    left = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert left == ["index.json", "train-000000.tar", "val-000000.tar"]


def test_split_val_max_bytes_and_an_unlabelled_folder(tmp_path, capsys):
    for i in range(10):
        image(tmp_path / "flat" / f"{i}.png", seed=2 * i)  # random pixels: 1,400+ bytes each as PNG
    sizes = [p.stat().st_size for p in sorted((tmp_path / "flat").iterdir())]
    assert main(["shard", str(tmp_path / "flat"), str(tmp_path / "dst"), "--split-val", "0.2",
                 "--max-bytes", str(2 * max(sizes))]) == 0
    assert "8 train images in 4 shards, 2 val images in 1 shards" in capsys.readouterr().out
    index = ShardIndex.read(tmp_path / "dst")
    assert index.classes == [] and index.labels == {"train": None, "val": None}
    assert all(s.samples == 2 for s in index.splits["train"])  # two images fit under max_bytes, three do not
    held = {ShardIndex.read(tmp_path / "dst").reader("val").read(i) for i in range(2)}
    trained = {index.reader("train").read(i) for i in range(8)}
    assert held | trained == {p.read_bytes() for p in (tmp_path / "flat").iterdir()} and not held & trained
    ds = build_dataset(DataConfig(path=str(tmp_path / "dst"), img_size=8))
    assert ds.num_classes == 0 and (ds.labels == -1).all()


# -- the order of an epoch ----------------------------------------------------------------------------


def loader_indices(dataset, **kw) -> list[int]:
    return [i for batch in build_loader(dataset, **kw) for i in batch.indices.tolist()]


def test_each_rank_and_worker_streams_shards_of_its_own(shards):
    ds = build_dataset(DataConfig(path=str(shards), img_size=8, num_workers=0))
    counts, starts = ds.shards.counts, ds.shards.starts
    shard_of = {i: s for s, (start, n) in enumerate(zip(starts, counts)) for i in range(start, start + n)}
    for epoch in range(3):
        seen = []
        for rank in range(2):  # two ranks, simulated: the loader of rank r of 2
            got = loader_indices(ds, batch_size=2, world_size=2, rank=rank, seed=3, epoch=epoch)
            assert len(got) == 24 // (2 * 2) * 2
            seen.append({shard_of[i] for i in got})
            # and each of the rank's two workers its own shards
            feeds = [set(worker_samples(counts, batch_size=2, world_size=2, rank=rank, workers=2, worker=w, seed=3,
                                        epoch=epoch)[0]) for w in range(2)]
            assert not feeds[0] & feeds[1] and {shard_of[i] for i in feeds[0] | feeds[1]} == seen[-1]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))


def test_the_order_is_a_function_of_seed_and_epoch(shards):
    ds = build_dataset(DataConfig(path=str(shards), img_size=8))
    first = loader_indices(ds, batch_size=4, seed=1, epoch=0, num_workers=2)
    assert first == loader_indices(ds, batch_size=4, seed=1, epoch=0, num_workers=2)
    assert first == rank_order(ds.shards.counts, batch_size=4, seed=1, epoch=0, num_workers=2)
    # one reader takes every shard: each image once (two workers hold 14 and 10 for shares of 12)
    assert sorted(loader_indices(ds, batch_size=4, seed=1, epoch=0)) == list(range(24))

    def order(**kw):
        return rank_order(ds.shards.counts, **{"batch_size": 4, "seed": 1, "epoch": 0, "num_workers": 2, **kw})

    assert first != order(epoch=1) and first != order(seed=2)
    # the worker count is part of the order; the shuffle buffer's size too (1: the shards' own order)
    assert first != order(num_workers=0) and first != order(buffer=3)
    counts, starts = ds.shards.counts, ds.shards.starts
    shards_in_order = [i for s in shard_order(5, 1, 0) for i in range(starts[s], starts[s] + counts[s])]
    assert rank_order(counts, batch_size=4, seed=1, epoch=0, buffer=1) == shards_in_order
    assert shard_order(5, 1, 0) != shard_order(5, 1, 1)


def test_resume_skips_exactly_the_batches_done_without_reading_them(shards, monkeypatch):
    ds = build_dataset(DataConfig(path=str(shards), img_size=8))
    for workers, skips in ((0, (1, 2, 7, 11, 12)), (2, (1, 2, 7))):  # with 2 workers: even and odd skips
        full = loader_indices(ds, batch_size=2, seed=5, epoch=1, num_workers=workers)
        for skip in skips:
            resumed = loader_indices(ds, batch_size=2, seed=5, epoch=1, num_workers=workers, skip_batches=skip)
            assert resumed == full[2 * skip :]
    read = []
    real = type(ds.shards)._read_shard

    def counted(self, shard, wanted):
        read.extend(self.starts[shard] + k for k in wanted)
        return real(self, shard, wanted)

    monkeypatch.setattr(type(ds.shards), "_read_shard", counted)
    full = loader_indices(ds, batch_size=2, seed=5, epoch=1)
    read.clear()
    assert loader_indices(ds, batch_size=2, seed=5, epoch=1, skip_batches=4) == full[8:]
    assert sorted(read) == sorted(full[8:])  # the 8 samples skipped were never read


def test_unequal_shards_repeat_only_what_a_share_lacks(shards):
    # 24 samples in shards of 5, 5, 5, 5, 4 over 2 ranks: each rank takes 12, one holds more, one fewer
    counts = ShardIndex.read(shards).reader("train").counts
    for epoch in range(4):
        held = [sum(counts[s] for s in shard_order(5, 0, epoch)[r::2]) for r in range(2)]
        assert sorted(held) in ([10, 14], [9, 15])
        for r in range(2):
            order = rank_order(counts, batch_size=2, world_size=2, rank=r, seed=0, epoch=epoch)
            assert len(order) == 12 and len(set(order)) == min(12, held[r])  # twice: only what the share lacks


def test_too_few_shards_for_the_ranks_is_refused(shards):
    reader = ShardIndex.read(shards).reader("val")  # 2 shards
    with pytest.raises(ValueError, match=r"holds 2 shard\(s\) for 3 processes.*write at least 3"):
        ShardStream(lambda i: i, reader, batch_size=1, world_size=3)
    assert ShardStream(lambda i: i, reader, batch_size=1, world_size=2, num_workers=4).workers == 1


# -- bad images inside shards -------------------------------------------------------------------------


def test_bad_images_inside_shards_are_counted_and_named(tmp_path):
    for i in range(6):
        image(tmp_path / "src" / f"{i}.png", seed=i)
    (tmp_path / "src" / "2.png").write_bytes(b"not an image at all")
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "dst"), "--shard-size", "3", "--no-shuffle"]) == 0
    ds = build_dataset(DataConfig(path=str(tmp_path / "dst"), img_size=8, num_workers=0))
    assert ds[2][0] is None and ds.failure_reason(2) == "not an image file PIL can read"
    tracker = BadImageTracker(ds)
    for batch in build_loader(ds, batch_size=3, seed=0):
        tracker.update(batch)
    summary = tracker.summary()
    assert summary["failed_loads"] == 1
    assert summary["bad_files"] == [f"{tmp_path / 'dst' / 'train-000000.tar'}:000000002"]

    # a shard replaced by another: its samples are bad images, saying why
    first, second = tmp_path / "dst" / "train-000000.tar", tmp_path / "dst" / "train-000001.tar"
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    ds = build_dataset(DataConfig(path=str(tmp_path / "dst"), img_size=8, num_workers=0))
    assert ds[0][0] is None and "holds sample 000000003 where index.json expects 000000000" in ds.failure_reason(0)
    failed = [i for b in build_loader(ds, batch_size=3, seed=0) for i in b.failed]
    assert sorted(failed) == [0, 1, 2]
    first.write_bytes(first_bytes)

    # a shard cut short: its missing samples are bad images, saying why; the others still load
    second.write_bytes(second.read_bytes()[:2000])
    ds = build_dataset(DataConfig(path=str(tmp_path / "dst"), img_size=8, num_workers=0))
    assert ds[3][0] is not None and ds[5][0] is None
    assert ds.failure_reason(5).startswith("cannot be read: ") and "train-000001.tar" in ds.failure_reason(5)
    batches = list(build_loader(ds, batch_size=3, seed=0))
    failed = [i for b in batches for i in b.failed]
    assert sum(len(b) for b in batches) + len(failed) == 6 and 5 in failed


# -- end to end -------------------------------------------------------------------------------------


def tiny_config(out: Path, data: Path, **train) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name="mae_vit_micro_patch4", kwargs=dict(TINY_MODEL)),
        data=DataConfig(path=str(data), img_size=16, num_workers=0, shuffle_buffer=8),
        optim=OptimConfig(warmup_epochs=1),
        train=TrainConfig(**{"epochs": 2, "batch_size": 8, "precision": "fp32", "output_dir": str(out),
                             "progress": False, "recon_every": 0, "log_every": 2, **train}),
    )


@pytest.mark.slow
def test_pretrain_from_shards_resumes_as_if_it_never_stopped(shards, tmp_path):
    straight = run_pretrain(tiny_config(tmp_path / "straight", shards))
    assert straight["steps"] == 6 and straight["bad_images"]["images_seen"] == 48
    run_pretrain(tiny_config(tmp_path / "resumed", shards, max_steps=2, save_every_steps=2))  # stops mid-epoch 0
    assert run_pretrain(tiny_config(tmp_path / "resumed", shards))["steps"] == 6
    a = read_safetensors(tmp_path / "straight" / "model.safetensors")[0]
    b = read_safetensors(tmp_path / "resumed" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pretrain_and_linprobe_from_shards_through_the_cli(shards, tmp_path, capsys):
    out = tmp_path / "pretrain"
    argv = ["pretrain", "--data", str(shards), *RUN, "--train.epochs", "1", "--data.num_workers", "2",
            "--output", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["bad_images"]["failed_loads"] == 0
    assert (out / "reconstructions" / "epoch_0001.png").exists()  # from the held-out (val) shards
    config = (out / "config.yaml").read_text()
    assert "name: shards" in config and "shuffle_buffer: 1000" in config

    probe = tmp_path / "probe"
    assert main(["linprobe", "--checkpoint", str(out), "--dataset", "shards", "--data", str(shards), "--img-size", "16",
                 "--train.epochs", "1", "--train.batch_size", "4", "--train.precision", "fp32", "--train.progress",
                 "false", "--data.num_workers", "0", "--output", str(probe)]) == 0
    metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["images"] == 8 and metrics["steps"] == 6 and 0 <= metrics["top1"] <= 100


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_gets_one_line(shards, tmp_path, cli_fails):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    src = shards.parent / "src"
    cli_fails(["shard", tmp_path / "missing", tmp_path / "o"], ["SRC", "missing does not exist"])
    cli_fails(["shard", tmp_path / "afile", tmp_path / "o"], ["is a file, not a folder"])
    cli_fails(["shard", tmp_path / "empty", tmp_path / "o"], ["no images found in", "empty"])
    cli_fails(["shard", src, tmp_path / "afile"], ["DST", "is a file"])
    cli_fails(["shard", src, shards], ["already holds shards (index.json, train-000000.tar", "--overwrite"],
              keep=[shards])
    cli_fails(["shard", src, tmp_path / "o", "--split-val", "0.1"], ["has train/ and val/", "drop --split-val"])
    cli_fails(["shard", src, tmp_path / "o", "--split-val", "1.5"], ["--split-val must be a fraction"])
    cli_fails(["shard", src, tmp_path / "o", "--shard-size", "0"], ["--shard-size must be >= 1"])
    assert not (tmp_path / "o").exists()

    run = ["pretrain", *RUN, "--output", tmp_path / "run"]
    cli_fails([*run, "--dataset", "shards", "--data", tmp_path / "empty"], ["holds no index.json", "openmae shard"])
    cli_fails([*run, "--dataset", "shards"], ["data.name=shards needs a path"])
    cli_fails([*run, "--data", shards, "--data.channels", "13"], ["shards hold 1- or 3-channel images"])
    cli_fails([*run, "--data", shards, "--data.shuffle_buffer", "0"], ["data.shuffle_buffer must be >= 1"])

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in shards.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "train-000003.tar").unlink()
    cli_fails([*run, "--data", broken], ["lists train-000003.tar, missing from", "--overwrite"])
    (broken / "index.json").write_text("{not json")
    cli_fails([*run, "--dataset", "shards", "--data", broken], ["index.json is not valid JSON"])

    no_val = tmp_path / "no_val"
    assert main(["shard", str(src / "train"), str(no_val)]) == 0
    probe = ["linprobe", "--model", "vit_micro_patch4", "--img-size", "16", "--output", tmp_path / "p"]
    cli_fails([*probe, "--data", no_val], ["has no val split", "--split-val"])
