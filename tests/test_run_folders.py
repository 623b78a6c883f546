"""One run per output folder: what a new invocation may do in a folder that already holds a run.

Every case starts from a copy of one finished tiny run (4 steps, checkpoints at steps 2 and 4). The
refusals go through the CLI (``cli_fails``: exit 2, one line naming the setting or file, the folder
byte-identical after); the accepted cases check what they leave behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from tests.conftest import snapshot
from openmae.checkpoint import checkpoint_name, list_checkpoints, prune_checkpoints
from openmae.cli import main
from openmae.io import atomic_write_text, json_text, read_safetensors
from openmae.run_folder import config_differences

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
              "decoder_num_heads": 2, "patch_size": 4}


def argv(out: Path, *extra: str) -> list[str]:
    """A 4-step pretraining run on 64 digits, checkpoints every 2 steps, into ``out``."""
    return ["pretrain", "--dataset", "digits", "--img-size", "16", "--data.limit", "64", "--data.num_workers", "0",
            "--model", "mae_vit_tiny_patch4", "--model.kwargs", json.dumps(TINY_MODEL), "--epochs", "1",
            "--batch-size", "16", "--warmup-epochs", "0.5", "--train.precision", "fp32", "--train.progress", "false",
            "--train.recon_every", "0", "--train.log_every", "1", "--train.save_every_steps", "2",
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(argv(out)) == 0
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_name(2), checkpoint_name(4)]
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run, to change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# -- refused: each names what is wrong and leaves the folder as it was ---------------------------------


def _none(run, tmp):
    return []


def _truncate_newest(run, tmp):
    truncate(run / checkpoint_name(4))
    return ["--resume", str(run / checkpoint_name(4))]


def _junk_file(run, tmp):
    (tmp / "junk.safetensors").write_text("these are not tensors\n")
    return ["--resume", str(tmp / "junk.safetensors")]


def _exported_model(run, tmp):
    return ["--resume", str(run / "model.safetensors")]


def _other_run(run, tmp):
    shutil.copytree(run, tmp / "other")
    return ["--resume", str(tmp / "other" / checkpoint_name(2))]


def _all_truncated(run, tmp):
    for path in list_checkpoints(run):
        truncate(path)
    return []


def _no_checkpoints(run, tmp):
    for path in list_checkpoints(run):
        path.unlink()
    return []


def _missing(run, tmp):
    return ["--resume", str(tmp / "nowhere.safetensors")]


REFUSED = [
    # auto-resume with settings that change the result: named, old -> new
    ("seed", _none, ["--seed", "1"], ["auto-resuming", "train.seed 0 -> 1", "--output NEW_FOLDER", "config.yaml"]),
    ("lr", _none, ["--lr", "0.01"], ["optim.lr null -> 0.01"]),
    ("base lr", _none, ["--blr", "0.002"], ["optim.base_lr 0.001 -> 0.002"]),
    ("epochs", _none, ["--epochs", "2"], ["train.epochs 1 -> 2"]),
    ("batch", _none, ["--batch-size", "8"], ["train.batch_size 16 -> 8"]),
    ("accum", _none, ["--accum", "2"], ["train.accum_steps 1 -> 2"]),
    ("warmup", _none, ["--warmup-epochs", "1"], ["optim.warmup_epochs 0.5 -> 1.0"]),
    ("precision", _none, ["--train.precision", "bf16"], ["train.precision \"fp32\" -> \"bf16\""]),
    ("mask ratio", _none, ["--mask-ratio", "0.5"], ["model.mask_ratio 0.75 -> 0.5"]),
    ("data", _none, ["--data.limit", "48"], ["data.limit 64 -> 48"]),
    ("model", _none, ["--model", "mae_vit_micro_patch4"], ["model.name \"mae_vit_tiny_patch4\" -> \"mae_vit_micro_patch4\""]),
    ("model kwargs", _none, ["--model.kwargs", "depth=3"], ["model.kwargs", "\"depth\": 2", "\"depth\": 3"]),
    # a fresh start where a run lives
    ("resume none", _none, ["--resume", "none"],
     ["--resume none", "already holds checkpoints", checkpoint_name(4), "another --output", "delete or move"]),
    ("outputs, no checkpoint", _no_checkpoints, [], ["holds the outputs of another run", "summary.json", "--output"]),
    ("resume none, no checkpoint", _no_checkpoints, ["--resume", "none"], ["holds the outputs of another run"]),
    # --resume PATH to a file that is not a training checkpoint, or from elsewhere into this run's folder
    ("truncated", _truncate_newest, [], ["--resume", checkpoint_name(4), "is truncated"]),
    ("junk", _junk_file, [], ["junk.safetensors", "not a safetensors file"]),
    ("exported", _exported_model, [], ["model.safetensors", "not an openmae training checkpoint"]),
    ("another run's", _other_run, [], ["already holds checkpoints of another run", "--resume auto"]),
    ("missing", _missing, [], ["nowhere.safetensors", "no such file"]),
    ("all damaged", _all_truncated, [], ["no intact checkpoint", checkpoint_name(2), checkpoint_name(4), "truncated"]),
]


@pytest.mark.parametrize("setup,extra,expect", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused(run, tmp_path, cli_fails, setup, extra, expect):
    more = setup(run, tmp_path)
    message = cli_fails(argv(run, *extra, *more), expect, keep=[run])
    assert "shape" not in message and "SafetensorError" not in message


def test_eval_only_refuses_a_training_run(run, cli_fails):
    cli_fails(["finetune", "--eval-only", "--checkpoint", run / "model.safetensors", "--dataset", "digits",
               "--output", run], ["--eval-only", str(run), "holds a training run", "its own --output"], keep=[run])


# -- accepted ------------------------------------------------------------------------------------------


def test_finished_run_is_left_alone(run, capsys):
    before = snapshot(run)
    assert main(argv(run)) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"{run} holds a finished run (step 4, summary.json); its outputs are left as they are; to train again, give "
        "another --output"
    ]
    assert "done: 4 steps" in out
    assert snapshot(run) == before  # summary.json, metrics.jsonl, model.safetensors, config.yaml, command.txt, tb/
    assert main(argv(run, "--train.log_every", "3", "--data.num_workers", "1")) == 0  # harmless differences
    assert snapshot(run) == before


def test_killed_before_its_summary_is_completed(finished, run, capsys):
    """Stopped between its last checkpoint and summary.json: not finished; the rerun writes what is missing."""
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    assert main(argv(run)) == 0
    assert "resuming from" in capsys.readouterr().err
    old, new = (strict_json((d / "summary.json").read_text()) for d in (finished, run))
    assert new["steps"] == 4 and new["final_loss"] == old["final_loss"]  # the loss the checkpoint recorded
    assert (run / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def test_max_steps_checkpoints_its_last_step_and_continues(finished, tmp_path, capsys):
    out = tmp_path / "short"
    assert main(argv(out, "--train.max_steps", "3", "--train.save_every_steps", "null")) == 0
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_name(3)]
    capsys.readouterr()
    assert main(argv(out, "--train.max_steps", "3")) == 0  # finished: says how to go on
    assert "raise --train.max_steps (its schedule spans 4 steps)" in capsys.readouterr().err
    config = (out / "config.yaml").read_bytes()
    assert main(argv(out)) == 0  # max_steps and save_every_steps may change: the run goes on to step 4
    assert strict_json((out / "summary.json").read_text())["steps"] == 4
    a, b = weights(finished / "model.safetensors"), weights(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # config.yaml holds the settings of the steps it continued, and none that changed the result
    assert (out / "config.yaml").read_bytes() != config  # max_steps: null now
    assert (out / "config.yaml").read_bytes() == (finished / "config.yaml").read_bytes().replace(
        str(finished).encode(), str(out).encode())


def test_damaged_newest_is_skipped_and_temp_files_removed(finished, run, capsys):
    truncate(run / checkpoint_name(4))
    ours = run / f".{checkpoint_name(4)}.a1b2_c3d.tmp"  # what a killed atomic write leaves
    others = [run / ".notes.tmp", run / ".x.ABCDEFGH.tmp", run / "keep.tmp"]
    for path in [ours, *others]:
        path.write_bytes(b"partial")
    config = (run / "config.yaml").read_bytes()
    old_umask = os.umask(0o007)
    try:
        assert main(argv(run)) == 0
    finally:
        os.umask(old_umask)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {run / checkpoint_name(4)}: truncated:" in err
    assert f"resuming from {run / checkpoint_name(2)} at step 2/4" in err
    assert f"removed {ours}" in err and not ours.exists() and all(p.exists() for p in others)
    a, b = weights(finished / "model.safetensors"), weights(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resumed with the same settings: config.yaml says the same (but for its folder, as this is a copy)
    assert (run / "config.yaml").read_bytes() == config.replace(str(finished).encode(), str(run).encode())
    # metrics.jsonl: steps 3 and 4 logged once, though the first run logged them before the damage
    steps = [strict_json(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if s is not None]
    assert sorted(set(logged)) == [1, 2, 3, 4] and logged.count(3) == 1
    # the rewritten files have the usual mode (0o666 & ~umask), checkpoints included
    for name in (checkpoint_name(4), "model.safetensors", "summary.json", "metrics.jsonl"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o660, name


def test_summaries_are_strict_json(finished, tmp_path):
    summary = strict_json((finished / "summary.json").read_text())
    assert math.isfinite(summary["final_loss"])
    for line in (finished / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    assert json_text({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}) == (
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    )
    from openmae.runs import write_metrics

    path = write_metrics(tmp_path, {"final_loss": float("nan"), "top1": 50.0})
    assert strict_json(path.read_text()) == {"final_loss": None, "top1": 50.0}


def test_atomic_writes_sync_the_folder(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened.append((str(path), fd))
        return fd

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    folder_fds = [fd for path, fd in opened if path == str(tmp_path)]
    assert folder_fds and folder_fds[-1] in synced
    assert not list(tmp_path.glob(".*.tmp"))


def test_prune_keeps_intact_checkpoints(finished, tmp_path):
    for path in list_checkpoints(finished):
        shutil.copy(path, tmp_path / path.name)
    damaged = tmp_path / checkpoint_name(9)
    shutil.copy(tmp_path / checkpoint_name(4), damaged)
    truncate(damaged)
    prune_checkpoints(tmp_path, 2)  # 9 is damaged: the two intact ones stay
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (2, 4, 9)]
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(s) for s in (4, 9)]


def test_config_differences_ignore_only_harmless_settings():
    old = {"model": {"name": "a", "kwargs": {}}, "train": {"seed": 0, "output_dir": "x", "log_every": 1, "lr": 1},
           "data": {"num_workers": 2, "limit": None}}
    new = {"model": {"name": "a", "kwargs": {"depth": 3}}, "train": {"seed": 0, "output_dir": "y", "log_every": 5,
           "lr": 1.0, "added": 1}, "data": {"num_workers": 0, "limit": 10}}
    assert config_differences(old, new) == [("data.limit", None, 10), ("model.kwargs", {}, {"depth": 3})]
