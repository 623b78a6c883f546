"""``openmae segment`` and ``openmae detect`` end to end through the CLI, on tiny models: the files a run
leaves (metrics.json with its keys, predictions.png, model.safetensors with its record), --eval-only and
resuming reproducing a run's metrics, and every bad setting refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import openmae
from openmae.cli import main
from openmae.config import to_dict
from openmae.dense.config import DenseEval, DetectConfig, DetectSettings, SegmentConfig
from openmae.dense.tasks import DENSE_KEY, load_dense_model
from openmae.io import read_safetensors, read_safetensors_metadata
from openmae.run_folder import config_differences

# a ViT of 2 blocks, 32 wide, on 32 px scenes (8 x 8 patches of 4 px): each run takes seconds
TINY_VIT = ["--model", "vit_micro_patch4", "--model.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}"]


def quick(scenes: int = 16, val: int = 8, batch: int = 8) -> list[str]:
    """A short CPU run: 32 px, ``scenes`` training scenes in batches of ``batch``, 2 epochs, ``val`` held out."""
    return [
        "--img-size", "32", "--data.limit", str(scenes), "--data.val_limit", str(val), "--batch-size", str(batch),
        "--epochs", "2", "--data.num_workers", "0", "--train.precision", "fp32", "--train.device", "cpu",
        "--train.progress", "false",
    ]


QUICK = [*quick(), "--segment.channels", "16"]
# detection: 2 steps of 4 scenes, 4 held out; a narrow FPN and box head, few RoIs and detections
DETECT_QUICK = [
    *quick(scenes=8, val=4, batch=4), "--epochs", "1", "--detect.fpn_channels", "16",
    "--detect.representation_size", "32", "--detect.rois_per_image", "32", "--detect.detections_per_image", "10",
]
SEGMENT_KEYS = {"miou", "acc", "macc", "iou", "images", "encoder", "head", "dataset", "eval_only"}
BOX_KEYS = {"map", "map_50", "map_75", "mar_100", "images", "detector"}
MASK_KEYS = {"mask_map", "mask_map_50"}


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def metrics_of(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def is_png(path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 32


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory):
    """A tiny MAE saved as openmae writes pretraining models, at 16 px (its position table is refitted to 32 px)."""
    torch.manual_seed(0)
    mae = openmae.create_model(
        "mae_vit_micro_patch4", img_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2,
    )
    return openmae.save_pretrained(mae, tmp_path_factory.mktemp("mae") / "mae.safetensors")


@pytest.fixture(scope="module")
def segment_run(tiny_mae, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment") / "run"
    cli("segment", "--checkpoint", tiny_mae, *QUICK, "--output", out)
    return out


# -- segment -----------------------------------------------------------------------------------------


def test_segment_writes_metrics_predictions_and_a_rebuildable_model(segment_run, tiny_mae):
    metrics = metrics_of(segment_run)
    assert SEGMENT_KEYS <= metrics.keys()
    assert metrics["checkpoint"] == str(tiny_mae) and metrics["head"] == "upernet" and not metrics["eval_only"]
    assert metrics["images"] == 8 and metrics["steps"] == 4
    assert len(metrics["iou"]) == 11 and "background" in metrics["iou"]  # fashion-scenes: background + 10 items
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["acc"] <= 100
    assert is_png(segment_run / "predictions.png") and (segment_run / "loss_curve.png").exists()
    summary = json.loads((segment_run / "summary.json").read_text())
    assert summary["val"]["miou"] == metrics["miou"]
    epoch_ends = [json.loads(line) for line in (segment_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/miou"] for r in epoch_ends if r.get("epoch_end") == 1]  # evaluated after epoch 1 too
    # the file records the whole model: it rebuilds without the pretraining file
    record = json.loads(read_safetensors_metadata(segment_run / "model.safetensors")[DENSE_KEY])
    assert record["task"] == "segment" and record["encoder"]["arch"] == "vit_micro_patch4"
    assert record["img_size"] == 32 and record["channels"] == 1 and len(record["classes"]) == 11
    model, _ = load_dense_model(segment_run)
    saved, _ = read_safetensors(segment_run / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_segment_eval_only_reproduces_the_metrics(segment_run, tmp_path):
    out = tmp_path / "eval"
    cli("segment", "--eval-only", "--checkpoint", segment_run, *QUICK, "--output", out)
    trained, evaluated = metrics_of(segment_run), metrics_of(out)
    assert evaluated["eval_only"]
    for key in ("miou", "acc", "macc", "iou", "images"):
        assert evaluated[key] == trained[key], key
    assert is_png(out / "predictions.png") and (out / "config.yaml").exists()


def test_segment_resumed_run_ends_where_a_straight_one_does(segment_run, tiny_mae, tmp_path):
    out = tmp_path / "resumed"
    cli("segment", "--checkpoint", tiny_mae, *QUICK, "--train.max_steps", "3", "--output", out)
    assert metrics_of(out)["steps"] == 3
    # auto-resumes from step 3; drawing fewer images changes no result, so it may differ
    cli("segment", "--checkpoint", tiny_mae, *QUICK, "--eval.draw", "2", "--output", out)
    straight, resumed = metrics_of(segment_run), metrics_of(out)
    for key in ("miou", "acc", "iou", "steps"):  # final_loss: the mean over a logging window, cut by the stop
        assert resumed[key] == straight[key], key
    a, _ = read_safetensors(segment_run / "model.safetensors")
    b, _ = read_safetensors(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_drawing_settings_may_change_on_resume_and_nothing_else_of_theirs():
    segment, detect = to_dict(SegmentConfig()), to_dict(DetectConfig())
    drawn = to_dict(SegmentConfig(eval=DenseEval(draw=2)))
    assert config_differences(segment, drawn) == []
    shown = to_dict(DetectConfig(detect=DetectSettings(score_threshold=0.9)))
    assert config_differences(detect, shown) == []
    fewer = to_dict(DetectConfig(detect=DetectSettings(detections_per_image=5)))
    assert [name for name, *_ in config_differences(detect, fewer)] == ["detect.detections_per_image"]


def test_finetune_takes_the_encoder_of_a_segment_run(segment_run, tmp_path):
    out = tmp_path / "finetune"
    cli("finetune", "--checkpoint", segment_run, "--dataset", "digits", "--img-size", "16", "--data.limit", "64",
        "--data.num_workers", "0", "--epochs", "1", "--batch-size", "32", "--train.precision", "fp32",
        "--train.progress", "false", "--output", out)
    metrics = metrics_of(out)
    assert metrics["checkpoint"] == str(segment_run) and metrics["model"] == "vit_micro_patch4"
    assert metrics["steps"] == 2 and 0 <= metrics["top1"] <= 100
    # the fine-tuned classifier started from the segment run's encoder: its first blocks moved only a little
    dense, _ = read_safetensors(segment_run / "model.safetensors")
    tuned, _ = read_safetensors(out / "model.safetensors")
    start = dense["backbone.encoder.blocks.0.attn.qkv.weight"]
    moved = (tuned["blocks.0.attn.qkv.weight"] - start).abs().max()
    assert moved < 0.1 * start.abs().max()


def test_segment_fpn_head_from_random_init(tmp_path):
    out = tmp_path / "fpn"
    cli("segment", *TINY_VIT, *QUICK, "--head", "fpn", "--epochs", "1", "--eval.draw", "0", "--output", out)
    metrics = metrics_of(out)
    assert metrics["head"] == "fpn" and metrics["checkpoint"] is None and SEGMENT_KEYS <= metrics.keys()
    assert not (out / "predictions.png").exists()


# -- detect ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detect_run(tiny_mae, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "run"
    cli("detect", "--checkpoint", tiny_mae, "--detector", "mask_rcnn", *DETECT_QUICK, "--output", out)
    return out


def test_detect_writes_box_and_mask_map_predictions_and_the_model(detect_run):
    metrics = metrics_of(detect_run)
    assert BOX_KEYS | MASK_KEYS <= metrics.keys()
    assert metrics["detector"] == "mask_rcnn" and metrics["images"] == 4
    assert all(metrics[k] is None or 0 <= metrics[k] <= 100 for k in ("map", "map_50", "mask_map"))
    assert is_png(detect_run / "predictions.png")
    record = json.loads(read_safetensors_metadata(detect_run / "model.safetensors")[DENSE_KEY])
    assert record["task"] == "detect" and record["model"]["kind"] == "mask_rcnn"


def test_detect_eval_only_reproduces_the_metrics(detect_run, tmp_path):
    out = tmp_path / "eval"
    cli("detect", "--eval-only", "--checkpoint", detect_run / "model.safetensors", *DETECT_QUICK, "--output", out)
    trained, evaluated = metrics_of(detect_run), metrics_of(out)
    for key in ("map", "map_50", "mask_map", "images"):
        assert evaluated[key] == trained[key], key


def write_coco(root, split: str, n: int = 4) -> None:
    """A boxes-only COCO split: n 32 x 32 RGB images, each with one bright square labelled "square"."""
    images, annotations = [], []
    for i in range(n):
        pixels = torch.zeros(32, 32, 3, dtype=torch.uint8)
        x, y, side = 2 + 5 * i, 4 + 3 * i, 10 + i
        pixels[y : y + side, x : x + side] = 200
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.numpy()).save(root / split / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 5, "bbox": [x, y, side, side], "iscrowd": 0})
    doc = {"images": images, "annotations": annotations, "categories": [{"id": 5, "name": "square"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train")
    write_coco(root, "val")
    return root


def test_detect_faster_rcnn_on_a_coco_folder(coco_root, tmp_path):
    out = tmp_path / "coco_run"
    cli("detect", *TINY_VIT, "--dataset", "coco", "--data", coco_root,
        *quick(scenes=4, val=4, batch=2), "--epochs", "1", "--detect.fpn_channels", "16",
        "--detect.representation_size", "32", "--detect.detections_per_image", "10", "--output", out)
    metrics = metrics_of(out)
    assert BOX_KEYS <= metrics.keys() and not MASK_KEYS & metrics.keys()
    assert metrics["classes"] == ["background", "square"] and metrics["dataset"] == str(coco_root)


# -- bad settings: one line, exit 2, nothing written -----------------------------------------------------


def test_bad_settings_are_refused_before_anything_is_written(
    cli_fails, tmp_path, tiny_mae, segment_run, detect_run, coco_root
):
    out = tmp_path / "never"
    recipe = tmp_path / "bad_head.yaml"
    recipe.write_text("segment: {head: foo}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["segment", "--dataset", "ade20k"], ["data.name=ade20k", "--data ROOT"]),
        (["segment", "--config", recipe], ["segment.head must be one of", "upernet", "fpn", "foo"]),
        (["detect", "--dataset", "coco", "--data", tmp_path / "missing"], ["data.path", "does not exist"]),
        (["segment", "--eval-only"], ["--eval-only needs --checkpoint"]),
        (["segment", "--eval-only", "--checkpoint", tiny_mae], ["not a dense model", "drop --eval-only"]),
        (["segment", "--eval-only", "--checkpoint", detect_run], ["holds a detect model", "detect --eval-only"]),
        (
            ["segment", "--eval-only", "--checkpoint", segment_run, "--img-size", "48"],
            ["data.img_size 48", "trained with img_size 32"],
        ),
        (["segment", "--checkpoint", segment_run], ["is a dense model saved by", "--eval-only"]),
        (["segment", *TINY_VIT, "--model.strides", "6", "12"], ["model.strides", "powers of 2"]),
        (["segment", *TINY_VIT, "--model.global_blocks", "5"], ["model.global_blocks", "2 blocks"]),
        (["segment", "--model", "vit_micro_patch4", "--model.kwargs", "bogus=1"], ["cannot build the encoder"]),
        (["segment", "--model", "mae_nothing"], ["model.name 'mae_nothing'", "vit_micro_patch4"]),
        (["segment", "--optim.layer_decay", "0"], ["optim.layer_decay must be in (0, 1]"]),
        (["detect", "--detect.anchor_scale", "-1"], ["detect.anchor_scale must be positive"]),
        (["detect", *TINY_VIT, "--detector", "mask_rcnn", "--dataset", "coco", "--data", coco_root],
         ["no instance masks", "faster_rcnn"]),
        (["segment", "--data.scale_range", "2", "1"], ["data.scale_range"]),
    ]
    for argv, expect in cases:
        argv = [*argv, "--data.num_workers", "0", "--train.device", "cpu", "--train.progress", "false"]
        cli_fails([*argv, "--output", out], expect, keep=[out])
        assert not out.exists(), argv
    cli_fails(["segment", "--output", a_file], ["output folder", "is a file"], keep=[a_file])


@pytest.mark.parametrize(
    "argv", [["segment", "--head", "foo"], ["detect", "--dataset", "ade20k"], ["detect", "--detector", "yolo"]]
)
def test_a_value_outside_the_choices_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and "invalid choice" in capsys.readouterr().err
