"""Swin end to end through the shared commands: SimMIM pretrain -> finetune (partial, eval-only) ->
linprobe -> knn -> embed -> reconstruct -> convert to timm, on a shrunk simmim_swin_micro_patch4_window7
(32 px digits, two stages with 8 x 8 and 4 x 4 grids, window 4), with the engine, evaluation and figures
every other family uses."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import openmae
from openmae.cli import main
from openmae.io import read_safetensors
from openmae.visualize import figure_size
from tests.test_convmae_e2e import _check_accuracy, _metrics  # 128 held-out digits, as here

SHRINK = {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4}
FEATURES = 32  # the last stage's width: 16 x 2
DATA = ["--dataset", "digits", "--img-size", "32", "--data.limit", "128", "--data.num_workers", "0"]
RUN = ["--train.precision", "fp32", "--train.progress", "false", "--train.epochs", "1", "--train.batch_size", "32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("swin") / "pretrain"
    rc = main([
        "pretrain", "--model", "simmim_swin_micro_patch4_window7", "--model.kwargs", json.dumps(SHRINK),
        "--mask-ratio", "0.6", *DATA, *RUN, "--train.output_dir", str(out),
    ])
    assert rc == 0
    return out


def test_pretrain_writes_a_simmim_swin(pretrained):
    model = openmae.load_pretrained(pretrained / "model.safetensors")
    assert model.arch == "simmim_swin_micro_patch4_window7" and list(model.config["depths"]) == [2, 2]
    assert model.grid_size == (4, 4)  # the mask grid: 8-px cells, the encoder's total stride
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    assert (pretrained / "reconstructions" / "epoch_0001.png").exists()


def test_finetune_last_block_then_evaluate(pretrained, tmp_path):
    out = tmp_path / "ft"
    rc = main(["finetune", "--checkpoint", str(pretrained), "--tune-blocks", "1", *DATA, *RUN, "--output", str(out)])
    assert rc == 0
    m = _metrics(out)
    _check_accuracy(m)
    assert m["model"] == "swin_micro_patch4_window7" and m["pool"] == "avg"
    # only the last Swin block of the last stage, the final norm and the head changed
    before = read_safetensors(pretrained / "model.safetensors")[0]
    after = read_safetensors(out / "model.safetensors")[0]
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("layers.1.blocks.1.", "norm.")) for k in changed), sorted(changed)
    rc = main(["finetune", "--eval-only", "--checkpoint", str(out / "model.safetensors"), *DATA, *RUN,
               "--output", str(tmp_path / "ft_eval")])
    assert rc == 0
    again = _metrics(tmp_path / "ft_eval")
    assert (again["top1"], again["top5"]) == (m["top1"], m["top5"])


def test_linprobe_and_knn(pretrained, tmp_path):
    rc = main(["linprobe", "--checkpoint", str(pretrained), *DATA, *RUN, "--output", str(tmp_path / "lp")])
    assert rc == 0
    m = _metrics(tmp_path / "lp")
    _check_accuracy(m)
    assert m["trainable_parameters"] == FEATURES * 10 + 10  # the linear head only (BatchNorm without affine)
    rc = main(["knn", "--checkpoint", str(pretrained), *DATA, "--run.precision", "fp32", "--run.progress", "false",
               "--output", str(tmp_path / "knn")])
    assert rc == 0
    m = _metrics(tmp_path / "knn")
    _check_accuracy(m)
    assert m["pool"] == "avg"  # auto: Swin has no cls token


def test_embed_reconstruct_and_timm(pretrained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    rc = main(["embed", str(folder), "--checkpoint", str(pretrained), "--out", str(tmp_path / "f.safetensors"),
               "--precision", "fp32", "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert read_safetensors(tmp_path / "f.safetensors")[0]["features"].shape == (3, FEATURES)

    figure = tmp_path / "fig.png"
    rc = main(["reconstruct", str(folder), "--checkpoint", str(pretrained / "model.safetensors"),
               "--mask-ratio", "0.6", "--out", str(figure), "--device", "cpu"])
    assert rc == 0
    assert Image.open(figure).size == figure_size(3)

    timm = pytest.importorskip("timm")
    rc = main(["convert", str(pretrained / "model.safetensors"), str(tmp_path / "timm.safetensors"), "--to", "timm"])
    assert rc == 0
    meta = read_safetensors(tmp_path / "timm.safetensors")[1]
    args = json.loads(meta["model_args"])
    theirs = timm.create_model(meta["architecture"], pretrained=False, **args).eval()
    theirs.load_state_dict(read_safetensors(tmp_path / "timm.safetensors")[0], strict=True)
    ours = openmae.load_pretrained(pretrained / "model.safetensors").eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), rtol=0, atol=0)
    # and back: the timm file loads as openmae's Swin classifier
    back = openmae.load_pretrained(tmp_path / "timm.safetensors")
    assert back.arch.startswith("swin_") and back.load_report.missing == []
