"""The training engine end to end on tiny models: resume equivalence, DDP, bad images, config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.checkpoint import latest_checkpoint, load_training_state
from openmae.cli import main
from openmae.commands.pretrain import run_pretrain
from openmae.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from openmae.io import read_safetensors
from openmae.optim import cosine_lr, param_groups

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def tiny_config(out: Path, **train) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name="mae_vit_tiny_patch4", kwargs=dict(TINY_MODEL, patch_size=4)),
        data=DataConfig(name="digits", img_size=16, limit=192, num_workers=0),
        optim=OptimConfig(warmup_epochs=1, base_lr=1e-3),
        train=TrainConfig(**{"epochs": 2, "batch_size": 32, "precision": "fp32", "output_dir": str(out),
                             "progress": False, "log_every": 2, **train}),
    )


def weights(path: Path) -> dict:
    return read_safetensors(path)[0]


def test_run_writes_outputs(tmp_path):
    summary = run_pretrain(tiny_config(tmp_path))
    assert summary["steps"] == 12  # 192 images / 32 per step x 2 epochs
    for name in ["config.yaml", "environment.json", "command.txt", "metrics.jsonl", "summary.json", "model.safetensors"]:
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "loss_curve.png").exists()
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "epoch_end" not in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {"lr", "images_per_s"} <= set(records[0])
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["versions"]["torch"] and "command" in env
    # checkpoints are pruned to the newest `keep_checkpoints`
    state = load_training_state(latest_checkpoint(tmp_path))
    assert state["info"]["step"] == 12 and state["info"]["config"]["data"]["mean"]


def test_resume_equals_straight_run(tmp_path):
    straight = tmp_path / "straight"
    run_pretrain(tiny_config(straight))
    resumed = tmp_path / "resumed"
    run_pretrain(tiny_config(resumed, max_steps=5, save_every_steps=5))  # stops mid-epoch 0
    assert latest_checkpoint(resumed).name == "checkpoint-00000005.safetensors"
    summary = run_pretrain(tiny_config(resumed))  # resume: auto from the output dir
    assert summary["steps"] == 12
    a, b = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accumulation_matches_bigger_batch(tmp_path):
    big = run_pretrain(tiny_config(tmp_path / "big", epochs=1, batch_size=64))
    acc = run_pretrain(tiny_config(tmp_path / "acc", epochs=1, batch_size=32, accum_steps=2))
    assert big["steps"] == acc["steps"] == 3
    a, b = weights(tmp_path / "big" / "model.safetensors"), weights(tmp_path / "acc" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    common = ["--dataset", "digits", "--img-size", "16", "--data.limit", "128", "--data.num_workers", "0",
              "--model.kwargs", json.dumps(dict(TINY_MODEL, patch_size=4)), "--epochs", "1", "--warmup-epochs", "0.5",
              "--train.precision", "fp32", "--train.progress", "false", "--blr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "openmae", "pretrain", *common, "--batch-size", "32", "--output", str(single)],
                   check=True, env=env, capture_output=True)
    ddp = tmp_path / "ddp"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "openmae", "pretrain", *common, "--batch-size", "16", "--output", str(ddp)],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((ddp / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["steps"] == s2["steps"] == 4
    assert s1["effective_batch"] == s2["effective_batch"] == 32
    a, b = weights(single / "model.safetensors"), weights(ddp / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert abs(s1["final_loss"] - s2["final_loss"]) < 1e-5


def test_corrupt_images_are_counted_and_listed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(62):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "truncated.png").write_bytes((folder / "000.png").read_bytes()[:40])
    cfg = tiny_config(tmp_path / "run", epochs=1, batch_size=16)
    cfg.data = DataConfig(path=str(folder), img_size=16, num_workers=0, max_bad_fraction=0.1)
    cfg.model.kwargs = dict(TINY_MODEL, patch_size=4)
    summary = run_pretrain(cfg)
    bad = summary["bad_images"]
    assert bad["failed_loads"] == 2 and bad["images_seen"] == 64
    assert any("broken.jpg" in f for f in bad["bad_files"]) and any("truncated.png" in f for f in bad["bad_files"])
    assert "broken.jpg" in capsys.readouterr().err

    for i in range(10):
        (folder / f"bad{i}.jpg").write_bytes(b"junk")
    cfg.train.output_dir = str(tmp_path / "run2")
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run_pretrain(cfg)


def test_param_groups_and_schedule():
    import openmae

    m = openmae.create_model("mae_vit_tiny_patch4", **TINY_MODEL)
    groups = param_groups(m, 0.05, skip=m.no_weight_decay())
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "blocks.0.attn.qkv.weight" in decay and "decoder_pred.weight" in decay
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "pos_embed" not in decay | no_decay  # frozen
    assert cosine_lr(0, 100, 10, 1.0) == 0 and cosine_lr(5, 100, 10, 1.0) == 0.5
    assert cosine_lr(10, 100, 10, 1.0) == 1.0 and abs(cosine_lr(55, 100, 10, 1.0) - 0.5) < 1e-9
    assert cosine_lr(100, 100, 10, 1.0, floor=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mask-ratio", "1.0"], "mask_ratio must be in"),
        (["--model", "mae_vit_bse_patch16"], "did you mean"),
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--model", "mae_vit_base_patch16", "--img-size", "100", "--dataset", "digits"], "not divisible by patch_size"),
        (["--dataset", "digits", "--model.kwargs", "{in_chans: 3}"], "channel"),
        (["--train.nonsense", "1"], None),
    ],
)
def test_config_errors_fail_fast(tmp_path, capsys, argv, message):
    if message is None:
        with pytest.raises(SystemExit):
            main(["pretrain", *argv, "--output", str(tmp_path)])
        return
    rc = main(["pretrain", *argv, "--output", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert not list(tmp_path.glob("checkpoint-*"))


def test_recipes_parse():
    from openmae.config import CONFIG_DIR, from_dict, load_recipe

    # pretraining recipes; finetune_* / linprobe_* recipes are tested with their protocols
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith(("finetune_", "linprobe_")))
    assert {"cpu_small", "mae_vit_base_in1k", "mae_vit_large_in1k", "mae_vit_huge_in1k"} <= set(names)
    for name in names:
        data = load_recipe(name)
        data.setdefault("data", {})
        if data["data"].get("name") == "folder" or "path" in data["data"]:
            data["data"] = {**data["data"], "path": str(Path(__file__).parent)}
        cfg = from_dict(PretrainConfig, data)
        # the paper's ratio: MAE's 0.75, SimMIM's 0.6
        assert cfg.model.mask_ratio == (0.6 if cfg.model.name.startswith("simmim_") else 0.75)
