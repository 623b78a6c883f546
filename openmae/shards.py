"""Webdataset tar shards: writing them, their index, and reading them back, by position or streamed with
each rank and loader worker on its own shards in a seeded order that a resumed run continues exactly.

The format is webdataset's, so its readers load these shards too: ``DST/{split}-{n:06d}.tar`` for the
splits ``train`` and ``val``; sample ``i`` of a split is the member ``{key}.{ext}``, the image file's
bytes as they were under its own extension, and, when the split is labelled, ``{key}.cls``, its label
as decimal text. The key is ``i`` in 9 digits (no dot, so webdataset groups the members right).
``DST/index.json`` records, per split, the shards in order with their sample and byte counts, and
the labels; and the class names. So the length of an epoch is known without opening a tar.

Training streams a split (:class:`ShardStream`); its order is computed from the index alone
(:func:`worker_samples`, :func:`rank_order`):

- epoch ``e`` permutes the shards with ``(seed, e)``; rank r of W takes every W-th shard of that order,
  and loader worker w of K every K-th of its rank's (K is capped at the shards a rank gets, so that
  no worker idles);
- a worker reads its shards front to back, once each, and passes the samples through a shuffle
  buffer of ``shuffle_buffer`` samples seeded by ``(seed, e, W, r, K, w)``; the rank's batches come
  from its workers in turn, batch j from worker j mod K, as DataLoader collects them;
- every rank yields ``N // (W * b)`` batches of b, as openmae.data's ShardedSampler does: a worker
  whose shards run out before its share of the epoch starts over on them, and a worker's samples
  past its share wait for another epoch;
- a resumed epoch skips the batches it already did without reading them.

Evaluation reads samples by position (:meth:`ShardReader.read`): a shard's tar headers are scanned once
per process for where each member's bytes lie.
"""

from __future__ import annotations

import bisect
import json
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from openmae.io import atomic_write, atomic_write_text, json_text

INDEX_NAME = "index.json"
FORMAT = "openmae-shards"
VERSION = 1
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)-\d{6,}\.tar$")
LABEL_EXT = "cls"  # webdataset's name for a class label
DEFAULT_SHUFFLE_BUFFER = 1000


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def sample_key(position: int) -> str:
    return f"{position:09d}"


@dataclass(frozen=True)
class Shard:
    """One tar file of a split, as the index records it."""

    name: str  # file name in the shard folder
    samples: int
    bytes: int  # the file's size


