"""The paper's ablations in miniature: one setting varied, everything else fixed.

For each value of the axis the sweep pretrains once and evaluates the encoder with the protocols
(linear probe, kNN, fine-tuning); the baselines are the same evaluations without pretraining. What
this module holds: the axes and the settings of a sweep, the run settings of each value and
protocol, the raw-pixel baselines, and the results (CSV, table, figure).
``openmae.commands.sweep`` runs it. A sweep's folder (``OUT``):

    OUT/<axis>=<value>/pretrain/     one run folder per value and protocol (resumable, finished runs kept)
    OUT/<axis>=<value>/{linprobe,knn,finetune}/
    OUT/baselines/                   random_init.safetensors, random_knn/, random_linprobe/, scratch_finetune/
    OUT/baselines.json               the baselines' top-1, each with the settings it was computed from
    OUT/results.csv                  one row per value
    OUT/<axis>.png                   top-1 against the value, one line per protocol, baselines dashed
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import io
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from openmae.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    check_types,
    from_dict,
    opt,
    show_value,
    to_dict,
)
from openmae.data import ImageDataset, collate, labelled_splits
from openmae.eval_config import FinetuneConfig, KNNConfig, LinprobeConfig
from openmae.inference import TOPK, knn_classify, topk_correct
from openmae.io import atomic_write, atomic_write_text, json_text
from openmae.run_folder import RunFolder, config_differences
from openmae.transforms import eval_transform
from openmae.visualize import DPI

# name -> (the setting it varies, where the paper varies it)
AXES: dict[str, tuple[str, str]] = {
    "mask_ratio": ("model.mask_ratio", "Fig. 5"),
    "decoder_depth": ("model.kwargs.decoder_depth", "Table 1a"),
    "decoder_width": ("model.kwargs.decoder_embed_dim", "Table 1b"),
    "mask_token_in_encoder": ("model.kwargs.mask_token_in_encoder", "Table 1c"),
    "norm_pix_loss": ("model.norm_pix_loss", "Table 1d"),
    "augment": ("data.augment", "Table 1e"),
    "mask_type": ("model.mask_type", "Table 1f"),
    "epochs": ("train.epochs", "Fig. 7"),
}
PROTOCOLS = ("linprobe", "knn", "finetune")
BASELINES = ("raw", "random", "scratch")
# settings the sweep sets for each of its runs: not an axis
SET_BY_SWEEP = ("train.output_dir", "train.resume")
# (label, the protocol whose colour it takes, line style) of each baseline, in the order they are drawn
BASELINE_LINES = {
    "raw_knn": ("raw pixels, kNN", "knn", "--"),
    "raw_logreg": ("raw pixels, logistic regression", "linprobe", "--"),
    "random_knn": ("random init, kNN", "knn", ":"),
    "random_linprobe": ("random init, linear probe", "linprobe", ":"),
    "scratch_finetune": ("supervised from scratch", "finetune", "-."),
}
COLOURS = {"linprobe": "tab:blue", "knn": "tab:green", "finetune": "tab:red"}
BASE = object()  # pretrain_settings' value for the sweep's own settings, the axis not applied


# -- settings ------------------------------------------------------------------------------------


@dataclass
class SweepSettings:
    axis: str | None = opt(
        None, f"the setting to vary: {', '.join(AXES)}, or a dotted path (model.kwargs.depth, optim.base_lr)",
        alias="--axis",
    )
    values: list = opt([], "its values, one pretraining each, read as YAML (0.75, true, rrc)", alias="--values")
    protocols: list[str] = opt(
        list(PROTOCOLS), "how each encoder is evaluated: linprobe, knn, finetune (none: pretrain only)", alias="--protocols"
    )
    baselines: list[str] = opt(
        list(BASELINES),
        "raw: kNN and logistic regression on the pixels; random: the protocols on the encoder at its initialisation "
        "(pretraining's step 0); scratch: fine-tuning from that initialisation; none: no baselines",
        alias="--baselines",
    )

    def __post_init__(self) -> None:
        check_types(self, "sweep")
        for name, known in (("protocols", PROTOCOLS), ("baselines", BASELINES)):
            chosen = [v for v in getattr(self, name) if v != "none"]
            unknown = [v for v in chosen if v not in known]
            if unknown:
                raise ConfigError(f"sweep.{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)} or none")
            setattr(self, name, list(dict.fromkeys(chosen)))


@dataclass
class SweepTrain(TrainConfig):
    output_dir: str = opt(
        "runs/sweep", "the sweep's folder: a run folder per value and protocol, results.csv, baselines.json, "
        "AXIS.png", alias="--output",
    )


@dataclass
class ProtocolBudget:
    """How a trained protocol runs in the sweep; its other settings are its command's defaults."""

    epochs: int = opt(4, "epochs (openmae linprobe's default)")
    batch_size: int = opt(256, "images per step")
    limit: int | None = opt(None, "the first N images of each split (null: data.limit)")
    overrides: dict = opt({}, "any other setting of the protocol, as its recipe gives it: {optim: {base_lr: 8}}")

    section = "linprobe"  # its name in messages (not a setting)

    def __post_init__(self) -> None:
        check_types(self, self.section)
        for name in ("epochs", "batch_size", "limit"):
            if (getattr(self, name) or 1) < 1:
                raise ConfigError(f"{self.section}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class FinetuneBudget(ProtocolBudget):
    section = "finetune"
    epochs: int = opt(2, "epochs, of fine-tuning and of the supervised-from-scratch baseline (openmae finetune's default)")


@dataclass
class KNNBudget:
    k: int = opt(20, "neighbours that vote (also for raw pixels)")
    temperature: float = opt(0.07, "votes weigh exp(cosine similarity / temperature)")
    limit: int | None = opt(None, "the first N images of each split: memory bank and queries (null: data.limit)")
    overrides: dict = opt({}, "any other setting of openmae knn, as its recipe gives it: {knn: {batch_size: 512}}")

    def __post_init__(self) -> None:
        check_types(self, "knn")
        if self.k < 1 or (self.limit or 1) < 1:
            raise ConfigError(f"knn.k and knn.limit must be >= 1, got {self.k} and {self.limit}")
        if self.temperature <= 0:
            raise ConfigError(f"knn.temperature must be > 0, got {self.temperature}")


@dataclass
class SweepConfig:
    """``openmae sweep``: pretraining's sections (a pretraining recipe works as ``--config``), the
    axis and its values, and how each protocol runs."""

    sweep: SweepSettings = field(default_factory=SweepSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: SweepTrain = field(default_factory=SweepTrain)
    linprobe: ProtocolBudget = field(default_factory=ProtocolBudget)
    knn: KNNBudget = field(default_factory=KNNBudget)
    finetune: FinetuneBudget = field(default_factory=FinetuneBudget)


# -- the axis and its values -----------------------------------------------------------------------


def axis_path(axis: str | None) -> tuple[str, ...]:
    """The setting an axis varies, as keys into the pretraining settings: ``("model", "mask_ratio")``,
    ``("model", "kwargs", "decoder_depth")``. A ConfigError names the axes for anything else."""
    if not axis:
        raise ConfigError(f"sweep.axis is not set: pass --axis NAME ({', '.join(AXES)}, or a dotted setting path)")
    if axis in AXES:
        return tuple(AXES[axis][0].split("."))
    keys = tuple(axis.split("."))
    sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
    fields = [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)]
    if len(keys) == 3 and keys[:2] == ("model", "kwargs") and keys[2].isidentifier():
        return keys
    if axis in fields and axis != "model.kwargs":
        if axis in SET_BY_SWEEP:
            raise ConfigError(f"sweep.axis {axis} is set by the sweep for each run; choose another setting")
        return keys
    close = difflib.get_close_matches(axis, [*AXES, *fields], n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        f"unknown sweep.axis {axis!r}; {guess}axes: {', '.join(AXES)}, or a setting path such as optim.base_lr or "
        "model.kwargs.depth"
    )


def value_text(value: Any) -> str:
    """A value as the sweep names it (folders, CSV, table): 0.75, true, rrc, [0.5,1.0]."""
    return value if isinstance(value, str) else show_value(value).replace(" ", "")


def value_folder(axis: str, value: Any) -> str:
    """``mask_ratio=0.75``: the value's folder name (characters a file name should not hold become _)."""
    return re.sub(r"[^\w.,+=\-\[\]]", "_", f"{axis}={value_text(value)}")


def check_values(axis: str, values: list) -> None:
    if not values:
        raise ConfigError(f"sweep.values is empty: pass --values, e.g. --axis {axis} --values 0.5 0.75")
    seen: dict[str, Any] = {}
    for value in values:
        folder = value_folder(axis, value)
        if folder in seen:
            raise ConfigError(f"sweep.values lists {value_text(value)} twice (as {value_text(seen[folder])}); "
                              "give each value once")
        seen[folder] = value


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section (a copy)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else copy.deepcopy(value)
    return out


def pretrain_settings(cfg: SweepConfig, output_dir: str | Path, value: Any = BASE) -> PretrainConfig:
    """The pretraining of ``value`` (default: the sweep's base settings, the axis left as they set it),
    written to ``output_dir``. A value the setting refuses is a ConfigError naming it."""
    data = {name: to_dict(getattr(cfg, name)) for name in ("model", "data", "optim")}
    data["train"] = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(TrainConfig)}
    data["train"].update(resume="auto", output_dir=str(output_dir))
    if value is not BASE:
        keys = axis_path(cfg.sweep.axis)
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    try:
        return from_dict(PretrainConfig, data)
    except ConfigError as e:
        if value is BASE:
            raise
        raise ConfigError(f"sweep value {cfg.sweep.axis}={value_text(value)}: {e}") from None


