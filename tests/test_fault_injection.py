"""kill -9 in the middle of a run: the restart ends with the weights of a run that never stopped.

A pretraining subprocess is killed with SIGKILL at a seeded random moment after its first
checkpoints (during a step, a save, a prune or a log line, wherever it is). The killed folder is
restarted twice in-process: as it was, and with its newest checkpoint truncated (auto-resume names
it and falls back to the one before). Both end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openmae.checkpoint import checkpoint_step, list_checkpoints
from openmae.cli import main
from openmae.io import read_safetensors

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
              "decoder_num_heads": 2, "patch_size": 4}
STEPS = 48  # 128 digits / batch 8 x 3 epochs


def argv(out: Path) -> list[str]:
    return ["pretrain", "--dataset", "digits", "--img-size", "16", "--data.limit", "128", "--data.num_workers", "0",
            "--model", "mae_vit_tiny_patch4", "--model.kwargs", json.dumps(TINY_MODEL), "--epochs", "3",
            "--batch-size", "8", "--warmup-epochs", "0.5", "--train.precision", "fp32", "--train.progress", "false",
            "--train.recon_every", "0", "--train.log_every", "1", "--train.save_every_steps", "2",
            "--train.keep_checkpoints", "3", "--output", str(out)]


def logged_steps(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count('"step"')
    except FileNotFoundError:
        return 0


def kill_midway(out: Path, seed: int) -> int:
    """Start the run in a subprocess and SIGKILL it at a random step past its first checkpoints
    (plus a random fraction of a step); returns the step it was killed at (from its log)."""
    rng = random.Random(seed)
    at_step = rng.randint(5, STEPS - 12)  # at least two checkpoints (steps 2, 4) before, steps to go after
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "openmae", *argv(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while logged_steps(out) < at_step and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (exit {proc.returncode}):\n{err[-2000:]}"
    assert not (out / "summary.json").exists()
    return at_step


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigkill_then_restart_is_bit_identical(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(argv(straight)) == 0

    killed = tmp_path / "killed"
    kill_midway(killed, seed=11)
    truncated = Path(shutil.copytree(killed, tmp_path / "truncated"))
    capsys.readouterr()

    # 1. restarted as the kill left it (maybe with a half-written save's temp file)
    assert main(argv(killed)) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err
    assert json.loads((killed / "summary.json").read_text())["steps"] == STEPS
    assert_same_weights(straight / "model.safetensors", killed / "model.safetensors")
    assert not list(killed.glob(".*.tmp"))

    # 2. the same, with its newest checkpoint cut short: named, skipped, the previous one resumed
    found = list_checkpoints(truncated)
    assert len(found) >= 2
    newest = found[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    assert main(argv(truncated)) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: truncated" in err
    assert f"resuming from {found[-2]} at step {checkpoint_step(found[-2])}/{STEPS}" in err
    assert_same_weights(straight / "model.safetensors", truncated / "model.safetensors")
    # the resumed runs log each step once: metrics.jsonl is cut back to the checkpoint they resumed
    for out in (killed, truncated):
        steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s is not None]
        assert len(steps) == len(set(steps)) + 3 and set(steps) == set(range(1, STEPS + 1))  # + 3 epoch_end records
