"""ConvMAE end to end through the shared commands: pretrain -> finetune (partial) -> linprobe ->
knn -> embed -> reconstruct on a shrunk convmae_tiny_patch16, with the same engine, evaluation and
figures as MAE (issue 6: no forked training script)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import openmae
from openmae.cli import main
from openmae.inference import pooled_features
from openmae.io import read_safetensors
from openmae.models.classifier import classifier_name
from openmae.tasks import freeze_for_tuning
from openmae.visualize import figure_size

# a shrunk convmae_tiny_patch16: 32 px, 2 x 2 stage-3 grid, a few thousand parameters
SHRINK = {
    "embed_dim": [16, 16, 32], "depth": [1, 1, 2], "num_heads": 2,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
}
DATA = [
    "--dataset", "digits", "--img-size", "32", "--data.limit", "128", "--data.num_workers", "0",
]
RUN = ["--train.precision", "fp32", "--train.progress", "false", "--train.epochs", "1", "--train.batch_size", "32"]


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _check_accuracy(metrics: dict) -> None:
    """Accuracies that 128 held-out images can give: whole counts of images, top-1 within top-5."""
    assert metrics["images"] == 128
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    for k in ("top1", "top5"):
        correct = round(metrics[k] * 128 / 100)
        assert metrics[k] == pytest.approx(100 * correct / 128, abs=1e-3), (k, metrics[k])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("convmae") / "pretrain"
    rc = main([
        "pretrain", "--model", "convmae_tiny_patch16", "--model.kwargs", json.dumps(SHRINK),
        *DATA, *RUN, "--train.output_dir", str(out),
    ])
    assert rc == 0
    return out


def test_pretrain_writes_a_convmae(pretrained):
    model = openmae.load_pretrained(pretrained / "model.safetensors")
    assert model.arch == "convmae_tiny_patch16" and list(model.embed_dims) == SHRINK["embed_dim"]
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    assert (pretrained / "reconstructions").is_dir() and (pretrained / "loss_curve.png").is_file()


def test_finetune_last_block_then_evaluate(pretrained, tmp_path):
    out = tmp_path / "ft"
    rc = main([
        "finetune", "--checkpoint", str(pretrained / "model.safetensors"), *DATA, *RUN,
        "--finetune.tune_blocks", "1", "--train.output_dir", str(out),
    ])
    assert rc == 0
    m = _metrics(out)
    _check_accuracy(m)
    assert m["model"] == "convvit_tiny_patch16" and math.isfinite(m["final_loss"])
    # the last stage-3 block, fc_norm and the head train; the conv stages do not
    model = openmae.create_model("convvit_tiny_patch16", **SHRINK, num_classes=10)
    expected = sum(p.numel() for m in (model.blocks3[-1], model.fc_norm, model.head) for p in m.parameters())
    assert m["trainable_parameters"] == expected
    # the saved classifier evaluates with the same protocol
    rc = main([
        "finetune", "--eval-only", "true", "--checkpoint", str(out / "model.safetensors"), *DATA, *RUN,
        "--train.output_dir", str(tmp_path / "ft_eval"),
    ])
    assert rc == 0
    again = _metrics(tmp_path / "ft_eval")
    assert again["eval_only"] and (again["top1"], again["top5"]) == (m["top1"], m["top5"])


def test_linprobe_and_knn(pretrained, tmp_path):
    ckpt = str(pretrained / "model.safetensors")
    rc = main(["linprobe", "--checkpoint", ckpt, "--pool", "avg", *DATA, *RUN, "--train.output_dir", str(tmp_path / "lp")])
    assert rc == 0
    m = _metrics(tmp_path / "lp")
    _check_accuracy(m)
    assert m["trainable_parameters"] == 32 * 10 + 10  # the linear head only (BatchNorm without affine)
    # the saved probe evaluates to the same numbers
    rc = main([
        "linprobe", "--eval-only", "true", "--checkpoint", str(tmp_path / "lp" / "model.safetensors"),
        "--pool", "avg", *DATA, *RUN, "--train.output_dir", str(tmp_path / "lp_eval"),
    ])
    assert rc == 0
    again = _metrics(tmp_path / "lp_eval")
    assert again["eval_only"] and (again["top1"], again["top5"]) == (m["top1"], m["top5"])
    rc = main([
        "knn", "--checkpoint", ckpt, "--pool", "avg", *DATA, "--run.precision", "fp32", "--run.progress", "false",
        "--output", str(tmp_path / "knn"),
    ])
    assert rc == 0
    _check_accuracy(_metrics(tmp_path / "knn"))
    # a cls-token readout is refused with a clear message, not a shape error
    rc = main(["knn", "--checkpoint", ckpt, "--pool", "token", *DATA, "--output", str(tmp_path / "knn_token")])
    assert rc == 2


def test_embed_and_reconstruct(pretrained, tmp_path):
    from sklearn.datasets import load_digits

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(load_digits().images[:4]):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32)).save(folder / f"{i}.png")
    ckpt = str(pretrained / "model.safetensors")
    # the default --pool auto averages: ConvMAE has no cls token
    rc = main(["embed", str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "f.safetensors")])
    assert rc == 0
    tensors, meta = read_safetensors(tmp_path / "f.safetensors")
    assert tensors["features"].shape == (4, 32) and torch.isfinite(tensors["features"]).all()
    assert json.loads(meta["openmae"])["pool"] == "avg"
    figure = tmp_path / "recon.png"
    rc = main(["reconstruct", str(folder), "--checkpoint", ckpt, "--out", str(figure), "--mask-ratio", "0.5", "0.75"])
    assert rc == 0
    with Image.open(figure) as img:
        assert img.size == figure_size(4 * 2)  # one row per image and mask ratio
        grey = np.asarray(img.convert("L")).astype(float)
    # the first panel (row 1, "original") shows the digit: the layout's sizes from figure_size
    top, left = figure_size(0)[1], figure_size(0, cols=0)[0]  # header height, label column width
    side = figure_size(1)[1] - top  # a panel's side
    first = grey[top : top + side, left : left + side]
    assert first.std() > 20 and first.min() < 64 and first.max() > 192


def test_shared_evaluation_helpers_follow_the_model():
    assert classifier_name("convmae_base_patch16") == "convvit_base_patch16"
    assert classifier_name("convvit_base_patch16") == "convvit_base_patch16"
    assert classifier_name("mae_vit_base_patch16") == "vit_base_patch16"
    assert classifier_name("convmae_nonexistent") is None
    images = torch.randn(2, 3, 32, 32)
    mae = openmae.create_model("convmae_tiny_patch16", **SHRINK).eval()
    # no cls token: avg pools every token of the unmasked encoding
    assert torch.allclose(pooled_features(mae, images, "avg"), mae.encode(images).mean(dim=1))
    with pytest.raises(ValueError, match="no cls token"):
        pooled_features(mae, images, "token")
    vit = openmae.create_model("vit_tiny_patch16", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    tokens = vit.eval().encode(images)
    assert torch.allclose(pooled_features(vit, images), vit.fc_norm(tokens[:, 1:].mean(dim=1)))
    # --tune-blocks mlp: the last stage-3 block's MLP half and the readout, nothing in the conv stages
    clf = openmae.create_model("convvit_tiny_patch16", **SHRINK, num_classes=10)
    names = freeze_for_tuning(clf, "mlp")
    assert names and all(n.startswith(("blocks3.1.norm2.", "blocks3.1.mlp.", "fc_norm.", "head.")) for n in names)
    with pytest.raises(openmae.config.ConfigError, match="more than"):
        freeze_for_tuning(clf, 3)