def protocol_data(cfg: SweepConfig, protocol: str, pretrain: PretrainConfig) -> dict[str, Any]:
    """The data settings of ``protocol``: pretraining's images at its resolution, the protocol's own
    augmentation, and its budget's image limit (default: the sweep's ``data.limit``)."""
    data = to_dict(pretrain.data)
    for key in ("augment", "crop_scale"):
        data.pop(key)
    limit = getattr(cfg, protocol).limit
    data["limit"] = limit if limit is not None else cfg.data.limit
    return data


def protocol_settings(
    cfg: SweepConfig, protocol: str, pretrain: PretrainConfig, checkpoint: str | Path, output_dir: str | Path
) -> LinprobeConfig | KNNConfig | FinetuneConfig:
    """The settings of ``protocol`` on the encoder in ``checkpoint`` (a file), from the sweep's budget
    for it and the data and run settings of ``pretrain``; results go to ``output_dir``."""
    budget = getattr(cfg, protocol)
    run = {"seed": cfg.train.seed, "device": cfg.train.device, "precision": cfg.train.precision,
           "progress": cfg.train.progress, "output_dir": str(output_dir)}
    settings: dict[str, Any] = {"model": {"checkpoint": str(checkpoint)}, "data": protocol_data(cfg, protocol, pretrain)}
    if protocol == "knn":
        settings.update(knn={"k": budget.k, "temperature": budget.temperature}, run=run)
        cls: type = KNNConfig
    else:
        settings["train"] = {**run, "epochs": budget.epochs, "batch_size": budget.batch_size}
        cls = LinprobeConfig if protocol == "linprobe" else FinetuneConfig
    try:
        return from_dict(cls, _merge(settings, budget.overrides))
    except ConfigError as e:
        raise ConfigError(f"{protocol} settings of the sweep (--{protocol}.*): {e}") from None


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def same_settings(output_dir: Path, settings: Any) -> bool:
    """Whether the run recorded in ``output_dir/config.yaml`` had ``settings``, in everything that
    changes its result (:data:`openmae.run_folder.HARMLESS` and where kNN runs aside)."""
    old = _read(output_dir / "config.yaml", yaml.safe_load)
    if not isinstance(old, dict) or not isinstance(old.get("data"), dict):
        return False
    new = to_dict(settings)
    for key in ("mean", "std"):  # a run records the dataset's statistics where the settings leave them unset
        if new["data"].get(key) is None:
            new["data"][key] = old["data"].get(key)
    ignored = {"run.output_dir", "run.progress", "run.device"}  # kNN's, as train.* are for the others
    return not [d for d in config_differences(old, new) if d[0] not in ignored]