# -- the index --------------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """What ``DST/index.json`` records: class names and, per split, the shards in order and the labels.

    Attributes:
        root: the shard folder.
        classes: class names, label = position; [] when the images were unlabelled.
        splits: ``train`` (and ``val``, when written) -> its shards in sample order.
        labels: split -> one label per sample, in order; None for an unlabelled split.
        written: how the shards were made (source folder, settings), for the record.
    """

    root: Path
    classes: list[str]
    splits: dict[str, list[Shard]]
    labels: dict[str, list[int] | None]
    written: dict[str, Any] = field(default_factory=dict)

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.splits.get(split, []))

    def write(self) -> Path:
        """Write ``root/index.json`` (atomically, on one line: it holds a label per sample)."""
        record = {
            "format": FORMAT,
            "version": VERSION,
            "classes": self.classes,
            "splits": {
                split: {
                    "samples": self.samples(split),
                    "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in shards],
                    "labels": self.labels.get(split),
                }
                for split, shards in self.splits.items()
            },
            "written": self.written,
        }
        path = self.root / INDEX_NAME
        atomic_write_text(path, json_text(record) + "\n")
        return path

    @classmethod
    def read(cls, root: str | Path) -> ShardIndex:
        """Read and check ``root/index.json``; raises ValueError saying what is wrong and how to fix it."""
        root = Path(root)
        path = root / INDEX_NAME
        rewrite = f"write the shards again with `openmae shard IMAGES {root} --overwrite`"
        if not path.is_file():
            raise ValueError(
                f"{root} holds no {INDEX_NAME}, so it is not a folder written by `openmae shard`; "
                f"write one with `openmae shard IMAGES {root}`"
            )
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); {rewrite}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{path} is not an openmae shard index (no \"format\": \"{FORMAT}\"); {rewrite}")
        if record.get("version") != VERSION:
            raise ValueError(
                f"{path} has index version {record.get('version')!r}; this openmae reads version {VERSION}: "
                "upgrade openmae, or write the shards again with this one"
            )
        try:
            splits, labels = {}, {}
            for split, entry in record["splits"].items():
                if split not in SPLITS:
                    raise ValueError(f"unknown split {split!r}")
                shards = [Shard(str(s["name"]), int(s["samples"]), int(s["bytes"])) for s in entry["shards"]]
                for s in shards:
                    if not SHARD_NAME.match(s.name) or s.samples < 1:
                        raise ValueError(f"bad shard entry {s}")
                splits[split] = shards
                split_labels = entry.get("labels")
                if split_labels is not None:
                    split_labels = [int(y) for y in split_labels]
                    if len(split_labels) != sum(s.samples for s in shards):
                        raise ValueError(f"{len(split_labels)} labels for {sum(s.samples for s in shards)} samples")
                labels[split] = split_labels
            classes = [str(c) for c in record["classes"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is malformed ({e}); {rewrite}") from None
        return cls(root, classes, splits, labels, dict(record.get("written") or {}))

    def reader(self, split: str, limit: int | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> ShardReader:
        """A reader of ``split`` (``train`` or ``val``), its first ``limit`` samples only if given.

        Refuses a split the index does not hold, and shards listed but missing from the folder.
        """
        shards = self.splits.get(split)
        if not shards:
            if split == "val":
                raise ValueError(
                    f"{self.root} has no val split: its images came from a folder without train/ and val/ "
                    "subfolders; write the shards again from such a folder, or with --split-val 0.1 to hold some out"
                )
            raise ValueError(f"{self.root} has no {split} split; write the shards again with `openmae shard`")
        missing = [s.name for s in shards if not (self.root / s.name).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(
                f"{self.root / INDEX_NAME} lists {missing[0]}{more}, missing from {self.root}; restore them, or "
                f"write the shards again with `openmae shard IMAGES {self.root} --overwrite`"
            )
        labels = self.labels.get(split)
        if limit is not None:
            kept, left = [], limit
            for s in shards:
                if left <= 0:
                    break
                kept.append(Shard(s.name, min(s.samples, left), s.bytes))
                left -= s.samples
            shards = kept
            labels = labels[:limit] if labels is not None else None
        return ShardReader(self.root, shards, labels, self.classes if labels is not None else [], shuffle_buffer)


def existing_shards(root: str | Path) -> list[Path]:
    """The index and the shard files already in ``root`` (sorted; [] when it is not a folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name == INDEX_NAME or SHARD_NAME.match(p.name))


# -- writing ----------------------------------------------------------------------------------------


def write_split(
    root: str | Path,
    split: str,
    files: Sequence[str | Path],
    labels: Sequence[int] | None = None,
    *,
    shard_size: int = 1000,
    max_bytes: int | None = None,
) -> tuple[list[Shard], list[int] | None, list[tuple[str, str]]]:
    """Write ``files`` in order as the shards ``root/{split}-NNNNNN.tar``, their bytes as they are.

    A shard closes at ``shard_size`` samples, or before a file that would take its image bytes past
    ``max_bytes`` (a larger file gets a shard alone). Each shard is written atomically, with fixed
    owner, mode and time stamps, so the same files give the same bytes.

    Returns the shards, the labels of the samples written (None when ``labels`` is None) and, for the
    files that could not be read and were left out, ``(path, why)``.
    """
    from webdataset import TarWriter

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    root = Path(root)
    skipped: list[tuple[str, str]] = []
    kept_labels: list[int] = []

    def readable() -> Iterator[tuple[bytes, str, int]]:
        for n, path in enumerate(files):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                skipped.append((str(path), e.strerror or str(e)))
                continue
            yield data, Path(path).suffix.lower().lstrip("."), -1 if labels is None else int(labels[n])

    samples = readable()
    pending = next(samples, None)
    position = 0
    shards: list[Shard] = []
    while pending is not None:
        count = 0

        def write(tmp: str) -> None:
            nonlocal pending, position, count
            size = 0
            with open(tmp, "wb") as f:
                sink = TarWriter(f, user="", group="", mode=0o444, encoder=False, mtime=0)
                while pending is not None and count < shard_size:
                    data, ext, label = pending
                    if count and max_bytes is not None and size + len(data) > max_bytes:
                        break
                    sample = {"__key__": sample_key(position), ext: data}
                    if labels is not None:
                        sample[LABEL_EXT] = str(label).encode()
                        kept_labels.append(label)
                    sink.write(sample)
                    count, size, position = count + 1, size + len(data), position + 1
                    pending = next(samples, None)
                sink.close()

        path = root / shard_name(split, len(shards))
        atomic_write(path, write)
        shards.append(Shard(path.name, count, path.stat().st_size))
    return shards, (kept_labels if labels is not None else None), skipped


