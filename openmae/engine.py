"""The one training loop. Pretraining, fine-tuning and linear probing differ only by a task (a batch in,
``{"loss": ...}`` out) and by the hooks that run beside it.

:meth:`Trainer.fit` reads as the method, built from named parts: a :class:`Schedule` (steps and
learning rates), a :class:`CheckpointManager` (resume, save, prune), :meth:`Trainer.train_step`
(forward and backward over one step's micro-batches), :func:`optimizer_step` (unscale, clip, step),
a :class:`MetricsLogger` (metrics.jsonl, TensorBoard, the progress bar) and :class:`Hook` objects.

Why the setup runs in the order it does (wrapping happens here, never inside models):

1. The caller builds the :class:`~openmae.runtime.Runtime` (device, process group, precision) and
   hands it over. Everything after needs it: the model goes to this rank's device, DDP needs the
   process group to broadcast rank 0's weights, the loader needs the rank to pick its shard. Built
   outside, it is shared with evaluation, and constructing a Trainer never joins a process group.
2. Seed, move the plain model to the device and load the resumed weights into it, before any
   wrapping: checkpoint keys are the plain module's (no ``module.`` / ``_orig_mod.`` prefixes), DDP
   starts every rank from the restored weights, and FSDP shards them (each rank keeps its slice).
3. Wrap, in the one place that does it (:func:`openmae.distributed.parallelize`, which explains its
   order): activation checkpointing, then ``torch.compile``, then DDP or FSDP's ``fully_shard``.
4. Build the optimizer over the task's parameter groups, named and ordered by the plain module, so
   the optimizer state in a checkpoint lines up whatever wraps the model. It comes after wrapping
   because FSDP replaces the parameters with sharded ones; fused AdamW decides from the parameters'
   device when it is built, and they are there already. Then the rest of the resumed state:
   optimizer (sharded under FSDP), scaler, RNG.
5. Only the training forward goes through the wrapper. Checkpoints, ``model.safetensors`` and hooks
   (evaluation, kNN, reconstructions) see the plain module: what is saved loads into a bare model,
   and evaluating never triggers DDP's collectives or a recompile. Under FSDP, where no rank holds
   the whole model, checkpoints gather a full state dict to rank 0 (one file, the same as one
   process or DDP writes, so a run may change strategy or process count when it resumes), and hooks
   and the export get a full copy gathered on every rank for the occasion.
"""

from __future__ import annotations

import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import yaml
from torch import Tensor

from openmae import checkpoint as ckpt
from openmae.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from openmae.data import BadImageTracker, Batch, EncodedBatch, build_loader
from openmae.distributed import DistInfo, Parallel, all_reduce_sum, barrier, parallelize, sum_over_ranks
from openmae.interop import save_pretrained
from openmae.interop.architecture import load_state
from openmae.io import atomic_write_text, finite_json, json_text
from openmae.optim import build_adamw, cosine_lr, set_lr
from openmae.run_folder import RunFolder
from openmae.runtime import Runtime


class Task(Protocol):
    """What the engine needs from a pretraining / fine-tuning / probing task.

    Optional members: ``name`` (the progress bar's label, default ``pretrain``),
    ``build_optimizer(groups, lr, optim_cfg)`` (default: AdamW with ``optim_cfg.betas``) and
    ``export(model, path)``, which writes the trained model to ``model.safetensors`` (default:
    ``openmae.save_pretrained``; a dense model records its own architecture).
    """

    model: nn.Module

    def param_groups(self, weight_decay: float) -> list[dict]: ...

    def __call__(self, model: nn.Module, batch: Any, epoch: int) -> dict[str, Tensor]: ...


