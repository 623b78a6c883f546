"""A run's output folder holds one run: which checkpoint a new invocation resumes, and whether it may.

A folder that holds checkpoints is continued, never restarted or shared: ``--resume none`` there is
refused, an auto-resume whose settings differ in anything that changes the result is refused (the
message names each field, old and new), and a damaged newest checkpoint is named and skipped for the
newest intact one. A run that already reached its last step is reported as finished and its outputs
are left alone. When a run does start (or continue) in a folder, the temp files of a killed save are
removed and ``metrics.jsonl`` is cut back to the step it resumes from, so nothing is logged twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmae import checkpoint as ckpt
from openmae.config import ConfigError
from openmae.io import atomic_write_text, stale_temp_files

# Settings that may change between the runs that make up one run: where and how it runs, how often it
# logs and saves, when it stops, none of what it computes. Every other setting (model, data, seed,
# optimizer, schedule: epochs, batch size, accumulation, learning rates, warmup, precision, mask
# ratio, the protocols' augmentation and heads, ...) must match the checkpoint's.
# - train.max_steps only says where this invocation stops: the schedule spans train.epochs, so
#   raising it continues the same run (and stopping at 5 then going on gives a straight run's weights).
# - train.device and train.compile say how the same computation is run: a run moved to another
#   machine must be able to resume (its later steps then round like that machine does). So do
#   train.strategy (checkpoints are one full file whatever wrote them) and train.activation_checkpointing
#   (the same gradients, recomputed: tested).
# - data.num_workers does not change a batch (each sample's transform is seeded by (seed, epoch,
#   index)); data.max_bad_fraction is a stop threshold.
# - eval.every / eval.batch_size: held-out evaluation in eval mode, beside training; eval.only never trains.
# - train.knn_*: the kNN monitor encodes images in eval mode without gradients and restores the global
#   RNG after, so the weights are the same with it on or off (tested).
# - eval.draw / detect.score_threshold (segment, detect): how many held-out images predictions.png shows
#   and the lowest score it draws; the metrics read every detection.
HARMLESS = frozenset({
    "train.output_dir", "train.resume", "train.max_steps", "train.device", "train.compile",
    "train.strategy", "train.activation_checkpointing",
    "train.save_every", "train.save_every_steps", "train.keep_checkpoints",
    "train.log_every", "train.progress", "train.recon_every", "train.recon_images", "train.recon_bands",
    "train.knn_every", "train.knn_limit", "train.knn_k", "train.knn_pool",
    "data.num_workers", "data.max_bad_fraction",
    "eval.every", "eval.batch_size", "eval.only", "eval.draw", "detect.score_threshold",
})
OUTPUTS = ("summary.json", "model.safetensors", "metrics.json")  # what a finished run leaves
SHOWN = 8  # differing settings listed in full; the rest are counted


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``: one entry per field of each section (a mapping
    field such as ``model.kwargs`` stays one value). Values as JSON holds them (tuples as lists)."""
    config = json.loads(json.dumps(config))
    flat: dict[str, Any] = {}
    for section, fields in config.items():
        if isinstance(fields, dict):
            flat.update({f"{section}.{name}": value for name, value in fields.items()})
        else:
            flat[section] = fields
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, old value, new value)`` for every setting outside :data:`HARMLESS` that differs
    (``1 == 1.0``). A setting only one side records (an openmae version added or removed it) is not
    compared."""
    old_flat, new_flat = settings(old), settings(new)
    return [
        (name, old_flat[name], new_flat[name])
        for name in sorted(old_flat.keys() & new_flat.keys())
        if name not in HARMLESS and old_flat[name] != new_flat[name]
    ]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    shown = [f"{name} {json.dumps(a)} -> {json.dumps(b)}" for name, a, b in diffs[:SHOWN]]
    more = f" and {len(diffs) - SHOWN} more" if len(diffs) > SHOWN else ""
    return ", ".join(shown) + more


class RunFolder:
    """One run's output folder, seen from a new invocation that will train in it.

    Args:
        path: the folder (``train.output_dir``); it need not exist yet.
        note: where one-line notes go (skipped checkpoints, removed temp files); the engine passes
            a printer to stderr on the main rank and a no-op elsewhere.
    """

    def __init__(self, path: str | os.PathLike, note: Callable[[str], None] = lambda line: None) -> None:
        self.path = Path(path)
        self.note = note

    # -- which checkpoint ---------------------------------------------------------------------------

    def resume_checkpoint(self, spec: str | None, config: dict[str, Any]) -> Path | None:
        """The checkpoint to resume for ``train.resume`` = ``spec`` (None, ``"auto"``, a file or a
        folder), None for a fresh start, after every check that keeps this folder to one run:

        - ``None`` (``--resume none``) refuses a folder that already holds checkpoints or a
          finished run's outputs;
        - ``"auto"`` takes the newest intact checkpoint here (naming damaged ones it skips), and
          refuses a folder with a finished run's outputs but no checkpoint;
        - a path resumes that checkpoint (a folder: its newest intact one); a damaged file is an
          error naming it; this folder must not hold checkpoints of another run;
        - the checkpoint's recorded settings must equal ``config`` outside :data:`HARMLESS`.
        """
        existing = ckpt.list_checkpoints(self.path)
        if spec is None:
            self._refuse_restart("--resume none", existing)
            return None
        if spec == "auto":
            if not existing:
                self._refuse_restart("--resume auto", existing)
                return None
            path = self._newest_intact(self.path, existing)
        else:
            path = self._explicit(spec)
            if existing and path.resolve().parent != self.path.resolve():
                raise ConfigError(
                    f"--resume {spec}: the output folder {self.path} already holds checkpoints of another run "
                    f"(newest: {existing[-1].name}); continue that one with --resume auto, or give this run "
                    "another --output"
                )
        self._check_config(path, spec, config)
        return path

    def _refuse_restart(self, how: str, existing: list[Path]) -> None:
        """A fresh start may not write over a run: refuse a folder with checkpoints or a finished run's outputs."""
        if existing:
            raise ConfigError(
                f"{how}: {self.path} already holds checkpoints of a run (newest: {existing[-1].name}); starting "
                f"afresh there would mix two runs; pick another --output, or delete or move {self.path} first"
            )
        outputs = [name for name in OUTPUTS if (self.path / name).exists()]
        if outputs:
            raise ConfigError(
                f"{how}: {self.path} holds the outputs of another run ({', '.join(outputs)}) and no checkpoint "
                f"to continue it from; pick another --output, or delete or move {self.path} first"
            )

    def _newest_intact(self, folder: Path, found: list[Path]) -> Path:
        damaged = []
        for path in reversed(found):
            problem = ckpt.checkpoint_problem(path)
            if problem is None:
                for name, why in damaged:
                    self.note(f"skipping checkpoint {folder / name}: {why}")
                return path
            damaged.append((path.name, problem))
        listed = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise ConfigError(
            f"no intact checkpoint to resume in {folder} ({listed}); move them away to start afresh, "
            "or give this run another --output"
        )

    def _explicit(self, spec: str) -> Path:
        path = Path(spec)
        if path.is_dir():
            found = ckpt.list_checkpoints(path)
            if not found:
                raise FileNotFoundError(f"--resume {spec}: no checkpoint-*.safetensors in that folder")
            return self._newest_intact(path, found)
        if not path.exists():
            raise FileNotFoundError(f"--resume {spec}: no such file; give a checkpoint file or a run folder")
        problem = ckpt.checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"--resume {spec}: {path} is {_as_complement(problem)}; point --resume at an "
                              "intact checkpoint (or at its run folder, to take the newest intact one)")
        return path

    def _check_config(self, path: Path, spec: str, config: dict[str, Any]) -> None:
        """Refuse to continue ``path`` with settings that would change what it computes."""
        old = ckpt.training_config(path)
        fix = ("continue it with the settings it was started with (its config.yaml lists them), or train "
               "these in a new folder with --output NEW_FOLDER")
        if spec != "auto":
            fix += " (or --resume none there)"
        if old is None:
            raise ConfigError(f"cannot resume {path}: it records no run settings to check this run's against; {fix}")
        if old.keys() != config.keys():
            raise ConfigError(
                f"cannot resume {path}: it was saved by another kind of run (settings {', '.join(sorted(old))}; "
                f"this run's: {', '.join(sorted(config))}); {fix}"
            )
        diffs = config_differences(old, config)
        if diffs:
            how = "auto-resuming" if spec == "auto" else "resuming"
            raise ConfigError(
                f"{how} {path}, saved with other settings: {describe_differences(diffs)}; resuming would mix two "
                f"runs; {fix}"
            )

    def check_evaluation_output(self) -> None:
        """An evaluation (``--eval-only``) writes ``config.yaml`` and ``metrics.json``: refuse a folder
        holding a training run, whose files those are. Its own earlier results it may replace."""
        existing = ckpt.list_checkpoints(self.path)
        held = f"newest checkpoint: {existing[-1].name}" if existing else "summary.json"
        if existing or (self.path / "summary.json").exists():
            raise ConfigError(
                f"--eval-only: {self.path} holds a training run ({held}), whose config.yaml and metrics.json "
                "this would replace; give the evaluation its own --output"
            )

    # -- a finished run -------------------------------------------------------------------------------

    def finished_summary(self, step: int) -> dict[str, Any] | None:
        """The summary of a run here that ended at ``step`` (its ``summary.json`` records that step), else None.

        ``summary.json`` is written last, after ``model.safetensors``: a run stopped between its last
        checkpoint and its summary is not finished, and completing it writes both.
        """
        path = self.path / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict) or summary.get("steps") != step or not (self.path / "model.safetensors").exists():
            return None
        return summary

    # -- starting in it -------------------------------------------------------------------------------

    def prepare(self, step: int) -> None:
        """Before a run writes here, from ``step`` (0: a fresh start): remove temp files a killed save
        left (only :func:`~openmae.io.atomic_write`'s own names), and drop the ``metrics.jsonl``
        records past ``step`` (and any line a crash cut short): the resumed run logs them again."""
        for tmp in stale_temp_files(self.path):
            tmp.unlink(missing_ok=True)
            self.note(f"removed {tmp}, left by a save that was interrupted")
        metrics = self.path / "metrics.jsonl"
        if not metrics.exists():
            return
        lines = metrics.read_text().splitlines()
        kept = [line for line in lines if _logged_by(line, step)]
        if kept != lines:
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of a step up to ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict):
        return False
    logged = record.get("step")
    return not isinstance(logged, (int, float)) or logged <= step


def _as_complement(problem: str) -> str:
    """``"truncated: ..."`` reads as ``is truncated: ...``; ``"not a ..."`` as ``is not a ...``; others as ``is unusable: ...``."""
    if problem.startswith(("truncated", "not ")):
        return problem
    return f"unusable: {problem}"