def finished(output_dir: str | Path, settings: PretrainConfig | LinprobeConfig | FinetuneConfig | KNNConfig) -> Any:
    """The result of a run already finished in ``output_dir`` with ``settings`` (pretraining's summary,
    a protocol's metrics), else None: the run is then started or resumed as usual, and its folder
    refuses settings that differ from those it was started with."""
    output_dir = Path(output_dir)
    if not same_settings(output_dir, settings):
        return None
    if not isinstance(settings, KNNConfig):  # a trained run ends with summary.json at its last step
        summary = _read(output_dir / "summary.json", json.loads)
        if not isinstance(summary, dict) or not isinstance(summary.get("total_steps"), int):
            return None
        stop = summary["total_steps"] if settings.train.max_steps is None else min(settings.train.max_steps,
                                                                                   summary["total_steps"])
        if RunFolder(output_dir).finished_summary(stop) is None:
            return None
        if isinstance(settings, PretrainConfig):
            return summary
    metrics = _read(output_dir / "metrics.json", json.loads)
    return metrics if isinstance(metrics, dict) else None


# -- baselines --------------------------------------------------------------------------------------


def write_initialisation(pretrain: PretrainConfig, path: Path) -> Path:
    """The model ``pretrain`` trains, at its initialisation (pretraining's step 0: seeded the same
    way), saved to ``path``: the encoder of the random-init and from-scratch baselines. A file
    already there is kept if it holds these weights, else refused (it belongs to other settings)."""
    from openmae.interop import save_pretrained
    from openmae.io import read_safetensors
    from openmae.runs import build_pretrain_model

    torch.manual_seed(pretrain.train.seed)  # as run_pretrain seeds before it builds the model
    model = build_pretrain_model(pretrain, pretrain.data.num_channels())
    if not path.exists():
        return save_pretrained(model, path)
    saved, _ = read_safetensors(path)
    state = model.state_dict()
    if saved.keys() != state.keys() or not all(torch.equal(saved[k], state[k]) for k in state):
        raise ConfigError(
            f"{path} holds the initialisation of another model or seed than this sweep's; the sweep folder "
            f"{path.parent.parent} belongs to those settings: give this sweep another --output"
        )
    return path


