import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmae import data
from openmae.config import AUGMENTATIONS, DataConfig
from openmae.data import (
    BadImageTracker,
    Batch,
    ShardedSampler,
    build_dataset,
    build_loader,
    build_transform,
    collate,
    describe_failures,
    read_idx,
)

HAVE_FASHION_MNIST = (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() or (
    data.FASHION_MNIST_DIR / "train-images-idx3-ubyte"
).exists()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def save_png(path: Path, size: int = 12, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(path)
    return path


def save_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="folder", path=str(root), img_size=kw.pop("img_size", 8), **kw)


# -- sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip_and_limit(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / f"x{suffix}", array)
    np.testing.assert_array_equal(read_idx(tmp_path / f"x{suffix}"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / f"x{suffix}", limit=2), array[:2])
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    cfg = DataConfig(path=str(tmp_path), augment="none")
    assert cfg.name == "fashion-mnist"
    ds = build_dataset(cfg, "train", augment=False)
    assert len(ds) == 6 and ds.labels.tolist() == labels.tolist()
    image, label, index = ds[2]
    assert (label, index) == (4, 2)
    # img_size 28 = stored size: the eval transform is the identity up to normalisation
    torch.testing.assert_close(image * 0.3530 + 0.2860, torch.from_numpy(images[2]).float()[None] / 255)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        build_dataset(cfg, "test")


def test_fashion_mnist_missing_tells_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data DIR"):
        build_dataset(DataConfig())


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_shapes_and_labels():
    train = build_dataset(DataConfig(limit=64), "train", seed=0)
    test = build_dataset(DataConfig(limit=32, img_size=32, channels=3), "test")
    assert (len(train), len(test)) == (64, 32)
    assert train.num_classes == 10 and train.classes[9] == "Ankle boot" and train.paths is None
    assert train.channels == 1 and train.mean == (0.2860,) and train.std == (0.3530,)
    image, label, index = train[5]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10 and index == 5
    assert set(train.labels.tolist()) <= set(range(10)) and len(set(train.labels.tolist())) > 5
    assert test[0][0].shape == (3, 32, 32) and test.mean == (0.2860,) * 3
    # the first train label of Fashion-MNIST is 9 (ankle boot); of t10k also 9
    assert train.labels[0] == 9 and test.labels[0] == 9


def test_digits_split_and_stats():
    train = build_dataset(DataConfig(name="digits", img_size=8), "train", augment=False)
    test = build_dataset(DataConfig(name="digits", img_size=8), "test", augment=False)
    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == [str(d) for d in range(10)] and train[0][0].shape == (1, 8, 8)
    assert train.images.max() == 255 and train.images.dtype == np.uint8
    # the documented defaults are this split's pixel statistics
    assert train.images.mean() / 255 == pytest.approx(data.DIGITS_MEAN[0], abs=1e-3)
    assert train.images.std() / 255 == pytest.approx(data.DIGITS_STD[0], abs=1e-3)
    # the split is fixed: it does not move with the run seed, and the two parts are disjoint
    again = build_dataset(DataConfig(name="digits", img_size=8, limit=10), "train", seed=123)
    np.testing.assert_array_equal(again.images, train.images[:10])
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) < 10  # digits has a few exact duplicates


def test_normalisation_overrides():
    ds = build_dataset(DataConfig(name="digits", channels=3, mean=[0.5], std=[0.25, 0.5, 1.0], limit=4))
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.5, 1.0)
    with pytest.raises(ValueError, match="1 or 3 values"):
        build_dataset(DataConfig(name="digits", channels=3, mean=[0.1, 0.2]))


# -- folders -----------------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path):
    save_png(tmp_path / "dog" / "b.png")
    save_png(tmp_path / "cat" / "a.PNG")
    save_png(tmp_path / "dog" / "puppies" / "c.png")
    save_png(tmp_path / "cat" / ".hidden.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset(folder_cfg(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert [Path(p).relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "cat/a.PNG",
        "dog/b.png",
        "dog/puppies/c.png",
    ]
    assert ds.labels.tolist() == [0, 1, 1]
    image, label, index = ds[2]
    assert image.shape == (3, 8, 8) and label == 1 and index == 2
    assert ds.mean == data.IMAGENET_MEAN
    with pytest.raises(ValueError, match="no test split"):
        build_dataset(folder_cfg(tmp_path), "test")


def test_flat_folder_is_unlabelled(tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "sub" / "b.png")
    ds = build_dataset(folder_cfg(tmp_path, channels=1))
    assert ds.classes == [] and ds.num_classes == 0 and ds.labels.tolist() == [-1, -1]
    assert ds[1][1] == -1 and ds[1][0].shape == (1, 8, 8)
    assert len(build_dataset(folder_cfg(tmp_path, limit=1))) == 1
    assert ds.mean == pytest.approx((sum(data.IMAGENET_MEAN) / 3,))