# -- reading ----------------------------------------------------------------------------------------


def _images(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(key, member) of each sample's image, in tar order: every file member but the labels."""
    for info in tar:
        key, _, ext = info.name.partition(".")
        if info.isfile() and ext != LABEL_EXT:
            yield key, info


class ShardReader:
    """One split of a shard folder, sample by sample; sample ``i`` is the one with key ``i``.

    :meth:`read` reads one sample wherever it lies (evaluation); :meth:`stream` reads a sequence of
    samples front to back through their shards (training, see :class:`ShardStream`).

    Attributes:
        root: the shard folder; shards: the split's shards in order (the last cut short by a limit).
        counts, starts: samples per shard, and the position of each shard's first sample.
        labels: one int per sample, -1 throughout when the split is unlabelled; classes: their names.
        shuffle_buffer: samples each loader worker shuffles among when streaming.
    """

    def __init__(
        self,
        root: str | Path,
        shards: Sequence[Shard],
        labels: Sequence[int] | None,
        classes: Sequence[str],
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 sample (1: the shards' own order), got {shuffle_buffer}")
        self.root = Path(root)
        self.shards = list(shards)
        self.counts = [s.samples for s in self.shards]
        self.starts = [0, *np.cumsum(self.counts).tolist()][:-1]
        self.labels = list(labels) if labels is not None else [-1] * sum(self.counts)
        self.classes = list(classes)
        self.shuffle_buffer = shuffle_buffer
        self._tables: dict[int, tuple[list[tuple[int, int]], str]] = {}  # shard -> (offset, size) per sample, problem
        self._pending: dict[int, bytes | OSError] = {}  # what stream() read for the sample it just yielded

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in that shard) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a split of {len(self)}")
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def names(self) -> list[str]:
        """``SHARD_PATH:KEY`` of every sample, to name the images that fail to decode."""
        return [
            f"{self.root / s.name}:{sample_key(start + k)}"
            for s, start in zip(self.shards, self.starts)
            for k in range(s.samples)
        ]

    def read(self, index: int) -> bytes:
        """Sample ``index``'s bytes: those :meth:`stream` has just read for it, else read now through its
        shard's tar headers (scanned once per shard and process). Raises OSError saying why a sample
        cannot be read (its shard missing, cut short, or not what the index records)."""
        data = self._pending.pop(index, None)
        if isinstance(data, OSError):
            raise data
        if data is not None:
            return data
        shard, k = self.locate(index)
        table, problem = self._table(shard)
        if k >= len(table):
            raise OSError(problem)
        offset, size = table[k]
        path = self.root / self.shards[shard].name
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise OSError(f"{path}: {e.strerror or e}") from None
        if len(data) != size:
            raise OSError(f"{path} ends inside sample {sample_key(index)} (truncated?)")
        return data

    def _table(self, shard: int) -> tuple[list[tuple[int, int]], str]:
        """Where each sample's bytes lie in ``shard``, and why the samples past the table cannot be read."""
        if shard in self._tables:
            return self._tables[shard]
        name, start = self.shards[shard].name, self.starts[shard]
        table: list[tuple[int, int]] = []
        problem = f"{self.root / name} holds fewer samples than {INDEX_NAME} records (truncated or replaced?)"
        try:
            with tarfile.open(self.root / name, "r:") as tar:
                for key, info in _images(tar):
                    if key != sample_key(start + len(table)):
                        problem = self._mismatch(name, key, start + len(table))
                        break
                    table.append((info.offset_data, info.size))
                    if len(table) == self.counts[shard]:
                        break
        except (OSError, tarfile.TarError, EOFError) as e:
            problem = f"{self.root / name}: {getattr(e, 'strerror', None) or e}"
        self._tables[shard] = (table, problem)
        return table, problem

    def _mismatch(self, name: str, key: str, expected: int) -> str:
        return (
            f"{self.root / name} holds sample {key} where {INDEX_NAME} expects {sample_key(expected)}; "
            f"write the shards again with `openmae shard IMAGES {self.root} --overwrite`"
        )

    def stream(self, feed: Sequence[int], emit: Sequence[int]) -> Iterator[int]:
        """Yield ``feed[p]`` for each position p of ``emit``, reading the samples in ``feed``'s order.

        ``feed`` is a sequence of whole shards (sample indices, each shard's in order; a shard may come
        again), and ``emit`` an order of distinct positions in it, such as a shuffle buffer's. Each
        shard is read front to back once per time it comes, skipping samples ``emit`` does not name;
        what is read ahead of its turn waits in memory. The bytes of the sample just yielded wait in
        the reader for :meth:`read`.
        """
        reads = self._read_positions(feed, sorted(emit))
        stash: dict[int, bytes | OSError] = {}
        for p in emit:
            while p not in stash:
                q, data = next(reads)
                stash[q] = data
            index = feed[p]
            self._pending[index] = stash.pop(p)
            yield index
            self._pending.pop(index, None)  # left there if the consumer did not read it

    def _read_positions(self, feed: Sequence[int], wanted: list[int]) -> Iterator[tuple[int, bytes | OSError]]:
        """(p, bytes) for each position p of ``wanted`` (sorted), shard by shard as ``feed`` holds them."""
        i = 0
        while i < len(wanted):
            shard, k = self.locate(feed[wanted[i]])
            first = wanted[i] - k  # where this pass over the shard starts in feed
            ks = []
            while i < len(wanted) and wanted[i] < first + self.counts[shard]:
                ks.append(wanted[i] - first)
                i += 1
            for k, data in self._read_shard(shard, ks):
                yield first + k, data

    def _read_shard(self, shard: int, wanted: list[int]) -> Iterator[tuple[int, bytes | OSError]]:
        """(k, bytes) of the shard's samples ``wanted`` (sorted positions in it), read front to back; a
        sample that cannot be read comes with the OSError saying why."""
        name, start = self.shards[shard].name, self.starts[shard]
        path = self.root / name
        done = 0
        problem = f"{path} holds fewer samples than {INDEX_NAME} records (truncated or replaced?)"
        try:
            with tarfile.open(path, "r:") as tar:
                for k, (key, info) in enumerate(_images(tar)):
                    if k < wanted[done]:
                        continue
                    if key != sample_key(start + k):
                        problem = self._mismatch(name, key, start + k)
                        break
                    yield k, tar.extractfile(info).read()
                    done += 1
                    if done == len(wanted):
                        return
        except (OSError, tarfile.TarError, EOFError) as e:
            problem = f"{path}: {getattr(e, 'strerror', None) or e}"
        for k in wanted[done:]:
            yield k, OSError(problem)


# -- the order of an epoch ------------------------------------------------------------------------


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s permutation of the shards: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def loader_workers(num_shards: int, world_size: int, num_workers: int) -> int:
    """The loader workers a rank runs: ``num_workers``, at most the shards every rank gets (each worker
    streams shards of its own); 0 stays 0 (the main process loads)."""
    return min(num_workers, num_shards // world_size)


def worker_samples(
    counts: Sequence[int],
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    workers: int = 1,
    worker: int = 0,
    seed: int = 0,
    epoch: int = 0,
    buffer: int = DEFAULT_SHUFFLE_BUFFER,
    skip_batches: int = 0,
) -> tuple[list[int], list[int]]:
    """What loader ``worker`` of ``workers`` on ``rank`` reads in ``epoch``, and what it yields.

    Args:
        counts: samples per shard, in index order.
        workers: the rank's loader workers (1 for a loader without worker processes).
        skip_batches: the rank's batches already done (a resumed epoch). A loader's worker w yields the
            rank's batches ``skip_batches + w``, ``+ workers``, ...: those of original worker
            ``(skip_batches + w) mod workers``, which it takes over.
        buffer: the shuffle buffer's size in samples (1: the shards' own order).

    Returns:
        (feed, emit): the sample indices the worker reads, in order (its shards front to back; when they
        hold fewer samples than its share, again from the first, as far as the share needs), and the
        positions in ``feed`` of the samples it yields, in order.
    """
    num_batches = sum(counts) // (world_size * batch_size)
    original = (skip_batches + worker) % workers
    done = (skip_batches + worker) // workers  # batches of the original worker before this loader's first
    share = len(range(original, num_batches, workers)) * batch_size
    mine = shard_order(len(counts), seed, epoch)[rank::world_size][original::workers]
    if share and not mine:
        raise ValueError(f"worker {original} of {workers} on rank {rank} of {world_size} has no shard to read")
    starts = [0, *np.cumsum(counts).tolist()]
    one_pass = [i for s in mine for i in range(starts[s], starts[s] + counts[s])]
    # short of its share, the worker reads its shards again, only as far as the share needs: it yields
    # every sample of feed once, so just the missing number of samples come twice
    feed = (one_pass * -(-share // len(one_pass)))[:share] if len(one_pass) < share else one_pass
    rng = np.random.default_rng([seed, epoch, world_size, rank, workers, original])
    return feed, _shuffle_buffer(len(feed), share, buffer, rng)[done * batch_size :]


def _shuffle_buffer(length: int, count: int, size: int, rng: np.random.Generator) -> list[int]:
    """The first ``count`` positions a buffer of ``size`` lets out of a stream of ``length``: once full,
    each arriving sample takes the place of a random one, which goes out; at the end the rest leave
    in random order. Every draw is made up front, so the cost is one numpy call and a loop."""
    buffer = list(range(min(length, size)))
    draws = rng.integers(0, size, max(0, min(length - size, count))).tolist()
    out = []
    for slot, arriving in zip(draws, range(size, length)):
        out.append(buffer[slot])
        buffer[slot] = arriving
    if len(out) < count:
        out += [buffer[j] for j in rng.permutation(len(buffer)).tolist()[: count - len(out)]]
    return out


def rank_order(
    counts: Sequence[int],
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    buffer: int = DEFAULT_SHUFFLE_BUFFER,
    skip_batches: int = 0,
) -> list[int]:
    """The samples rank ``rank``'s loader yields in ``epoch`` past its first ``skip_batches`` batches,
    in order (``num_workers`` as asked for: :func:`loader_workers` caps it as the loader does)."""
    workers = max(1, loader_workers(len(counts), world_size, num_workers))
    streams = []
    for w in range(workers):
        feed, emit = worker_samples(
            counts, batch_size=batch_size, world_size=world_size, rank=rank, workers=workers, worker=w, seed=seed,
            epoch=epoch, buffer=buffer, skip_batches=skip_batches,
        )
        streams.append(iter([feed[p] for p in emit]))
    num_batches = sum(counts) // (world_size * batch_size) - skip_batches
    return [next(streams[t % workers]) for t in range(max(0, num_batches)) for _ in range(batch_size)]


class ShardStream(IterableDataset):
    """One rank's epoch of a shard split, for a DataLoader with ``batch_size`` and :attr:`workers` workers.

    Yields ``sample(i)`` for the samples :func:`rank_order` names, ``sample`` being the dataset's
    ``__getitem__``, which must read through ``reader.read`` (it then gets the bytes the stream has
    just read). Epochs and resuming as openmae.data's ShardedSampler: ``set_epoch(epoch, skip_batches)``.
    """

    def __init__(
        self,
        sample: Callable[[int], Any],
        reader: ShardReader,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(reader) < world_size * batch_size:
            raise ValueError(
                f"the dataset has {len(reader)} images, fewer than one global batch "
                f"({world_size} ranks x {batch_size}); lower the batch size or use more data"
            )
        if len(reader.shards) < world_size:
            raise ValueError(
                f"{reader.root} holds {len(reader.shards)} shard(s) for {world_size} processes, and each process "
                f"streams shards of its own: write at least {world_size} with `openmae shard --shard-size` "
                f"{-(-len(reader) // world_size)} or less"
            )
        self.sample, self.reader = sample, reader
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.workers = loader_workers(len(reader.shards), world_size, num_workers)
        self.num_batches = len(reader) // (world_size * batch_size)
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; a resumed run skips the ``skip_batches`` local batches it already did."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        feed, emit = worker_samples(
            self.reader.counts, batch_size=self.batch_size, world_size=self.world_size, rank=self.rank,
            workers=workers, worker=worker, seed=self.seed, epoch=self.epoch, buffer=self.reader.shuffle_buffer,
            skip_batches=self.skip_batches,
        )
        for index in self.reader.stream(feed, emit):
            yield self.sample(index)
