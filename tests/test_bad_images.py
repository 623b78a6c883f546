"""Bad image folders: linked trees walked once, images refused for their size, the bad-image stop
on small datasets, from the CLI, and under 2-process DDP (gloo) with one rank's images all corrupt."""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmae.config import DataConfig
from openmae.data import BadImageError, ShardedSampler, build_dataset, decode_image, find_images

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--model", "mae_vit_micro_patch4", "--img-size", "16", "--data.num_workers", "0", "--train.epochs", "1",
       "--train.precision", "fp32", "--train.progress", "false", "--train.recon_every", "0"]


def png(path: Path, width: int = 6, height: int = 6, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def corrupt(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(value).integers(0, 256, 200, dtype=np.uint8).tobytes())
    return path


def listed(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in find_images(root)]


# -- each real file once, however the folder is linked ------------------------------------------


def test_symlink_loops_end_and_list_each_file_once(tmp_path):
    root = tmp_path / "root"
    png(root / "a" / "1.png")
    png(root / "b" / "2.png")
    (root / "a" / "up").symlink_to(root)  # a loop back to the root
    (root / "b" / "self").symlink_to(root / "b")  # a loop onto itself
    (root / "x").symlink_to("x")  # a link to itself (ELOOP)
    assert listed(root) == ["a/1.png", "b/2.png"]


def test_second_links_and_hard_links_are_skipped(tmp_path):
    root = tmp_path / "root"
    png(root / "cats" / "1.png", value=1)
    png(root / "cats" / "2.png", value=2)
    (root / "cats" / "again.png").symlink_to(root / "cats" / "1.png")  # a second name for a file
    os.link(root / "cats" / "2.png", root / "cats" / "3.png")  # a hard link: the same inode
    (root / "a_alias").symlink_to(root / "cats")  # sorts first, but the real folder wins
    assert listed(root) == ["cats/1.png", "cats/2.png"]
    ds = build_dataset(DataConfig(path=str(root), img_size=4))
    assert ds.classes == ["cats"]  # a link to a class folder is another name for it, not a class


def test_links_out_of_the_root_are_followed_once(tmp_path):
    shared = tmp_path / "elsewhere"
    png(shared / "s1.png", value=3)
    png(shared / "s2.png", value=4)
    root = tmp_path / "root"
    png(root / "own" / "o.png")
    (root / "ext").symlink_to(shared)
    (root / "ext2").symlink_to(shared)  # the same folder again: skipped
    (root / "own" / "deep").symlink_to(shared)  # and again, deeper
    assert listed(root) == ["ext/s1.png", "ext/s2.png", "own/o.png"]
    ds = build_dataset(DataConfig(path=str(root), img_size=4))
    assert ds.classes == ["ext", "own"] and ds.labels.tolist() == [0, 0, 1]
    assert find_images(root) == find_images(root)  # the same order every time


def test_broken_link_is_listed_and_says_why(tmp_path):
    root = tmp_path / "root"
    png(root / "ok.png")
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    assert listed(root) == ["gone.png", "ok.png"]
    ds = build_dataset(DataConfig(path=str(root), img_size=4))
    assert ds[0][0] is None and ds.failure_reason(0) == "file not found: deleted, or a broken link"


# -- images refused for their size ------------------------------------------------------------


def test_pixel_limit_refuses_with_the_size(tmp_path):
    path = png(tmp_path / "wide.png", width=10, height=6)
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert decode_image(path, 3, max_pixels=60).shape == (3, 6, 10)  # at the limit: fine
        assert decode_image(path, 3, max_pixels=None).shape == (3, 6, 10)
        for limit in (59, 25, 7):  # just above, and above twice the limit (where PIL itself refuses)
            with pytest.raises(BadImageError) as e:
                decode_image(path, 3, max_pixels=limit)
            assert str(e.value) == f"too large: 10 x 6 pixels > limit {limit}; raise --data.max_image_pixels"
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's own setting is left as it was

    ds = build_dataset(DataConfig(path=str(tmp_path), img_size=4, max_image_pixels=59))
    assert ds[0][0] is None
    assert ds.failure_reason(0) == "too large: 10 x 6 pixels > limit 59; raise --data.max_image_pixels"
    assert build_dataset(DataConfig(path=str(tmp_path), img_size=4, max_image_pixels=None))[0][0] is not None


def test_pixel_limit_from_the_cli(tmp_path, cli_fails):
    for k in range(4):
        png(tmp_path / "imgs" / f"{k}.png", width=12, height=10, value=k)
    argv = ["pretrain", "--data", tmp_path / "imgs", *RUN, "--train.batch_size", "2"]
    cli_fails([*argv, "--data.max_image_pixels", "0", "--output", tmp_path / "a"],
              ["data.max_image_pixels must be a positive number of pixels, got 0", "null for no limit"])
    assert not (tmp_path / "a").exists()
    cli_fails([*argv, "--data.max_image_pixels", "100", "--output", tmp_path / "b"],
              ["none of the 4 images tried could be loaded",
               f"{tmp_path / 'imgs' / '0.png'} (too large: 12 x 10 pixels > limit 100; raise --data.max_image_pixels)"])


# -- a small folder of corrupt files, from the CLI ---------------------------------------------


def test_small_corrupt_folder_stops_with_the_files(tmp_path, cli_fails):
    for k in range(3):
        corrupt(tmp_path / "imgs" / f"bad{k}.jpg", value=k)
    for k in range(2):
        png(tmp_path / "imgs" / f"good{k}.png", width=16, height=16, value=k)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    message = cli_fails(
        ["pretrain", "--data", tmp_path / "imgs", *RUN, "--train.batch_size", "2", "--output", out],
        # 4 of the 5 images make an epoch (batch 2), so the verdict comes at its end: 2 or 3 of 4 failed
        ["of 4 images", "could not be loaded, more than data.max_bad_fraction=0.05",
         f"{tmp_path / 'imgs'}/bad", ".jpg (not an image file PIL can read)", "raise --data.max_bad_fraction"],
        keep=[out / "notes.txt", tmp_path / "imgs"],
    )
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists(), message


def test_folder_where_every_image_fails(tmp_path, cli_fails):
    for k in range(3):
        corrupt(tmp_path / "imgs" / f"bad{k}.png", value=k)
    cli_fails(
        ["pretrain", "--data", tmp_path / "imgs", *RUN, "--train.batch_size", "1", "--data.max_bad_fraction", "1",
         "--output", tmp_path / "run"],
        ["none of the 3 images tried could be loaded", "bad0.png (not an image file PIL can read)", "bad2.png",
         "point --data at images PIL can open"],
        keep=[tmp_path / "imgs"],
    )


# -- DDP: two gloo processes, one of them with nothing but corrupt images ----------------------

DDP_TIMEOUT_S = 75  # for both ranks together: two cold torch imports (~10 s on 2 busy cores), then seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank1_corrupt_folder(folder: Path, n: int, batch: int, seed: int) -> list[Path]:
    """n files, where the ones rank 1 of 2 loads in epoch 0 are corrupt; returns those."""
    sampler = ShardedSampler(n, world_size=2, rank=1, seed=seed, batch_size=batch)
    rank1 = set(iter(sampler))
    bad = []
    for i in range(n):
        if i in rank1:
            bad.append(corrupt(folder / f"{i:02d}.png", value=i))
        else:
            png(folder / f"{i:02d}.png", width=16, height=16, value=i)
    return bad


def _run_ddp(argv: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``openmae ARGV`` as ranks 0 and 1 of a gloo group (torchrun's variables, without its agent)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env.pop("OPENMAE_DEBUG", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "openmae", *argv], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[1][-2000:] for p in procs]
        pytest.fail(f"a DDP rank hung (killed after {DDP_TIMEOUT_S} s); stderr tails:\n" + "\n---\n".join(logs))
    return results


@pytest.mark.parametrize("max_bad", ["0.6", "0.05"])
def test_ddp_rank_with_only_corrupt_images(tmp_path, max_bad):
    """High threshold: rank 1 trains on nothing (a zero-weighted stand-in keeps it in every all-reduce)
    and the run completes; low threshold: both ranks stop together with the same message."""
    n, batch, seed = 16, 2, 0
    bad = _rank1_corrupt_folder(tmp_path / "imgs", n, batch, seed)
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(tmp_path / "imgs"), *RUN, "--train.batch_size", str(batch),
            "--train.seed", str(seed), "--train.device", "cpu", "--data.max_bad_fraction", max_bad,
            "--train.log_every", "1", "--output", str(out)]
    ranks = _run_ddp(argv, tmp_path)
    for r in ranks:
        assert "Traceback" not in r.stderr, r.stderr
    if max_bad == "0.6":
        assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == n // (2 * batch)
        images = summary["bad_images"]  # counted over both ranks
        assert (images["images_seen"], images["failed_loads"], images["num_bad_files"]) == (n, n // 2, n // 2)
        assert images["bad_files"] == [str(p) for p in bad]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert len(losses) == summary["steps"] and all(np.isfinite(losses))  # rank 0's losses only
    else:
        assert [r.returncode for r in ranks] == [2, 2], ranks[0].stderr + ranks[1].stderr
        lines = [[line for line in r.stderr.splitlines() if line.startswith("openmae pretrain: error:")]
                 for r in ranks]
        assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1]
        assert "could not be loaded, more than data.max_bad_fraction=0.05" in lines[0][0]
        assert f"{bad[0]} (not an image file PIL can read)" in lines[0][0]
        assert not (out / "model.safetensors").exists()