def test_folder_train_val_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for k in range(n):
                save_png(tmp_path / split / cls / f"{k}.png", value=k)
    save_png(tmp_path / "val" / "c" / "0.png")  # a class only the held-out split has
    train, test = build_dataset(folder_cfg(tmp_path), "train"), build_dataset(folder_cfg(tmp_path), "test")
    assert (len(train), len(test)) == (6, 5)
    assert train.classes == test.classes == ["a", "b", "c"]  # one index space for both splits
    assert all("/train/" in p for p in train.paths) and all("/val/" in p for p in test.paths)
    assert test.labels.tolist() == [0, 0, 1, 1, 2]


def test_empty_folder_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match=rf"no images found in {tmp_path}.*\.jpg.*\.tiff"):
        build_dataset(folder_cfg(tmp_path))


def odd_mode_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: must come out white
    rgba[0, 0] = (0, 0, 255, 255)  # one opaque blue pixel
    Image.fromarray(rgba).save(folder / "rgba.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # palette entry 1 (red) is transparent
    palette.save(folder / "palette.png", transparency=1)
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(folder / "cmyk.tif")  # no ink: white
    wide = np.full((4, 4), 128 * 257, dtype=np.uint16)
    wide[0, 0] = 65535
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(np.full((4, 4), 77, dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA").save(
        folder / "la.png"
    )
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize("channels", [1, 3])
def test_odd_image_modes(tmp_path, channels):
    files = odd_mode_images(tmp_path)
    assert Image.open(files["wide"]).mode == "I;16" and Image.open(files["cmyk"]).mode == "CMYK"
    ds = build_dataset(folder_cfg(tmp_path, channels=channels, img_size=4))
    by_name = {Path(p).stem: ds.load(i) for i, p in enumerate(ds.paths)}
    for name, image in by_name.items():
        assert image is not None and image.dtype == torch.uint8 and image.shape == (channels, 4, 4), name
    white = torch.full((channels,), 255, dtype=torch.uint8)
    for name in ("rgba", "palette", "cmyk", "la"):  # transparent or ink-free: white
        assert torch.equal(by_name[name][:, 1, 1], white), name
    assert by_name["wide"][0, 1, 1] == 128 and by_name["wide"][0, 0, 0] == 255  # scaled, not clipped
    assert by_name["gray"][0, 0, 0] == 77
    if channels == 3:
        assert by_name["rgba"][:, 0, 0].tolist() == [0, 0, 255]
    for i in range(len(ds)):
        assert ds[i][0].shape == (channels, 4, 4)


# -- bad files ---------------------------------------------------------------------------------


def test_corrupt_file_is_dropped_and_reported(tmp_path):
    for k in range(23):
        save_png(tmp_path / f"{k:02d}.png", size=4, value=k)
    bad = save_corrupt(tmp_path / "99_broken.jpg")
    ds = build_dataset(folder_cfg(tmp_path, img_size=4))
    assert ds.paths[23] == str(bad)
    image, _, index = ds[23]
    assert image is None and index == 23
    batch = next(iter(build_loader(ds, batch_size=4, shuffle=False, skip_batches=5)))
    assert len(batch) == 3 and batch.failed == [23] and batch.indices.tolist() == [20, 21, 22]
    assert describe_failures(ds, batch.failed) == [str(bad)]
    assert ds.failure_reason(23) == "not an image file PIL can read"
    tracker = BadImageTracker(ds)
    assert tracker.update(batch) == [str(bad)]
    assert tracker.update(batch) == []  # reported once
    assert (tracker.seen, tracker.failed) == (8, [23, 23])
    tracker.check(max_bad_fraction=0.05)  # fewer than 20 images seen: no verdict yet
    summary = tracker.summary()
    assert summary["bad_files"] == [str(bad)] and summary["failed_fraction"] == pytest.approx(0.25)
    assert summary["bad_file_reasons"] == {str(bad): "not an image file PIL can read"}


def test_too_many_bad_files_stop_the_run(tmp_path):
    for k in range(18):
        save_png(tmp_path / f"good{k:02d}.png", size=4, value=k)
    for k in range(2):
        save_corrupt(tmp_path / f"bad{k}.jpg")
    ds = build_dataset(folder_cfg(tmp_path, img_size=4))
    tracker = BadImageTracker(ds)
    for batch in build_loader(ds, batch_size=5, seed=0):
        tracker.update(batch)
    assert tracker.seen == 20 and len(tracker.failed) == 2
    tracker.check(max_bad_fraction=0.1)  # exactly 10%: allowed
    with pytest.raises(data.BadImagesError) as e:
        tracker.check(max_bad_fraction=0.05)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
    assert message.startswith("2 of 20 images (10.0%) could not be loaded, more than data.max_bad_fraction=0.05: ")
    assert f"{tmp_path / 'bad0.jpg'} (not an image file PIL can read), {tmp_path / 'bad1.jpg'} (" in message
    assert message.endswith("; delete or re-encode these files, or raise --data.max_bad_fraction to train on without them")


def test_small_dataset_is_judged_once_seen_and_at_epoch_end(tmp_path):
    save_png(tmp_path / "good.png", size=4)
    for k in range(4):
        save_corrupt(tmp_path / f"bad{k}.jpg")
    ds = build_dataset(folder_cfg(tmp_path, img_size=4))
    tracker = BadImageTracker(ds)
    assert tracker.min_seen == 5  # the whole dataset, not 20 images
    tracker.update(collate([ds[0], ds[4]]))  # bad0.jpg, good.png
    tracker.check(max_bad_fraction=0.05)  # 2 of 5 seen: no verdict yet
    with pytest.raises(data.BadImagesError, match=r"^1 of 2 images \(50.0%\) could not be loaded"):
        tracker.check(max_bad_fraction=0.05, epoch_end=True)
    tracker.update(collate([ds[1], ds[2], ds[3]]))
    with pytest.raises(data.BadImagesError, match=r"^4 of 5 images \(80.0%\).*bad0\.jpg.*bad3\.jpg"):
        tracker.check(max_bad_fraction=0.05)
    tracker.check(max_bad_fraction=0.8)  # at the limit: allowed


def test_nothing_loaded_stops_at_epoch_end_whatever_the_fraction(tmp_path):
    for k in range(7):
        save_corrupt(tmp_path / f"bad{k}.png")
    ds = build_dataset(folder_cfg(tmp_path, img_size=4))
    tracker = BadImageTracker(ds)
    for batch in build_loader(ds, batch_size=3, shuffle=False):
        assert len(batch) == 0
        tracker.update(batch)
    tracker.check(max_bad_fraction=1.0)  # allowed, until the epoch's end
    with pytest.raises(data.BadImagesError) as e:
        tracker.check(max_bad_fraction=1.0, epoch_end=True)
    message = str(e.value)
    assert message.startswith(f"none of the 6 images tried could be loaded: {tmp_path / 'bad0.png'} (not an image")
    assert "bad4.png" in message and "bad5.png" not in message and message.count("(not an image") == 5
    assert " and 1 more; point --data at images PIL can open" in message


def test_counts_of_all_ranks_decide(tmp_path):
    """With ``reduce_sum``, the verdict and the summary use every rank's counts (here: this rank x 2)."""
    for k in range(3):
        save_png(tmp_path / f"good{k}.png", size=4, value=k)
    save_corrupt(tmp_path / "bad.png")
    ds = build_dataset(folder_cfg(tmp_path, img_size=4))
    calls = []

    def twice(t):
        calls.append(t.shape)
        return t * 2

    tracker = BadImageTracker(ds, reduce_sum=twice)
    tracker.update(collate([ds[0], ds[3]]))
    with pytest.raises(data.BadImagesError, match=r"^2 of 4 images \(50.0%\)"):
        tracker.check(max_bad_fraction=0.25)
    assert calls == [(2,), (4,)]  # the counts, then (when stopping) the mask of failed files
    summary = tracker.summary()
    assert (summary["images_seen"], summary["failed_loads"], summary["num_bad_files"]) == (4, 2, 1)


def test_collate_all_failed():
    batch = collate([(None, 0, 4), (None, 1, 7)])
    assert len(batch) == 0 and batch.images.shape == (0, 0, 0, 0) and batch.failed == [4, 7]
    assert batch.labels.dtype == batch.indices.dtype == torch.int64
    assert isinstance(batch, Batch) and len(batch.to("cpu")) == 0


# -- determinism -------------------------------------------------------------------------------


def jitter_digits(seed: int = 0) -> data.ImageDataset:
    return build_dataset(DataConfig(name="digits", channels=3, img_size=12, augment="rrc_jitter", limit=40), seed=seed)


def test_augmentation_is_a_function_of_seed_epoch_index():
    ds = jitter_digits()
    forward = {i: ds[i][0] for i in range(10)}
    backward = {i: ds[i][0] for i in reversed(range(10))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(10))
    assert not torch.equal(forward[0], forward[1])
    ds.set_epoch(1)
    assert sum(torch.equal(forward[i], ds[i][0]) for i in range(10)) < 3  # a crop can repeat by chance
    other_seed = jitter_digits(seed=1)
    assert sum(torch.equal(forward[i], other_seed[i][0]) for i in range(10)) < 3
    ds.set_epoch(0)
    assert torch.equal(ds[3][0], forward[3])


def test_augmentation_independent_of_workers_and_global_rng():
    ds = jitter_digits()
    ds.set_epoch(2)
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    for num_workers in (0, 2):
        torch.manual_seed(num_workers)  # the caller's RNG must neither matter nor move
        before = torch.get_rng_state()
        seen = {}
        for batch in build_loader(ds, batch_size=8, seed=5, num_workers=num_workers, epoch=2):
            seen.update(zip(batch.indices.tolist(), batch.images, strict=True))
        assert torch.equal(torch.get_rng_state(), before)
        assert sorted(seen) == list(range(40))
        assert all(torch.equal(seen[i], expected[i]) for i in seen)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_every_transform_gives_the_requested_size(augment):
    cfg = DataConfig(name="digits", img_size=10, augment=augment)
    for channels in (1, 3):
        transform = build_transform(cfg, channels, [0.5] * channels, [0.5] * channels, train=True)
        out = transform(torch.randint(0, 256, (channels, 15, 9), dtype=torch.uint8))
        assert out.shape == (channels, 10, 10) and out.dtype == torch.float32
    eval_transform = build_transform(cfg, 1, [0.5], [0.5], train=False)
    image = torch.randint(0, 256, (1, 15, 9), dtype=torch.uint8)
    assert torch.equal(eval_transform(image), eval_transform(image))


# -- sampling ----------------------------------------------------------------------------------


def local_batches(sampler: ShardedSampler) -> list[list[int]]:
    order = list(sampler)
    b = sampler.batch_size
    return [order[k : k + b] for k in range(0, len(order), b)]


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_sharding_matches_single_process(world_size, batch_size):
    n, seed, epoch = 53, 7, 3
    single = ShardedSampler(n, 1, 0, seed=seed, batch_size=world_size * batch_size)
    single.set_epoch(epoch)
    reference = local_batches(single)
    assert len(reference) == n // (world_size * batch_size)
    ranks = []
    for rank in range(world_size):
        sampler = ShardedSampler(n, world_size, rank, seed=seed, batch_size=batch_size)
        sampler.set_epoch(epoch)
        assert len(sampler) == len(reference) * batch_size
        ranks.append(local_batches(sampler))
    for k, global_batch in enumerate(reference):
        assert sorted(i for r in range(world_size) for i in ranks[r][k]) == sorted(global_batch)
        for r in range(world_size):
            assert ranks[r][k] == [global_batch[r + j * world_size] for j in range(batch_size)]


def test_sampler_order():
    sampler = ShardedSampler(10, batch_size=3, shuffle=False)
    assert list(sampler) == list(range(9))
    shuffled = ShardedSampler(100, seed=1)
    first = list(shuffled)
    assert sorted(first) == list(range(100)) and first != list(range(100))
    shuffled.set_epoch(1)
    assert list(shuffled) != first
    shuffled.set_epoch(0)
    assert list(shuffled) == first
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedSampler(5, world_size=2, rank=0, batch_size=3)


def test_skip_batches_resumes_mid_epoch():
    sampler = ShardedSampler(40, world_size=2, rank=1, seed=3, batch_size=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip_batches=3)
    assert list(sampler) == full[12:] and len(sampler) == len(full) - 12
    sampler.set_epoch(3)  # the skip belonged to epoch 2 only
    assert len(list(sampler)) == len(full) == len(sampler)

    ds = jitter_digits()
    whole = list(build_loader(ds, batch_size=4, seed=9, epoch=1))
    resumed = list(build_loader(ds, batch_size=4, seed=9, epoch=1, skip_batches=6))
    assert len(resumed) == len(whole) - 6 == 4
    for a, b in zip(whole[6:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


def test_two_rank_loaders_rebuild_the_single_process_batches():
    ds = jitter_digits()
    single = list(build_loader(ds, batch_size=6, seed=4, epoch=1))
    ranks = [list(build_loader(ds, batch_size=3, world_size=2, rank=r, seed=4, epoch=1)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    for k, batch in enumerate(single):
        for r in range(2):
            rows = torch.arange(r, 6, 2)  # rank r's local row j is global row r + 2j
            assert torch.equal(ranks[r][k].indices, batch.indices[rows])
            assert torch.equal(ranks[r][k].images, batch.images[rows])