def pixels(dataset: ImageDataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` flattened (N, C*H*W) after its transform, and the labels (N,);
    images that fail to decode are left out."""
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    xs, ys = [], []
    for batch in loader:
        if len(batch):
            xs.append(batch.images.flatten(1))
            ys.append(batch.labels)
    return torch.cat(xs), torch.cat(ys)


def raw_splits(data: DataConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Both labelled splits with the evaluation transform (resized, normalised, not augmented)."""
    train, test = labelled_splits(data, seed, "the raw-pixel baseline")
    train.transform = eval_transform(data.img_size, train.mean, train.std)
    return train, test


def raw_pixel_knn(data: DataConfig, seed: int, k: int, temperature: float) -> dict[str, Any]:
    """Weighted kNN (cosine, the same vote as ``openmae knn``) on flattened normalised pixels."""
    start = time.perf_counter()
    train, test = raw_splits(data, seed)
    (x_train, y_train), (x_test, y_test) = pixels(train), pixels(test)
    scores = knn_classify(x_train, y_train, x_test, train.num_classes, k, temperature)
    correct = topk_correct(scores, y_test)
    return {
        **{f"top{kk}": round(100.0 * c / len(y_test), 4) for kk, c in zip(TOPK, correct)},
        "images": len(y_test), "memory": len(y_train), "k": k, "temperature": temperature,
        "seconds": round(time.perf_counter() - start, 1),
    }


def raw_pixel_logreg(data: DataConfig, seed: int, max_iter: int = 200) -> dict[str, Any]:
    """Multinomial logistic regression (scikit-learn, L2, C=1, lbfgs) on flattened normalised pixels."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    train, test = raw_splits(data, seed)
    (x_train, y_train), (x_test, y_test) = pixels(train), pixels(test)
    classifier = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below as converged: false
        classifier.fit(x_train.numpy(), y_train.numpy())
    top1 = 100.0 * float((classifier.predict(x_test.numpy()) == y_test.numpy()).mean())
    iterations = int(np.max(classifier.n_iter_))
    return {
        "top1": round(top1, 4), "images": len(y_test), "train_images": len(y_train), "iterations": iterations,
        "converged": iterations < max_iter, "seconds": round(time.perf_counter() - start, 1),
    }


def read_baselines(path: Path) -> dict[str, Any]:
    """``baselines.json``: ``{name: {"settings": ..., "top1": ..., ...}}`` ({} when absent or unreadable)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def cached(baselines: dict[str, Any], name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The cached baseline ``name`` if it was computed with ``settings`` (compared as JSON holds them)."""
    entry = baselines.get(name)
    if isinstance(entry, dict) and entry.get("settings") == json.loads(json.dumps(settings)):
        return entry
    return None


# -- results ------------------------------------------------------------------------------------------


def result_row(axis: str, value: Any, pretrain: dict[str, Any], protocols: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One CSV row: the value, pretraining's time and final loss, each protocol's top-1 and time."""
    row: dict[str, Any] = {
        "axis": axis, "value": value_text(value),
        "pretrain_seconds": pretrain.get("seconds"), "final_loss": pretrain.get("final_loss"),
    }
    monitor = pretrain.get("knn")
    if isinstance(monitor, dict):  # the kNN monitor, where --train.knn_every was on
        row["monitor_knn_top1"] = monitor.get("top1")
    for name, metrics in protocols.items():
        row[f"{name}_top1"] = metrics.get("top1")
        row[f"{name}_seconds"] = metrics.get("seconds")
    return row


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``results.csv`` (atomic): the columns of every row, in the order they first appear."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(axis: str, rows: list[dict[str, Any]], protocols: list[str], baselines: dict[str, Any]) -> str:
    """The results as a text table, top-1 (%) per protocol, the baselines as rows under the values."""
    head = [axis, *protocols, "pretrain s", "final loss"]
    body = [[row["value"], *(_cell(row.get(f"{p}_top1")) for p in protocols), _cell(row["pretrain_seconds"], 0),
             _cell(row["final_loss"], 4)] for row in rows]
    under = {
        "raw pixels": {"knn": "raw_knn", "linprobe": "raw_logreg"},
        "random init": {"knn": "random_knn", "linprobe": "random_linprobe"},
        "from scratch": {"finetune": "scratch_finetune"},
    }
    extra = []
    for label, columns in under.items():
        cells = [_cell((baselines.get(columns[p]) or {}).get("top1")) if p in columns else "" for p in protocols]
        if any(c not in ("", "-") for c in cells):
            extra.append([label, *cells, "", ""])
    widths = [max(len(str(r[i])) for r in [head, *body, *extra]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # the first column left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), *map(line, body)]
    if extra:
        out += ["-" * len(out[0]), *map(line, extra)]
    return "\n".join(row.rstrip() for row in out)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(
    path: Path, axis: str, values: list[Any], rows: list[dict[str, Any]], protocols: list[str],
    baselines: dict[str, Any], title: str | None = None,
) -> Path:
    """Top-1 (%) against the axis value, one line per protocol, the baselines as horizontal lines in
    their protocol's colour (as the paper's Fig. 5). Numeric values on a numeric axis, others evenly spaced."""
    from matplotlib.figure import Figure

    done = {row["value"]: row for row in rows}
    xs = [float(v) for v in values] if _numeric(values) else list(range(len(values)))
    fig = Figure(figsize=(7.0, 4.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    for protocol in protocols:
        points = [(x, done[value_text(v)].get(f"{protocol}_top1")) for x, v in zip(xs, values) if value_text(v) in done]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), "o-", color=COLOURS[protocol], label=protocol)
    for name, (label, protocol, style) in BASELINE_LINES.items():
        top1 = (baselines.get(name) or {}).get("top1")
        if top1 is not None:
            ax.axhline(top1, ls=style, lw=1.0, color=COLOURS[protocol], label=f"{label} ({top1:.1f})")
    ax.set_xticks(xs)
    ax.set_xticklabels([value_text(v) for v in values])
    ax.set_xlabel(axis)
    ax.set_ylabel("top-1 (%), held-out split")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"openmae sweep: {axis}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json_text(data, indent=2) + "\n")