@dataclass
class RunContext:
    """What hooks see: the run's folder, runtime, task and TensorBoard writer, and where it stands."""

    out_dir: Path
    runtime: Runtime
    task: Task
    writer: Any = None  # TensorBoard SummaryWriter on the main rank, else None
    epoch: int = 0  # 0-based: the epoch that just ended (or, at the end, the last one run)
    step: int = 0  # optimizer steps taken
    gathered: nn.Module | None = None  # under FSDP, while hooks run: a full copy of the model

    @property
    def model(self) -> nn.Module:
        """The plain module being trained, on the run's device (never its compiled, DDP or FSDP form;
        under FSDP a full copy gathered for the hooks, whose changes are not trained on)."""
        return self.gathered if self.gathered is not None else self.task.model


class Hook(Protocol):
    """What runs beside training. Both methods are optional.

    ``on_epoch_end(ctx)`` returns metrics or None: they join the epoch's ``epoch_end`` record in
    metrics.jsonl, and the numbers go to TensorBoard. ``on_train_end(ctx)`` returns fields merged into
    the summary, or None. Hooks run on every rank, in the order given: one that writes files checks
    ``ctx.runtime.is_main``; one that computes across ranks (evaluation) needs them all.
    """

    def on_epoch_end(self, ctx: RunContext) -> dict[str, Any] | None: ...

    def on_train_end(self, ctx: RunContext) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps, and its learning rate at each: linear warmup, then cosine."""

    steps_per_epoch: int
    total_steps: int  # what the learning-rate schedule spans: every epoch
    stop_step: int  # where the run stops: total_steps, or train.max_steps if that comes first
    warmup_steps: int
    peak_lr: float
    min_lr: float = 0.0

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


@dataclass
class TrainState:
    """What a checkpoint holds besides the RNG: the plain module, its optimizer, the loss scaler and the step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps taken


@dataclass
class StepResult:
    """What one train step went through."""

    losses: list[Tensor]  # each micro-batch's loss, detached, on the device
    images: int  # images in those micro-batches, summed over ranks
    complete: bool  # False: the loader ran out before the step's last micro-batch


