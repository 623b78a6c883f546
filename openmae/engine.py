"""The one training loop. Tasks differ by a small object that turns a batch into ``{"loss": ...}``.

Order of wrapping (done here, never inside models): build the plain model on the device ->
optional ``torch.compile`` -> DDP. Checkpoints always hold the plain module's state dict.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import yaml
from torch import Tensor

from openmae import checkpoint as ckpt
from openmae.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from openmae.data import BadImageTracker, build_loader
from openmae.distributed import DistInfo, all_reduce_sum, barrier, wrap_ddp
from openmae.interop import save_pretrained
from openmae.interop.architecture import load_state
from openmae.io import atomic_write_text
from openmae.optim import build_adamw, cosine_lr, set_lr
from openmae.runtime import Runtime


class Task(Protocol):
    """What the engine needs from a pretraining / fine-tuning / probing task.

    Optional members: ``name`` (the progress bar's label, default ``pretrain``) and
    ``build_optimizer(groups, lr, optim_cfg)`` (default: AdamW with ``optim_cfg.betas``).
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

    @property
    def model(self) -> nn.Module:
        """The plain module being trained, on the run's device (never its compiled or DDP wrapper)."""
        return self.task.model

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)


class Hook(Protocol):
    """What runs beside training. Both methods are optional.

    ``on_epoch_end(ctx)`` returns metrics or None: they join the epoch's ``epoch_end`` record in
    metrics.jsonl, and the numbers go to TensorBoard. ``on_train_end(ctx)`` returns fields merged into
    the summary, or None. Hooks run on every rank, in the order given: one that writes files checks
    ``ctx.runtime.is_main``; one that computes across ranks (evaluation) needs them all.
    """

    def on_epoch_end(self, ctx: RunContext) -> dict[str, Any] | None: ...

    def on_train_end(self, ctx: RunContext) -> dict[str, Any] | None: ...


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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
    atomic_write_text(out_dir / "environment.json", json.dumps(env, indent=2) + "\n")
    with open(out_dir / "command.txt", "a") as f:
        f.write(env["command"] + "\n")


