"""``openmae sweep``: a 2-value sweep end to end (CSV, figure, baselines), resuming without
retraining, cached baselines, and one-line refusals of bad axes and values.

The sweep is the smallest that runs every part: a 2-block 32-wide MAE on 64 of the 8x8 digits
upsampled to 16 px, one epoch of 2 steps, protocols of one epoch on the same 64 images.
"""

from __future__ import annotations

import csv
import json

import pytest

import openmae.sweep
from openmae.cli import main
from openmae.commands import finetune, knn, linprobe
from openmae.commands import pretrain as pretrain_cmd
from openmae.config import ConfigError
from openmae.sweep import axis_path, format_table, plot_sweep, value_folder

TINY = "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}"
BASE = [
    "--dataset", "digits", "--img-size", "16", "--data.limit", "64", "--data.num_workers", "0",
    "--model", "mae_vit_tiny_patch4", "--model.kwargs", TINY, "--epochs", "1", "--batch-size", "32",
    "--train.precision", "fp32", "--train.progress", "false", "--train.recon_every", "0",
    "--linprobe.epochs", "1", "--linprobe.batch_size", "32", "--finetune.epochs", "1", "--finetune.batch_size", "32",
    "--knn.k", "5",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def sweep(*flags) -> int:
    return main(["sweep", *BASE, *map(str, flags)])


def test_sweep_writes_results_resumes_and_caches_baselines(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert sweep("--axis", "mask_ratio", "--values", "0.25", "0.75", "--output", out) == 0
    table = capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["axis"], r["value"]) for r in rows] == [("mask_ratio", "0.25"), ("mask_ratio", "0.75")]
    for row in rows:
        for protocol in ("linprobe", "knn", "finetune"):
            assert 0 <= float(row[f"{protocol}_top1"]) <= 100 and float(row[f"{protocol}_seconds"]) >= 0
        assert float(row["final_loss"]) > 0 and float(row["pretrain_seconds"]) > 0
    assert (out / "mask_ratio.png").stat().st_size > 0
    baselines = json.loads((out / "baselines.json").read_text())
    assert {"raw_knn", "raw_logreg", "random_knn", "random_linprobe", "scratch_finetune"} <= baselines.keys()
    assert baselines["raw_knn"]["images"] == 64 and baselines["raw_logreg"]["train_images"] == 64
    for line in ("mask_ratio", "0.25", "0.75", "raw pixels", "random init", "from scratch"):
        assert line in table
    # each value's runs come from the settings its folder names
    pretrain = out / "mask_ratio=0.75" / "pretrain"
    assert "mask_ratio: 0.75" in (pretrain / "config.yaml").read_text()
    assert str(pretrain / "model.safetensors") in (out / "mask_ratio=0.75" / "knn" / "metrics.json").read_text()

    # again: the run folders say what is finished, nothing is retrained or re-evaluated, and the
    # baselines are read from baselines.json
    outputs = sorted(p for name in ("model.safetensors", "metrics.json") for p in out.rglob(name))
    assert len(outputs) == 17  # per value 6: pretrain, linprobe and finetune a model each, metrics of 3; baselines 5
    stamps = {p: p.stat().st_mtime_ns for p in outputs}

    def again(*args, **kwargs):
        raise AssertionError("a finished run or a cached baseline was computed again")

    monkeypatch.setattr(openmae.sweep, "raw_pixel_knn", again)
    monkeypatch.setattr(openmae.sweep, "raw_pixel_logreg", again)
    for module, name in [(pretrain_cmd, "run_pretrain"), (linprobe, "run_linprobe"), (knn, "run_knn"),
                         (finetune, "run_finetune")]:
        monkeypatch.setattr(module, name, again)
    assert sweep("--axis", "mask_ratio", "--values", "0.25", "0.75", "--output", out) == 0
    assert capsys.readouterr().out == table
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
    with open(out / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_bad_axes_and_values_are_one_line(tmp_path, cli_fails):
    out = tmp_path / "sweep"
    cases = [
        (["--values", "0.5"], ["sweep.axis is not set", "mask_ratio"]),
        (["--axis", "mask_ration", "--values", "0.5"], ["unknown sweep.axis", "did you mean mask_ratio"]),
        (["--axis", "train.output_dir", "--values", "a"], ["set by the sweep"]),
        (["--axis", "mask_ratio"], ["sweep.values is empty"]),
        (["--axis", "mask_ratio", "--values", "0.5", "1.5"], ["mask_ratio=1.5", "[0, 1)"]),
        (["--axis", "mask_ratio", "--values", "0.5", "0.50"], ["0.5 twice"]),
        (["--axis", "augment", "--values", "rrc", "blur"], ["augment=blur", "data.augment must be one of"]),
        (["--axis", "decoder_depth", "--values", "1", "two"], ["decoder_depth=two", "integer"]),
        (["--axis", "model.kwargs.depht", "--values", "1"], ["model.kwargs.depht=1", "depht"]),
        (["--axis", "epochs", "--values", "1", "--protocols", "linprobe", "svm"], ["unknown svm"]),
        (["--axis", "epochs", "--values", "1", "--linprobe.overrides", "{optim: {base_lr: -1}}"], ["linprobe", "base_lr"]),
        (["--axis", "epochs", "--values", "1", "--resume", "none"], ["drop --resume"]),
    ]
    for flags, expect in cases:
        cli_fails(["sweep", *BASE, "--output", out, *flags], expect)
    assert not out.exists()


def test_axes_and_folders():
    assert axis_path("mask_ratio") == ("model", "mask_ratio")
    assert axis_path("decoder_width") == ("model", "kwargs", "decoder_embed_dim")
    assert axis_path("optim.base_lr") == ("optim", "base_lr")
    assert axis_path("model.kwargs.depth") == ("model", "kwargs", "depth")
    with pytest.raises(ConfigError, match="unknown sweep.axis"):
        axis_path("model.kwargs")
    assert value_folder("norm_pix_loss", False) == "norm_pix_loss=false"
    assert value_folder("data.crop_scale", [0.5, 1.0]) == "data.crop_scale=[0.5,1.0]"
    assert value_folder("model.name", "a/b c") == "model.name=a_b_c"


def test_table_and_figure_of_a_categorical_axis(tmp_path):
    rows = [
        {"axis": "augment", "value": "none", "pretrain_seconds": 10.0, "final_loss": 0.5, "knn_top1": 70.0},
        {"axis": "augment", "value": "rrc", "pretrain_seconds": 11.0, "final_loss": 0.6, "knn_top1": 75.5},
    ]
    baselines = {"raw_knn": {"top1": 80.0}, "random_knn": {"top1": 60.25}}
    table = format_table("augment", rows, ["knn"], baselines)
    assert table.splitlines()[2].split() == ["rrc", "75.50", "11", "0.6000"]
    assert table.splitlines()[-2:] == ["raw pixels   80.00", "random init  60.25"]
    path = plot_sweep(tmp_path / "augment.png", "augment", ["none", "crop", "rrc"], rows, ["knn"], baselines)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