# -- the run's own files and RNG ------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_environment(dist: DistInfo) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("openmae", "torch", "torchvision", "timm", "safetensors", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": shlex.join(sys.argv),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "world_size": dist.world_size,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def write_run_files(out_dir: Path, config: dict[str, Any], dist: DistInfo) -> None:
    """What makes a run describe itself: the resolved config, the environment and the command."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    env = describe_environment(dist)
    atomic_write_text(out_dir / "environment.json", json_text(env, indent=2) + "\n")
    with open(out_dir / "command.txt", "a") as f:
        f.write(env["command"] + "\n")


def report_bad_images(bad: dict[str, Any]) -> None:
    """Print the images that failed to load (the summary's ``bad_images``), if any."""
    if bad["failed_loads"]:
        print(f"{bad['failed_loads']} of {bad['images_seen']} image loads failed:", file=sys.stderr)
        reasons = bad.get("bad_file_reasons", {})
        for line in bad["bad_files"][:20]:
            print(f"  {line}" + (f" ({reasons[line]})" if line in reasons else ""), file=sys.stderr)


# -- checkpoints ----------------------------------------------------------------------------------


class CheckpointManager:
    """The run's training checkpoints: the one to resume from, resuming, saving on schedule, pruning.

    Saves after step N when ``train.save_every_steps`` divides N or N is the run's last step
    (``train.max_steps`` included), and at the end of every ``train.save_every``-th epoch and of the
    last. A save due at an epoch's last step waits for that epoch's hooks and ``epoch_end`` record, so
    a run resumed from it has nothing of the epoch left to do. Keeps the newest
    ``train.keep_checkpoints``. Only the main rank writes, and every rank waits for it, so none reads
    or runs past a half-written file. What may be resumed, and from where, is
    :class:`~openmae.run_folder.RunFolder`'s to decide.
    """

    def __init__(self, out_dir: Path, train: TrainConfig, runtime: Runtime, config: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.cfg = train
        self.runtime = runtime
        self.config = config  # the resolved run config, recorded in every checkpoint
        self.folder = RunFolder(out_dir, note=self._note)
        self._resume: tuple[Path | None] | None = None  # resolved once: its checks and notes run once

    def _note(self, line: str) -> None:
        if self.runtime.is_main:
            print(line, file=sys.stderr)

    def resume_path(self) -> Path | None:
        """The checkpoint ``train.resume`` points at, None for a fresh run; refuses what would mix
        two runs in the output folder (see :meth:`RunFolder.resume_checkpoint`)."""
        if self._resume is None:
            self._resume = (self.folder.resume_checkpoint(self.cfg.resume, self.config),)
        return self._resume[0]

    def load(self, model: nn.Module) -> dict[str, Any] | None:
        """Read the checkpoint to resume (None if none) and load its weights into the plain ``model``,
        before anything wraps it; returns the rest of it for :meth:`restore`."""
        path = self.resume_path()
        if path is None:
            return None
        saved = ckpt.load_training_state(path)
        load_state(model, saved.pop("model"), source=str(path))
        return saved

    def restore(self, state: TrainState, saved: dict[str, Any], parallel: Parallel) -> dict[str, Any]:
        """The rest of what :meth:`load` read, once the model is wrapped and its optimizer built: the
        optimizer state (each rank's slice under FSDP), scaler, RNG and step; returns its ``info``."""
        parallel.load_optimizer_state(state.optimizer, saved["optimizer"])
        if saved["scaler"]:
            state.scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"], self.runtime.device)
        state.step = int(saved["info"]["step"])
        return saved["info"]

    def due(self, step: int, schedule: Schedule, epoch_end: int | None = None) -> bool:
        """Whether to save after ``step``; ``epoch_end``: the 0-based epoch that step ends, if it does."""
        if step == schedule.stop_step:
            return True
        if self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0:
            return True
        return epoch_end is not None and ((epoch_end + 1) % self.cfg.save_every == 0 or epoch_end + 1 == self.cfg.epochs)

    def save(self, state: TrainState, parallel: Parallel, epoch: int, final_loss: float) -> None:
        """Save after the optimizer step ``state.step``, taken in the 0-based ``epoch``; ``final_loss``:
        the last logged mean loss, for the summary of a run resumed at its end. Every rank calls it
        (under FSDP all take part in gathering the state)."""
        model_state, optim_state = parallel.state_dicts(state.optimizer)
        if self.runtime.is_main:
            info = {"step": state.step, "epoch": epoch + 1, "config": self.config, "final_loss": finite_json(final_loss)}
            path = self.out_dir / ckpt.checkpoint_name(state.step)
            rng = ckpt.rng_state(self.runtime.device)
            ckpt.save_training_state(path, state.model, optim_state, info, rng, state.scaler.state_dict(),
                                     model_state=model_state)
            ckpt.prune_checkpoints(self.out_dir, self.cfg.keep_checkpoints)
        barrier(self.runtime.dist)


# -- metrics ----------------------------------------------------------------------------------------


class MetricsLogger:
    """The run's scalars: metrics.jsonl, TensorBoard (``tb/``) and the progress bar, on the main rank.

    Losses are summed on the device over a window of steps (no host sync per step). Every
    ``log_every`` steps, and at the run's last step, the window's sum is all-reduced into the mean
    loss over the window and all ranks, so every rank must call :meth:`step`. A window never spans
    epochs: what an epoch leaves unlogged is dropped.
    """

    def __init__(
        self,
        out_dir: Path,
        runtime: Runtime,
        schedule: Schedule,
        *,
        log_every: int,
        start_step: int,
        progress: bool,
        label: str,
        final_loss: float | None = None,
    ) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.runtime, self.schedule = runtime, schedule
        self.log_every = log_every
        self.writer = self.bar = None
        if runtime.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides what an earlier, killed process logged past the step resumed from (this
            # process logs it again), as metrics.jsonl is cut back (run_folder.RunFolder.prepare)
            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step + 1)
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=schedule.total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=label
                )
        # the last logged mean loss (a resumed run starts from its checkpoint's; NaN: none logged yet)
        self.final_loss = float("nan") if final_loss is None else float(final_loss)
        self.images = 0  # images trained on by all ranks, for the run's throughput
        self.started = time.perf_counter()
        self.new_window()

    def new_window(self) -> None:
        self.loss_sum = torch.zeros((), device=self.runtime.device)
        self.loss_count = 0
        self.window_started, self.window_images = time.perf_counter(), 0

    def add(self, result: StepResult) -> None:
        for loss in result.losses:
            self.loss_sum += loss
        self.loss_count += len(result.losses)
        self.window_images += result.images
        self.images += result.images

    def step(self, step: int, lr: float) -> None:
        """After optimizer step ``step`` (taken at ``lr``): advance the bar; log the window when due."""
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != self.schedule.stop_step:
            return
        # the count too: a rank whose images all failed to load has fewer losses than the others
        count = torch.tensor(float(self.loss_count), device=self.loss_sum.device)
        loss_sum, count = all_reduce_sum(torch.stack([self.loss_sum, count]), self.runtime.dist).tolist()
        if not count:  # no rank loaded an image in this window: no loss to log
            self.new_window()
            return
        mean_loss = loss_sum / count
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"loss is {mean_loss} at step {step}; lower the learning rate or try --train.precision fp32"
            )
        ips = self.window_images / max(time.perf_counter() - self.window_started, 1e-9)
        self.final_loss = mean_loss
        if self.runtime.is_main:
            epoch = round(step / self.schedule.steps_per_epoch, 4)
            self._append({"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr, "images_per_s": ips})
            self._scalars({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": ips}, step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
        self.new_window()

    def epoch_end(self, epoch: int, step: int, metrics: dict[str, Any]) -> None:
        """The ``epoch_end`` record, with what the hooks returned."""
        if self.runtime.is_main:
            self._append({"epoch_end": epoch + 1, "step": step, **metrics})
            self._scalars({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)

    def finish(self) -> dict[str, float]:
        """Close the progress bar; the run's wall time (s) and throughput (images/s)."""
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.started
        return {"seconds": round(elapsed, 2), "images_per_s": round(self.images / max(elapsed, 1e-9), 2)}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json_text(record) + "\n")

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)


# -- the steps --------------------------------------------------------------------------------------


def optimizer_step(state: TrainState, lr: float, clip_grad: float | None) -> None:
    """Take one optimizer step at ``lr`` with the accumulated gradients, then clear them.

    Gradients are unscaled before clipping, so the norm is the true one. With fp16, ``scaler.step``
    skips a step whose gradients overflowed and ``scaler.update`` lowers the scale; otherwise both
    are plain ``optimizer.step()`` and nothing.
    """
    set_lr(state.optimizer, lr)
    if clip_grad is not None:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``: its own ``to`` moves what it holds (a detection batch: a list of targets)."""
    if device.type == "cpu":
        return batch
    return batch.to(device, non_blocking=device.type == "cuda")


class Trainer:
    """Run a task for ``train.epochs`` epochs: AdamW (or the task's optimizer), warmup + cosine,
    accumulation, optional clipping, mixed precision, DDP or FSDP, logging, hooks and atomic, resumable
    checkpoints.

    Args:
        task: turns a batch into ``{"loss": ...}`` (see :class:`Task`).
        dataset: the training dataset (see openmae.data).
        runtime: device, process group and precision, built by the caller (``Runtime.create``).
        train, optim: the run's settings.
        data: the data settings the loop reads (``num_workers``, ``max_bad_fraction``, ``decode``).
        config: the whole resolved config, written next to the outputs and into checkpoints.
        hooks: run at each epoch's end and the run's (see :class:`Hook`).
        collate_fn: how the loader batches samples (default openmae.data's ``collate``); its batches
            need ``images``, ``failed``, ``__len__`` and ``to(device, non_blocking=)``.
    """

    def __init__(
        self,
        task: Task,
        dataset,
        runtime: Runtime,
        *,
        train: TrainConfig,
        optim: OptimConfig,
        data: DataConfig,
        config: dict[str, Any],
        hooks: Sequence[Hook] = (),
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        self.task, self.dataset, self.runtime = task, dataset, runtime
        self.cfg, self.optim_cfg, self.data = train, optim, data
        self.config = config
        self.hooks = list(hooks)
        self.collate_fn = collate_fn
        self.out_dir = Path(train.output_dir)
        if getattr(data, "decode", None) == "gpu" and runtime.device.type != "cuda":  # dense data has no decode
            raise ConfigError(
                f"data.decode gpu decodes JPEGs with nvJPEG on a CUDA GPU, but this run's device is "
                f"{runtime.device.type}; pass --data.decode fast"
            )
        self.checkpoints = CheckpointManager(self.out_dir, train, runtime, config)
        self.already_finished = False  # fit() found the run finished and left its outputs alone

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train (resuming where ``train.resume`` says); returns the summary, also in ``summary.json``."""
        cfg, runtime = self.cfg, self.runtime
        seed_everything(cfg.seed)
        schedule = self.schedule()
        model = self.task.model.to(runtime.device)
        saved = self.checkpoints.load(model)
        start = int(saved["info"]["step"]) if saved else 0
        if start >= schedule.stop_step:
            finished = self.checkpoints.folder.finished_summary(start)
            if finished is not None:  # nothing to do: its outputs stay as they are
                self.already_finished = True
                if runtime.is_main:
                    self._report_finished(schedule, start)
                barrier(runtime.dist)
                return finished
        if runtime.is_main:
            if saved:
                print(f"resuming from {self.checkpoints.resume_path()} at step {start}/{schedule.total_steps}",
                      file=sys.stderr)
            self.checkpoints.folder.prepare(start)
            write_run_files(self.out_dir, self.config, runtime.dist)
            self._announce(schedule)
        barrier(runtime.dist)

        parallel = parallelize(model, runtime.dist, runtime.device, strategy=cfg.strategy, compile=cfg.compile,
                               activation_checkpointing=cfg.activation_checkpointing,
                               param_dtype=runtime.precision.dtype)
        state = TrainState(model, self.build_optimizer(schedule.peak_lr), runtime.precision.scaler())
        resumed = self.checkpoints.restore(state, saved, parallel) if saved else {}
        logger = MetricsLogger(self.out_dir, runtime, schedule, log_every=cfg.log_every, start_step=state.step,
                               progress=cfg.progress, label=getattr(self.task, "name", "pretrain"),
                               final_loss=resumed.get("final_loss"))
        ctx = RunContext(self.out_dir, runtime, self.task, logger.writer)
        tracker = BadImageTracker(self.dataset, reduce_sum=lambda t: sum_over_ranks(t, runtime.dist, runtime.device))
        start_epoch, skip = divmod(state.step, schedule.steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            if state.step >= schedule.stop_step:
                break
            ctx.epoch = epoch
            batches = self.micro_batches(epoch, skip if epoch == start_epoch else 0, tracker)
            model.train()
            logger.new_window()
            while state.step < schedule.stop_step:
                result = self.train_step(parallel, batches, epoch, state.scaler)
                logger.add(result)
                if not result.complete:
                    break  # images failed to load and the loader ran dry: the gradients carry over
                lr = schedule.lr(state.step)
                optimizer_step(state, lr, self.optim_cfg.clip_grad)
                logger.step(state.step, lr)
                if state.step % schedule.steps_per_epoch == 0:
                    break  # the epoch's steps are done: a trailing partial accumulation is dropped
                if self.checkpoints.due(state.step, schedule):
                    self.checkpoints.save(state, parallel, epoch, logger.final_loss)
            batches.close()  # stops this epoch's loader workers before the hooks start theirs
            if state.step > 0 and state.step % schedule.steps_per_epoch == 0:
                ctx.step = state.step
                if self.hooks:
                    ctx.gathered = parallel.full_model() if parallel.sharded else None
                logger.epoch_end(epoch, state.step, self._call_hooks("on_epoch_end", ctx))
                ctx.gathered = None
                if self.checkpoints.due(state.step, schedule, epoch_end=epoch):
                    self.checkpoints.save(state, parallel, epoch, logger.final_loss)

        ctx.step = state.step
        summary = self._summary(schedule, state, logger, tracker)
        ctx.gathered = parallel.full_model() if parallel.sharded else None
        summary.update(self._call_hooks("on_train_end", ctx))
        if runtime.is_main:
            export = getattr(self.task, "export", None) or save_pretrained
            export(ctx.model, self.out_dir / "model.safetensors")
            atomic_write_text(self.out_dir / "summary.json", json_text(summary, indent=2) + "\n")
            report_bad_images(summary["bad_images"])
        ctx.gathered = None
        logger.close()
        barrier(runtime.dist)
        return summary

    # -- its parts --------------------------------------------------------------------------------

    def schedule(self) -> Schedule:
        """Steps per epoch (whole accumulated steps of every rank's shard), and the learning rates."""
        per_rank = len(self.dataset) // self.runtime.dist.world_size
        steps = per_rank // self.cfg.batch_size // self.cfg.accum_steps
        if steps < 1:
            raise ConfigError(
                f"the dataset has {len(self.dataset)} images, too few for one step of "
                f"batch {self.cfg.batch_size} x accum {self.cfg.accum_steps} x {self.runtime.dist.world_size} "
                "processes; lower --batch-size or add images"
            )
        total = self.cfg.epochs * steps
        stop = total if self.cfg.max_steps is None else min(self.cfg.max_steps, total)
        warmup = round(self.optim_cfg.warmup_epochs * steps)
        peak = self.optim_cfg.resolved_lr(self.effective_batch())
        return Schedule(steps, total, stop, warmup, peak, self.optim_cfg.min_lr)

    def effective_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_steps * self.runtime.dist.world_size

    def build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        """The task's optimizer (e.g. LARS for linear probing), else AdamW, over the task's parameter groups."""
        groups = self.task.param_groups(self.optim_cfg.weight_decay)
        build = getattr(self.task, "build_optimizer", None)
        if build is not None:
            return build(groups, peak_lr, self.optim_cfg)
        return build_adamw(groups, peak_lr, self.optim_cfg.betas)

    def micro_batches(
        self, epoch: int, skip_steps: int, tracker: BadImageTracker
    ) -> Generator[tuple[Batch, float], None, None]:
        """This rank's micro-batches of ``epoch`` past its first ``skip_steps`` steps (a resumed epoch),
        with their loss weight: one per loader batch, so that steps keep to the epoch's order on every rank.

        Failed loads are counted, and before each step's last micro-batch (the same point on every
        rank) the counts of all ranks decide whether the run stops (past ``data.max_bad_fraction``, or
        at the epoch's end when nothing loaded). A micro-batch whose images all failed comes with weight
        0: the batch itself (empty, skipped) on one process; under DDP this rank's previous micro-batch
        (zeros before any), because its backward joins the other ranks' gradient all-reduce.
        """
        loader = build_loader(
            self.dataset,
            self.cfg.batch_size,
            world_size=self.runtime.dist.world_size,
            rank=self.runtime.dist.rank,
            seed=self.cfg.seed,
            num_workers=self.data.num_workers,
            epoch=epoch,
            skip_batches=skip_steps * self.cfg.accum_steps,
            pin_memory=self.runtime.device.type == "cuda",
            collate_fn=self.collate_fn,
        )
        accum = self.cfg.accum_steps
        used = len(loader) // accum * accum  # fit() stops before a trailing partial step
        stand_in = None
        for i, batch in enumerate(loader):
            if isinstance(batch, EncodedBatch):  # data.decode gpu: decoded here, so failures on the device count
                batch = batch.decoded(self.runtime.device)
            tracker.update(batch)
            if (i + 1) % accum == 0:
                tracker.check(self.data.max_bad_fraction, epoch_end=i + 1 == used)
            if len(batch):
                stand_in = batch
                yield batch, 1.0
            elif not self.runtime.dist.enabled:
                yield batch, 0.0
            else:  # a repeat, not zeros, when there is one: BatchNorm statistics then see real images
                yield (stand_in if stand_in is not None else self._zeros_batch()), 0.0

    def _zeros_batch(self) -> Batch:
        b, c, size = self.cfg.batch_size, self.dataset.channels, self.data.img_size
        index = torch.zeros(b, dtype=torch.int64)
        return Batch(torch.zeros(b, c, size, size), index, index.clone(), failed=[])

    def train_step(
        self, parallel: Parallel, batches: Iterator[tuple[Batch, float]], epoch: int, scaler: torch.amp.GradScaler
    ) -> StepResult:
        """Forward and backward over the next ``train.accum_steps`` micro-batches, summing gradients.

        Each loss is divided by ``accum_steps``: the summed gradient is that of the mean loss, as
        one batch ``accum_steps`` times bigger would give. Under DDP all but the last micro-batch run
        in ``no_sync``, so gradients are all-reduced once a step, not once a micro-batch (FSDP
        reduce-scatters each one, see :meth:`Parallel.no_sync`). A micro-batch of weight 0 (its images
        failed to load) adds nothing: skipped when empty, else (DDP, FSDP) its loss is multiplied by 0
        so that this rank still takes part in the forward's and backward's collectives.
        """
        model = parallel.module
        accum, runtime = self.cfg.accum_steps, self.runtime
        result = StepResult([], 0, complete=False)
        for i in range(accum):
            item = next(batches, None)
            if item is None:
                return result
            batch, weight = item
            if not len(batch):
                continue
            with parallel.no_sync(defer=i < accum - 1):
                with runtime.autocast():
                    loss = self.task(model, _to_device(batch, runtime.device), epoch)["loss"]
                scaler.scale(loss / accum if weight else loss * 0.0).backward()
            if weight:
                result.losses.append(loss.detach().float())
                result.images += len(batch) * runtime.dist.world_size
        result.complete = True
        return result

    def _announce(self, schedule: Schedule) -> None:
        rt = self.runtime
        print(
            f"{type(self.task).__name__}: {schedule.steps_per_epoch} steps/epoch x {self.cfg.epochs} epochs, "
            f"effective batch {self.effective_batch()}, peak lr {schedule.peak_lr:.3g}, {rt.device}, "
            f"{rt.precision.name}, {rt.dist.world_size} process(es) -> {self.out_dir}",
            file=sys.stderr,
        )

    def _report_finished(self, schedule: Schedule, step: int) -> None:
        how = "to train again, give another --output"
        if schedule.stop_step < schedule.total_steps:
            how += f"; to go on, raise --train.max_steps (its schedule spans {schedule.total_steps} steps)"
        print(
            f"{self.out_dir} holds a finished run (step {step}, summary.json); its outputs are left as they are; {how}",
            file=sys.stderr,
        )

    def _call_hooks(self, event: str, ctx: RunContext) -> dict[str, Any]:
        """Call ``event`` on every hook that has it, in order; their returned dicts merged."""
        merged: dict[str, Any] = {}
        for hook in self.hooks:
            method = getattr(hook, event, None)
            if method is not None:
                merged.update(method(ctx) or {})
        return merged

    def _summary(
        self, schedule: Schedule, state: TrainState, logger: MetricsLogger, tracker: BadImageTracker
    ) -> dict[str, Any]:
        timing = logger.finish()
        return {
            "steps": state.step,
            "total_steps": schedule.total_steps,
            "epochs": self.cfg.epochs,
            "final_loss": logger.final_loss,
            "effective_batch": self.effective_batch(),
            "peak_lr": schedule.peak_lr,
            "seconds": timing["seconds"],
            "images_per_s": timing["images_per_s"],
            "precision": self.runtime.precision.name,
            "device": str(self.runtime.device),
            "world_size": self.runtime.dist.world_size,
            "bad_images": tracker.summary(),
        }
