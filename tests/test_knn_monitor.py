"""The kNN monitor of pretraining (``--train.knn_every``): logged every N epochs and at the end,
refused for data without a labelled held-out split, and without effect on the trained weights.

Runs are tiny MAEs on 64 of the 8x8 digits upsampled to 16 px (2 steps an epoch), a second or two each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmae.cli import main

TINY = "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}"
RUN = [
    "pretrain", "--dataset", "digits", "--img-size", "16", "--data.limit", "64", "--data.num_workers", "0",
    "--model", "mae_vit_tiny_patch4", "--model.kwargs", TINY, "--epochs", "2", "--batch-size", "32",
    "--train.precision", "fp32", "--train.progress", "false", "--train.recon_every", "0", "--train.log_every", "1",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain(*flags) -> int:
    return main([*RUN, *map(str, flags)])


def epoch_records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "epoch_end" in r]


def test_monitor_logs_knn_and_leaves_the_weights_alone(tmp_path):
    assert pretrain("--output", tmp_path / "plain") == 0
    assert pretrain("--output", tmp_path / "knn", "--train.knn_every", "1", "--train.knn_k", "5") == 0
    records = epoch_records(tmp_path / "knn")
    assert [r["epoch_end"] for r in records] == [1, 2]
    assert all(0 < r["knn/top1"] <= r["knn/top5"] <= 100 for r in records)
    summary = json.loads((tmp_path / "knn" / "summary.json").read_text())
    assert summary["knn"]["top1"] == records[-1]["knn/top1"] and summary["knn"]["step"] == 4
    assert summary["knn"]["pool"] == "token" and summary["knn"]["images"] == 64  # data.limit caps knn_limit
    assert list((tmp_path / "knn" / "tb").glob("events.*"))
    assert "knn/top1" not in json.dumps(epoch_records(tmp_path / "plain"))
    # the monitor draws nothing from the training's random streams: the same weights bit for bit
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "knn" / "model.safetensors").read_bytes() == plain


def test_monitor_at_the_end_and_across_a_resume(tmp_path):
    """Stopped after epoch 1 without the monitor, resumed with it every 5 epochs: the run still ends
    evaluated (the last epoch always is), and the flag may change between the two invocations."""
    out = tmp_path / "run"
    assert pretrain("--output", out, "--train.max_steps", "2") == 0
    assert pretrain("--output", out, "--train.knn_every", "5", "--train.knn_limit", "32") == 0
    records = epoch_records(out)
    assert "knn/top1" not in records[0] and "knn/top1" in records[1]
    assert json.loads((out / "summary.json").read_text())["knn"]["memory"] == 32
    # stopped mid-epoch 2 by max_steps: evaluated at the end of the run, into summary.json
    short = tmp_path / "short"
    assert pretrain("--output", short, "--train.max_steps", "3", "--train.knn_every", "5") == 0
    assert "knn/top1" not in json.dumps(epoch_records(short))
    assert json.loads((short / "summary.json").read_text())["knn"]["step"] == 3


def test_monitor_refuses_unlabelled_data(tmp_path, cli_fails):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    cli_fails(
        ["pretrain", "--data", folder, "--img-size", "16", "--model", "mae_vit_tiny_patch4", "--model.kwargs", TINY,
         "--output", out, "--train.knn_every", "1"],
        ["train.knn_every", "no test split"],
    )
    assert not out.exists()
    (folder / "train").mkdir()
    (folder / "val").mkdir()
    for split in ("train", "val"):
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / split / f"{i}.png")
    cli_fails(
        ["pretrain", "--data", folder, "--img-size", "16", "--model", "mae_vit_tiny_patch4", "--model.kwargs", TINY,
         "--output", out, "--train.knn_every", "1"],
        ["train.knn_every", "the kNN monitor needs labelled images"],
    )
    assert not out.exists()


def test_protocols_refuse_the_monitor(tmp_path, cli_fails):
    cli_fails(["linprobe", "--dataset", "digits", "--output", tmp_path / "lp", "--train.knn_every", "1"],
              ["train.knn_every", "pretraining"])
    cli_fails(["pretrain", "--train.knn_limit", "0", "--output", tmp_path / "p"], ["train.knn_limit", ">= 1"])