class Trainer:
    """Run a task for ``train.epochs`` epochs with AdamW, warmup + cosine, accumulation,
    optional clipping, mixed precision, DDP, logging and atomic, resumable checkpoints.

    Args:
        task: turns a batch into ``{"loss": ...}`` (see :class:`Task`).
        dataset: the training dataset (see openmae.data).
        runtime: device, process group and precision, built by the caller (``Runtime.create``).
        train, optim: the run's settings.
        data: the data settings the loop reads (``num_workers``, ``max_bad_fraction``).
        config: the whole resolved config, written next to the outputs and into checkpoints.
        hooks: run at each epoch's end and the run's (see :class:`Hook`).
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
    ) -> None:
        self.task, self.dataset, self.runtime = task, dataset, runtime
        self.cfg, self.optim_cfg, self.data = train, optim, data
        self.config = config
        self.hooks = list(hooks)
        self.device, self.dist, self.precision = runtime.device, runtime.dist, runtime.precision
        self.out_dir = Path(train.output_dir)

    # -- setup ------------------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        per_rank = len(self.dataset) // self.dist.world_size
        micro = per_rank // self.cfg.batch_size
        steps = micro // self.cfg.accum_steps
        if steps < 1:
            raise ConfigError(
                f"the dataset has {len(self.dataset)} images, too few for one step of "
                f"batch {self.cfg.batch_size} x accum {self.cfg.accum_steps} x {self.dist.world_size} processes; "
                "lower --batch-size or add images"
            )
        return steps

    def effective_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_steps * self.dist.world_size

    def _write_run_files(self) -> None:
        write_run_files(self.out_dir, self.config, self.dist)

    def find_resume(self) -> Path | None:
        """The checkpoint ``train.resume`` points at, None for a fresh run."""
        spec = self.cfg.resume
        if spec is None:
            return None
        if spec == "auto":
            return ckpt.latest_checkpoint(self.out_dir)
        path = Path(spec)
        if path.is_dir():
            found = ckpt.latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"--resume {spec}: no checkpoint-*.safetensors in that folder")
            return found
        if not path.exists():
            raise FileNotFoundError(f"--resume {spec}: no such file")
        return path

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, dist, device = self.cfg, self.dist, self.device
        seed_everything(cfg.seed)
        steps_per_epoch = self.steps_per_epoch()
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(self.optim_cfg.warmup_epochs * steps_per_epoch)
        peak_lr = self.optim_cfg.resolved_lr(self.effective_batch())

        resume_path = self.find_resume()
        model = self.task.model.to(device)
        groups = self.task.param_groups(self.optim_cfg.weight_decay)
        build_optimizer = getattr(self.task, "build_optimizer", None)
        if build_optimizer is not None:  # e.g. LARS for linear probing
            optimizer = build_optimizer(groups, peak_lr, self.optim_cfg)
        else:
            optimizer = build_adamw(groups, peak_lr, self.optim_cfg.betas)
        scaler = self.precision.scaler()
        step = 0
        if resume_path is not None:
            state = ckpt.load_training_state(resume_path)
            load_state(model, state["model"], source=str(resume_path))
            optimizer.load_state_dict(state["optimizer"])
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"], device)
            step = int(state["info"]["step"])
            if dist.is_main:
                print(f"resuming from {resume_path} at step {step}/{total_steps}", file=sys.stderr)
        if dist.is_main:
            self._write_run_files()
            print(
                f"{type(self.task).__name__}: {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, effective batch "
                f"{self.effective_batch()}, peak lr {peak_lr:.3g}, {device}, {self.precision.name}, "
                f"{dist.world_size} process(es) -> {self.out_dir}",
                file=sys.stderr,
            )
        barrier(dist)

        train_model = torch.compile(model) if cfg.compile else model
        train_model = wrap_ddp(train_model, dist, device)
        writer = self._writer()
        ctx = RunContext(self.out_dir, self.runtime, self.task, writer)
        tracker = BadImageTracker(self.dataset)
        metrics_path = self.out_dir / "metrics.jsonl"
        start_epoch, skip = divmod(step, steps_per_epoch)
        t_start = time.perf_counter()
        images_done = 0
        last_loss = float("nan")

        bar = None
        if dist.is_main and cfg.progress:
            from tqdm import tqdm

            label = getattr(self.task, "name", "pretrain")
            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=label)

        for epoch in range(start_epoch, cfg.epochs):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            ctx.epoch = epoch
            loader = build_loader(
                self.dataset,
                cfg.batch_size,
                world_size=dist.world_size,
                rank=dist.rank,
                seed=cfg.seed,
                num_workers=self.data.num_workers,
                epoch=epoch,
                skip_batches=skip * cfg.accum_steps,
                pin_memory=device.type == "cuda",
            )
            skip = 0
            model.train()
            loss_sum = torch.zeros((), device=device)  # summed on device: no per-step host sync
            loss_count = 0
            window_t, window_images = time.perf_counter(), 0
            micro = 0
            for batch in loader:
                tracker.update(batch)
                tracker.check(self.data.max_bad_fraction)
                if batch.images.shape[0] == 0:
                    continue
                if micro == 0:
                    lr = cosine_lr(step, total_steps, warmup_steps, peak_lr, self.optim_cfg.min_lr)
                    set_lr(optimizer, lr)
                micro += 1
                last_micro = micro == cfg.accum_steps
                sync = train_model.no_sync() if (dist.enabled and not last_micro) else contextlib.nullcontext()
                with sync:
                    with self.precision.autocast():
                        out = self.task(train_model, _to_device(batch, device), epoch)
                    loss = out["loss"]
                    scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += loss.detach().float()
                loss_count += 1
                window_images += batch.images.shape[0] * dist.world_size
                if not last_micro:
                    continue
                micro = 0
                if self.optim_cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), self.optim_cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if bar is not None:
                    bar.update(1)

                stopping = cfg.max_steps is not None and step >= cfg.max_steps
                if step % cfg.log_every == 0 or step == total_steps or stopping:
                    mean_loss = all_reduce_sum(loss_sum.clone(), dist).item() / (loss_count * dist.world_size)
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"loss is {mean_loss} at step {step}; lower the learning rate or try --train.precision fp32"
                        )
                    elapsed = time.perf_counter() - window_t
                    ips = window_images / max(elapsed, 1e-9)
                    last_loss = mean_loss
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss, "lr": lr, "images_per_s": ips}
                    if dist.is_main:
                        ctx.log_scalars({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": ips}, step)
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                    images_done += window_images
                    loss_sum.zero_()
                    loss_count = 0
                    window_t, window_images = time.perf_counter(), 0

                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    self._save(model, optimizer, scaler, step, epoch, device)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                if step % steps_per_epoch == 0:
                    break  # drop a trailing partial accumulation window
            images_done += window_images
            epoch_done = step % steps_per_epoch == 0 and step > 0
            if epoch_done:
                ctx.step = step
                metrics = self._call_hooks("on_epoch_end", ctx)
                if dist.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"epoch_end": epoch + 1, "step": step, **metrics}) + "\n")
                    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    ctx.log_scalars(scalars, step)
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                    self._save(model, optimizer, scaler, step, epoch, device)

        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t_start
        ctx.step = step
        summary = {
            "steps": step,
            "total_steps": total_steps,
            "epochs": cfg.epochs,
            "final_loss": last_loss,
            "effective_batch": self.effective_batch(),
            "peak_lr": peak_lr,
            "seconds": round(elapsed, 2),
            "images_per_s": round(images_done / max(elapsed, 1e-9), 2),
            "precision": self.precision.name,
            "device": str(device),
            "world_size": dist.world_size,
            "bad_images": tracker.summary(),
        }
        summary.update(self._call_hooks("on_train_end", ctx))
        if dist.is_main:
            save_pretrained(model, self.out_dir / "model.safetensors")
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if writer is not None:
                writer.close()
            bad = summary["bad_images"]
            if bad["failed_loads"]:
                print(f"{bad['failed_loads']} of {bad['images_seen']} image loads failed:", file=sys.stderr)
                for line in bad["bad_files"][:20]:
                    print(f"  {line}", file=sys.stderr)
        barrier(dist)
        return summary

    # -- helpers -----------------------------------------------------------------------------------

    def _call_hooks(self, event: str, ctx: RunContext) -> dict[str, Any]:
        """Call ``event`` on every hook that has it, in order; their returned dicts merged."""
        merged: dict[str, Any] = {}
        for hook in self.hooks:
            method = getattr(hook, event, None)
            if method is not None:
                merged.update(method(ctx) or {})
        return merged

    def _writer(self):
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def _save(self, model, optimizer, scaler, step: int, epoch: int, device: torch.device) -> None:
        if self.dist.is_main:
            info = {"step": step, "epoch": epoch + 1, "config": self.config}
            path = self.out_dir / ckpt.checkpoint_name(step)
            ckpt.save_training_state(path, model, optimizer, info, rng_state(device), scaler.state_dict())
            ckpt.prune_checkpoints(self.out_dir, self.cfg.keep_checkpoints)
        barrier(self.dist)


def _to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    nb = device.type == "cuda"
    batch.images = batch.images.to(device, non_blocking=nb)
    batch.labels = batch.labels.to(device, non_blocking=nb)
    return batch
