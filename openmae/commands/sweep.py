"""``openmae sweep``: the paper's ablations in miniature; ``run_sweep`` from Python.

Each value of the axis is pretrained (``openmae pretrain``) and its encoder evaluated with the
chosen protocols (``openmae linprobe`` / ``knn`` / ``finetune``), in run folders under the sweep's
folder; baselines are computed once and cached. Every run resumes where it stopped and a finished
one is kept, so running the same command again completes a sweep (see :mod:`openmae.sweep`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from openmae.config import ConfigError, check_output_dir
from openmae.sweep import AXES, SweepConfig

DESCRIPTION = (
    "Vary one setting (the paper's Fig. 5 and Table 1 in miniature): pretrain once per value, evaluate each encoder "
    "with linear probing, kNN and fine-tuning, and set the results beside baselines (raw pixels, the encoder at "
    "random initialisation, supervised training from scratch). Writes OUTPUT/results.csv, OUTPUT/AXIS.png and a "
    "run folder per value and protocol; run the same command again to resume. Axes: "
    + ", ".join(f"{name} ({where})" for name, (_, where) in AXES.items())
    + ", or any setting path (optim.base_lr, model.kwargs.depth)."
)
EXAMPLES = """examples:
  openmae sweep --axis mask_ratio --values 0.1 0.25 0.5 0.75 0.9 --output runs/sweep_mask
  openmae sweep --axis decoder_depth --values 1 2 4 --protocols linprobe knn --baselines raw random
  openmae sweep --axis augment --values none crop rrc --epochs 1 --data.limit 10000 --finetune.epochs 1
  openmae sweep --axis model.kwargs.depth --values 2 4 6 --config cpu_small --output runs/sweep_depth
"""


def _note(line: str) -> None:
    print(f"sweep: {line}", file=sys.stderr, flush=True)


def check_sweep(cfg: SweepConfig) -> list[tuple[Any, Any, dict[str, Any]]]:
    """Everything that can be checked before any work: the axis, every value's pretraining and
    protocol settings, labelled data where a protocol or baseline needs it, the output folder.
    Returns ``(value, pretraining settings, {protocol: settings})`` per value."""
    from openmae.commands.pretrain import check_pretrain
    from openmae.data import labelled_splits
    from openmae.sweep import (
        axis_path,
        check_values,
        pretrain_settings,
        protocol_settings,
        value_folder,
        value_text,
    )

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("openmae sweep runs in one process (each of its runs on one device): start it without torchrun")
    out = check_output_dir(cfg.train.output_dir, "train.output_dir")
    if cfg.train.resume != "auto":
        raise ConfigError("the sweep resumes each of its runs where it stopped (and keeps finished ones): drop --resume")
    axis = cfg.sweep.axis
    axis_path(axis)
    check_values(axis, cfg.sweep.values)
    plan = []
    for value in cfg.sweep.values:
        folder = out / value_folder(axis, value)
        pretrain = pretrain_settings(cfg, folder / "pretrain", value)
        try:
            check_pretrain(pretrain)
        except ConfigError as e:
            raise ConfigError(f"sweep value {axis}={value_text(value)}: {e}") from None
        checkpoint = folder / "pretrain" / "model.safetensors"
        protocols = {p: protocol_settings(cfg, p, pretrain, checkpoint, folder / p) for p in cfg.sweep.protocols}
        plan.append((value, pretrain, protocols))
    if cfg.sweep.protocols:  # a quick look: the first image of each split
        data = dataclasses.replace(plan[0][1].data, limit=1)
        labelled_splits(data, cfg.train.seed, f"openmae sweep's protocols ({', '.join(cfg.sweep.protocols)})")
    return plan


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Pretrain and evaluate every value of ``cfg.sweep.axis`` (resuming finished and partial runs),
    compute or read the baselines, and write ``results.csv`` and ``AXIS.png`` in the sweep's folder.

    Returns ``{"rows": [...] (as in results.csv), "baselines": {name: {"top1", ...}}, "table": str,
    "csv": Path, "plot": Path}``.
    """
    from openmae.commands.finetune import run_finetune
    from openmae.commands.knn import run_knn
    from openmae.commands.linprobe import run_linprobe
    from openmae.commands.pretrain import run_pretrain
    from openmae.sweep import finished, format_table, plot_sweep, result_row, write_csv

    plan = check_sweep(cfg)
    out = Path(cfg.train.output_dir)
    axis, protocols = cfg.sweep.axis, cfg.sweep.protocols
    baselines = compute_baselines(cfg, out)
    runners = {"linprobe": run_linprobe, "knn": run_knn, "finetune": run_finetune}
    rows = []
    csv_path, plot_path = out / "results.csv", out / f"{axis}.png"
    for i, (value, pretrain, settings) in enumerate(plan, 1):
        where = Path(pretrain.train.output_dir).parent
        summary = finished(where / "pretrain", pretrain)
        if summary is None:
            _note(f"{where.name} ({i}/{len(plan)}): pretraining in {where / 'pretrain'}")
            summary = run_pretrain(pretrain)
        results = {}
        for protocol, protocol_cfg in settings.items():
            results[protocol] = finished(where / protocol, protocol_cfg)
            if results[protocol] is None:
                _note(f"{where.name} ({i}/{len(plan)}): {protocol} in {where / protocol}")
                results[protocol] = runners[protocol](protocol_cfg)
        rows.append(result_row(axis, value, summary, results))
        write_csv(csv_path, rows)  # after each value: an interrupted sweep shows what it has
    plot_sweep(plot_path, axis, cfg.sweep.values, rows, protocols, baselines, title=_title(cfg))
    table = format_table(axis, rows, protocols, baselines)
    return {"rows": rows, "baselines": baselines, "table": table, "csv": csv_path, "plot": plot_path}


