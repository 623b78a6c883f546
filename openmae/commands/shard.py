"""``openmae shard``: an image folder written as webdataset tar shards with an index, to stream in training."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openmae.config import REQUIRED, ConfigError, opt

DESCRIPTION = (
    "Write the images of a folder (the folder rules of --data: class subfolders give labels, train/ and val/ give "
    "the splits) as webdataset tar shards DST/train-000000.tar, ... (and DST/val-*.tar), each image's bytes as they "
    "are, with its label as KEY.cls, plus DST/index.json (shards, sample counts, classes, labels). Train from them "
    "with `openmae pretrain --data DST` (or --dataset shards --data DST): each process and loader worker streams "
    "shards of its own. The same folder and settings give the same bytes."
)
EXAMPLES = """examples:
  openmae shard ~/photos shards/photos                                  # 1000 images a shard
  openmae shard /datasets/imagenet shards/imagenet --max-bytes 500000000 # train/ and val/ -> train-*.tar, val-*.tar
  openmae shard ~/photos shards/photos --split-val 0.1 --overwrite     # hold out 10% as the val split
  openmae pretrain --data shards/photos --img-size 64 --model mae_vit_tiny_patch16
"""


@dataclass
class ShardSettings:
    """Settings of ``openmae shard``."""

    src: str = opt(REQUIRED, "image folder (class subfolders, train/ and val/ splits, as for --data)", positional=True)
    dst: str = opt(REQUIRED, "folder to write the shards and index.json to", positional=True)
    shard_size: int = opt(1000, "images per shard, at most")
    max_bytes: int | None = opt(
        None, "image bytes per shard, at most (a larger image gets a shard of its own); null: no limit"
    )
    split_val: float | None = opt(
        None, "hold out this fraction of a folder without train/ and val/ as the val split (seeded by --seed)"
    )
    shuffle: bool = opt(True, "write the training images in a seeded random order, so that each shard mixes classes")
    seed: int = opt(0, "seed of that order and of --split-val's choice")
    overwrite: bool = opt(False, "replace the shards and index already in DST")

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1 image, got {self.shard_size}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be >= 1 byte (null: no limit), got {self.max_bytes}")
        if self.split_val is not None and not 0 < self.split_val < 1:
            raise ConfigError(
                f"--split-val must be a fraction between 0 and 1 (0.1: hold out 10%), got {self.split_val}"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")


def run(s: ShardSettings) -> str:
    out = shard_folder(
        s.src, s.dst, shard_size=s.shard_size, max_bytes=s.max_bytes, split_val=s.split_val, shuffle=s.shuffle,
        seed=s.seed, overwrite=s.overwrite,
    )
    counts = ", ".join(
        f"{n} {split} images in {len(out['shards'][split])} shards" for split, n in out["samples"].items()
    )
    return f"shard: {counts}; {out['index']}"


def shard_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    shard_size: int = 1000,
    max_bytes: int | None = None,
    split_val: float | None = None,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the images under ``src`` as shards in ``dst`` (see ``openmae shard --help``).

    Returns ``{"index", "samples", "shards", "skipped"}``: the index's path, the images written and the
    shard names per split, and ``(path, why)`` of files that could not be read (left out, and listed on
    stderr). Raises ValueError (ConfigError) saying what is wrong with the input, before writing anything.
    """
    from openmae.config import DataConfig
    from openmae.data import build_dataset
    from openmae.shards import INDEX_NAME, SHARD_NAME, ShardIndex, existing_shards, write_split

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        what = "is a file, not a folder" if src.exists() else "does not exist"
        raise ConfigError(f"SRC {src} {what}; give a folder of images")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"DST {dst} is a file; give a folder to write the shards to")
    found = existing_shards(dst)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"DST {dst} already holds shards ({names}); pass --overwrite to replace them, or choose another folder"
        )

    folder = DataConfig(name="folder", path=str(src))
    train = build_dataset(folder, "train", augment=False)  # the folder rules; refuses a folder without images
    has_val = (src / "train").is_dir() and ((src / "val").is_dir() or (src / "test").is_dir())
    splits = {"train": (list(train.paths), train.labels.tolist())}
    if has_val:
        if split_val is not None:
            raise ConfigError(f"SRC {src} has train/ and val/ (or test/) already; drop --split-val")
        test = build_dataset(folder, "test", augment=False)
        splits["val"] = (list(test.paths), test.labels.tolist())
    elif split_val is not None:
        n_val = round(split_val * len(train))
        if not 0 < n_val < len(train):
            raise ConfigError(
                f"--split-val {split_val} of {len(train)} images holds out {n_val}; choose a fraction that leaves "
                "at least one image in each split"
            )
        held = set(np.random.default_rng([seed, 0]).permutation(len(train))[:n_val].tolist())
        paths, labels = splits["train"]
        splits["val"] = ([p for i, p in enumerate(paths) if i in held], [y for i, y in enumerate(labels) if i in held])
        splits["train"] = (
            [p for i, p in enumerate(paths) if i not in held], [y for i, y in enumerate(labels) if i not in held]
        )
    if shuffle:  # shards of one class each would give the shuffle buffer batches of one class
        paths, labels = splits["train"]
        order = np.random.default_rng([seed, 1]).permutation(len(paths)).tolist()
        splits["train"] = ([paths[i] for i in order], [labels[i] for i in order])

    dst.mkdir(parents=True, exist_ok=True)
    (dst / INDEX_NAME).unlink(missing_ok=True)  # no index while shards are replaced: a crash leaves no mixed set
    labelled = train.num_classes > 0
    written, labels_out, skipped = {}, {}, []
    for split, (paths, labels) in splits.items():
        shards, kept, failed = write_split(
            dst, split, paths, labels if labelled and min(labels, default=0) >= 0 else None,
            shard_size=shard_size, max_bytes=max_bytes,
        )
        written[split], labels_out[split] = shards, kept
        skipped += failed
    if not all(written.values()):
        raise ValueError(f"none of the images under {src} could be read: {skipped[0][0]} ({skipped[0][1]}), ...")
    settings = {"shard_size": shard_size, "max_bytes": max_bytes, "split_val": split_val, "shuffle": shuffle}
    record = {"source": str(src.resolve()), **settings, "seed": seed}
    index = ShardIndex(dst, train.classes, written, labels_out, record)
    path = index.write()
    names = {s.name for shards in written.values() for s in shards}
    for stale in dst.iterdir():  # shards of an earlier, larger set
        if SHARD_NAME.match(stale.name) and stale.name not in names:
            stale.unlink()
    for file, why in skipped:
        print(f"left out (cannot be read): {file} ({why})", file=sys.stderr)
    return {
        "index": str(path),
        "samples": {split: index.samples(split) for split in written},
        "shards": {split: [s.name for s in shards] for split, shards in written.items()},
        "skipped": skipped,
    }