def _title(cfg: SweepConfig) -> str:
    where = AXES.get(cfg.sweep.axis, (None, None))[1]
    paper = f" (the paper's {where})" if where else ""
    return f"openmae sweep: {cfg.sweep.axis}{paper}, {cfg.model.name}, {cfg.data.path or cfg.data.name}"


def compute_baselines(cfg: SweepConfig, out: Path) -> dict[str, Any]:
    """The baselines of the protocols the sweep runs (raw pixels for kNN and the linear probe, the
    encoder at initialisation for them, supervised from scratch for fine-tuning), from
    ``OUT/baselines.json`` where they were computed with the same settings, else computed now and
    added to it. Each comes as ``{"top1", "seconds", "settings", ...}``."""
    from openmae.commands.finetune import run_finetune
    from openmae.commands.knn import run_knn
    from openmae.commands.linprobe import run_linprobe
    from openmae.config import DataConfig, from_dict, to_dict
    from openmae.sweep import (
        cached,
        finished,
        pretrain_settings,
        protocol_data,
        protocol_settings,
        raw_pixel_knn,
        raw_pixel_logreg,
        read_baselines,
        write_initialisation,
        write_json,
    )

    wanted, protocols = cfg.sweep.baselines, cfg.sweep.protocols
    path = out / "baselines.json"
    store = read_baselines(path)
    found: dict[str, Any] = {}
    base = pretrain_settings(cfg, out / "baselines" / "pretrain")  # never trained: the base settings
    seed = cfg.train.seed

    def keep(name: str, settings: dict[str, Any], compute) -> None:
        entry = cached(store, name, settings)
        if entry is None:
            _note(f"baseline {name}")
            entry = {**compute(), "settings": settings}
            store[name] = entry
            write_json(path, store)
        found[name] = entry

    if "raw" in wanted:
        k, temperature = cfg.knn.k, cfg.knn.temperature
        if "knn" in protocols:
            data = protocol_data(cfg, "knn", base)
            key = {"data": data, "k": k, "temperature": temperature}
            keep("raw_knn", key, lambda: raw_pixel_knn(from_dict(DataConfig, data), seed, k, temperature))
        if "linprobe" in protocols:
            data = protocol_data(cfg, "linprobe", base)
            keep("raw_logreg", {"data": data}, lambda: raw_pixel_logreg(from_dict(DataConfig, data), seed))

    runs = [(f"random_{p}", p) for p in ("knn", "linprobe") if p in protocols and "random" in wanted]
    if "scratch" in wanted and "finetune" in protocols:
        runs.append(("scratch_finetune", "finetune"))
    if runs:
        init = write_initialisation(base, out / "baselines" / "random_init.safetensors")
        runners = {"knn": run_knn, "linprobe": run_linprobe, "finetune": run_finetune}
        for name, protocol in runs:
            folder = out / "baselines" / name
            settings = protocol_settings(cfg, protocol, base, init, folder)
            run = runners[protocol]
            keep(name, to_dict(settings), lambda: _short(finished(folder, settings) or run(settings)))  # noqa: B023
    return found


def _short(metrics: dict[str, Any]) -> dict[str, Any]:
    """What baselines.json keeps of a protocol's metrics."""
    keys = ("top1", "top5", "images", "seconds", "epochs", "final_loss", "model", "pool")
    return {k: metrics[k] for k in keys if k in metrics}


def run(cfg: SweepConfig) -> str:
    result = run_sweep(cfg)
    return f"{result['table']}\nresults: {result['csv']}, figure: {result['plot']}"
