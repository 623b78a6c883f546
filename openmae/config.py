"""Typed run configuration: one dataclass per concern, YAML recipes, command-line overrides.

The defaults are the built-in CPU run (a small MAE on Fashion-MNIST, a few minutes on 2 cores);
the paper's ImageNet setups are shipped recipes (``openmae recipes``).

Every command's settings are a dataclass read by :func:`add_config_args` and
:func:`config_from_args`; every field's ``help`` becomes its CLI help. A YAML recipe holds
overrides only:

    model: {name: mae_vit_base_patch16}
    train: {epochs: 800, batch_size: 64}

Precedence: dataclass defaults < recipe (``--config``) < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openmae.masking import MASK_TYPES
from openmae.models.classifier import GLOBAL_POOLS  # noqa: F401  (the protocols' settings read it here)

AUGMENTATIONS = ("rrc", "crop", "none", "rrc_jitter")
DECODERS = ("fast", "exact", "gpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CONFIG_DIR = Path(__file__).parent / "configs"


REQUIRED: Any = dataclasses.MISSING  # opt(REQUIRED, ...): no default, the flag or positional must be given


def opt(
    default: Any, help: str, alias: str | None = None, choices: tuple | None = None, positional: bool = False
) -> Any:
    """A settings field. ``help`` is its CLI help; ``alias`` another flag spelling (``--model`` for
    ``--model.name``); ``choices`` the values it takes (argparse refuses others on the command line,
    :func:`check_choices` in ``__post_init__`` does for recipes and Python); ``positional`` makes
    it a positional argument (flat settings only, see :func:`add_config_args`)."""
    meta = {"help": help, "alias": alias, "choices": choices, "positional": positional}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def device_opt() -> Any:
    """The ``device`` field of every command that computes: the same default and help everywhere."""
    return opt("auto", "auto (this rank's GPU, else CPU), cpu, cuda, cuda:N")


def precision_opt() -> Any:
    """The ``precision`` field of every command that computes: the same default and help everywhere."""
    return opt(
        "auto",
        "auto: bf16 autocast on GPUs that support it and on CPUs where bf16 is faster, fp16 + scaler on older "
        "GPUs, else fp32; fp32 gives exact features and losses",
        choices=PRECISIONS,
    )


class ConfigError(ValueError):
    """A setting is invalid; the message says what to change."""


# -- types ------------------------------------------------------------------------------------
# Every setting is checked against its field's type wherever it is read (a recipe, a dict, a flag,
# Python construction), so a wrong type is refused by name before anything runs or is written,
# not found by a TypeError deep in training.


class _Mismatch(Exception):
    """A value does not fit a type: ``where`` (``[1]``, ``.depth``) narrows it to an item or entry."""

    def __init__(self, expected: str, value: Any, hint: str, where: str = "") -> None:
        super().__init__(expected)
        self.expected, self.value, self.hint, self.where = expected, value, hint, where


def show_value(value: Any) -> str:
    """A value as a recipe would spell it: null, true, 64.7, 'lots', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _number(value: Any) -> float | None:
    """``value`` as a finite number, None if it is not one (bools are not numbers). A string that
    reads as a number counts, as YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, numbers.Real) and math.isfinite(value):  # numpy's scalars too
        return value
    return None


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as the type ``tp`` (widening int to float, 64.0 to 64, ``'1e-4'`` to 1e-4), or _Mismatch."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in (a for a in arms if a is not type(None)):
            try:
                return _coerce(value, arm)
            except _Mismatch as e:
                errors.append(e)
        raise errors[0]  # the first arm is the field's main type (``int | None``: an integer)
    if value is None:
        hint = "give a value, or leave the setting out for its default"
        raise _Mismatch(_EXPECTED.get(origin or tp, "a value"), value, hint)
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch("true or false", value, "write true or false")
        return value
    if tp is int:
        number = _number(value) if not isinstance(value, str) else None
        if number is None or number != int(number):
            raise _Mismatch("an integer", value, "write a whole number")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _Mismatch("a number", value, "write a finite number like 0.5 or 1.5e-4")
        return float(number)
    if tp is str:
        if isinstance(value, bool):
            raise _Mismatch("a string", value, "YAML reads yes/no/on/off as true/false: put the word in quotes")
        if isinstance(value, (numbers.Real, datetime.date)):  # YAML reads 2024-01-01 as a date
            return str(value)
        if not isinstance(value, str):
            raise _Mismatch("a string", value, "write a single value")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch("a list", value, "write a list like [a, b]")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item))
            except _Mismatch as e:
                raise _Mismatch(e.expected, e.value, e.hint, f"[{i}]{e.where}") from None
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch("a mapping", value, "write a mapping like {key: value}")
        item = (typing.get_args(tp) or (str, Any))[1]
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Mismatch("a mapping with names as keys", value, f"{show_value(k)} is not a name")
            try:
                out[k] = _coerce(v, item)
            except _Mismatch as e:
                raise _Mismatch(e.expected, e.value, e.hint, f".{k}{e.where}") from None
        return out
    return value  # a type this module does not declare settings with: left to __post_init__


_EXPECTED = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"
}


def coerce_setting(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the field type ``tp``, or a ConfigError naming the setting ``key``
    (``train.batch_size must be an integer, got 64.7; write a whole number``)."""
    try:
        return _coerce(value, tp)
    except _Mismatch as e:
        raise ConfigError(f"{key}{e.where} must be {e.expected}, got {show_value(e.value)}; {e.hint}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(section: Any, name: str) -> None:
    """Check (and normalise: 64.0 -> 64, 1 -> 1.0) every field of the dataclass ``section`` against
    its declared type; ``name`` is the section's name in messages (``train`` gives
    ``train.batch_size must be an integer, got 64.7; ...``). Sections call it first in
    ``__post_init__``, so a dataclass built in Python is checked like a recipe."""
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        if _is_section(hints[f.name]):
            continue
        key = f"{name}.{f.name}" if name else f.name
        setattr(section, f.name, coerce_setting(getattr(section, f.name), hints[f.name], key))


def check_constructor_kwargs(cls: type, kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """``kwargs`` with each scalar constructor argument of ``cls`` (annotated bool, int, float or
    str) checked and converted like a setting, so ``depth=lots`` is named here rather than in a
    torch error; other arguments, and names ``cls`` does not take, are left to the constructor."""
    hints = typing.get_type_hints(cls.__init__)
    out = dict(kwargs)
    for key, value in kwargs.items():
        if _unwrap_optional(hints.get(key)) in (bool, int, float, str):
            out[key] = coerce_setting(value, hints[key], f"{name}.{key}")
    return out


def check_choices(section: Any, name: str) -> None:
    """Refuse any field of the dataclass ``section`` whose value is not among its declared ``choices``.

    argparse checks the flags (:func:`add_config_args` gives it the choices); this covers YAML
    recipes and Python construction. ``name`` is the section's name in messages (``data`` gives
    ``data.augment must be one of ...``).
    """
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{name}.{f.name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = opt("mae_vit_micro_patch4", "registered model name (openmae models lists them)", alias="--model")
    mask_ratio: float = opt(0.75, "fraction of patches removed, in [0, 1)", alias="--mask-ratio")
    mask_type: str = opt("random", "mask sampler", choices=MASK_TYPES, alias="--mask")
    norm_pix_loss: bool = opt(True, "regress per-patch normalised pixels (the paper's recipe)")
    kwargs: dict = opt({}, "other constructor overrides, repeatable: decoder_depth=4 or {decoder_depth: 4, depth: 6}")

    def __post_init__(self) -> None:
        check_types(self, "model")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(
                f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}: at least one patch must stay visible; "
                "0.75 is the paper's default"
            )
        check_choices(self, "model")
        from openmae.models import model_factory

        try:
            factory = model_factory(self.name)
        except ValueError as e:
            raise ConfigError(f"model.name: {e}") from None
        if hasattr(factory, "cls"):
            self.kwargs = check_constructor_kwargs(factory.cls, self.kwargs, "model.kwargs")


@dataclass
class DataConfig:
    name: str = opt(
        "fashion-mnist",
        "dataset: fashion-mnist, digits (scikit-learn), folder (set --data PATH), or shards (webdataset tars written "
        "by `openmae shard`; --data DST)",
        alias="--dataset",
    )
    path: str | None = opt(
        None, "image folder, folder of shards (`openmae shard`), or folder of Fashion-MNIST IDX files", alias="--data"
    )
    img_size: int = opt(28, "training resolution in pixels", alias="--img-size")
    channels: int | None = opt(
        None, "image channels: 1 or 3, or any number of bands for folders of multi-band .tif/.tiff/.npy files; "
        "default 1 for the grayscale built-ins (3 repeats the gray), 3 for folders"
    )
    augment: str = opt("rrc", "rrc: RandomResizedCrop+flip; crop: fixed-size crop+flip; none; rrc_jitter", choices=AUGMENTATIONS)
    crop_scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range")
    mean: list[float] | None = opt(
        None, "per-channel normalisation mean (default: the dataset's; multi-band folders: computed from the data)"
    )
    std: list[float] | None = opt(
        None, "per-channel normalisation std (default: the dataset's; multi-band folders: computed from the data)"
    )
    num_workers: int = opt(2, "data-loading processes per rank")
    decode: str = opt(
        "fast",
        "JPEG decoding in folders: fast (libjpeg-turbo; at 1/2-1/8 scale when the crop keeps the output's resolution), "
        "exact (PIL at full size, as before), or gpu (CUDA runs: workers only read the bytes and draw the crop, the "
        "batch is decoded by nvJPEG and cropped on the GPU; other formats decode as fast)",
        choices=DECODERS,
    )
    shuffle_buffer: int = opt(
        1000, "shards: samples each loader worker shuffles among as it streams its shards (1: the shards' own order)"
    )
    limit: int | None = opt(None, "use only the first N images (quick runs)")
    max_bad_fraction: float = opt(0.05, "stop when more than this fraction of images fail to load")
    max_image_pixels: int | None = opt(
        178_956_970,  # 2 x PIL's Image.MAX_IMAGE_PIXELS: the size PIL itself refuses as a decompression bomb
        "count an image with more pixels (width x height) than this as bad, before decoding it; null: no limit",
    )

    def __post_init__(self) -> None:
        check_types(self, "data")
        if self.path is not None and self.name == "fashion-mnist" and not _looks_like_idx_dir(self.path):
            # `--data DIR` alone means an image folder, or the shards `openmae shard` wrote there
            self.name = "shards" if _looks_like_shards(self.path) else "folder"
        if self.name not in ("fashion-mnist", "digits", "folder", "shards"):
            raise ConfigError(f"data.name must be fashion-mnist, digits, folder or shards, got {self.name!r}")
        if self.name == "digits" and self.path is not None:
            raise ConfigError(
                f"data.path {self.path} is set but data.name is digits, which is built in and reads no files; "
                "drop --data, or pass --dataset folder to train on the folder"
            )
        if self.name == "folder":
            if self.path is None:
                raise ConfigError("data.name=folder needs a path: pass --data /path/to/images")
            if not Path(self.path).is_dir():
                what = "is a file, not a folder" if Path(self.path).exists() else "does not exist"
                raise ConfigError(f"data.path {self.path} {what}; pass --data a folder of images")
        if self.name == "shards":
            if self.path is None or not Path(self.path).is_dir():
                what = "needs a path" if self.path is None else f"path {self.path} is not a folder"
                raise ConfigError(f"data.name=shards {what}: pass --data the folder `openmae shard` wrote")
            if self.channels not in (None, 1, 3):
                raise ConfigError(
                    f"data.channels {self.channels}: shards hold 1- or 3-channel images (JPEG, PNG, ...); "
                    "train multi-band images from their folder (--data DIR)"
                )
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1 sample (1: no shuffling), got {self.shuffle_buffer}")
        if self.img_size < 1:
            raise ConfigError(f"data.img_size must be positive, got {self.img_size}")
        check_choices(self, "data")  # augment, as this class or a protocol's subclass declares it
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.channels is not None and self.channels < 1:
            raise ConfigError(f"data.channels must be a number of bands >= 1, got {self.channels}")
        if self.channels not in (None, 1, 3) and self.name != "folder":
            raise ConfigError(
                f"data.channels {self.channels} needs a folder of multi-band .tif/.tiff/.npy images (--data DIR); "
                f"{self.name} has 1 channel (or 3 repeating it)"
            )
        if self.augment == "rrc_jitter" and self.num_channels() not in (1, 3):
            raise ConfigError(
                f"data.augment rrc_jitter (colour jitter) needs 1- or 3-channel images, but data.channels is "
                f"{self.channels}; use --data.augment rrc"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {self.limit}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")
        for stat in ("mean", "std"):
            values = getattr(self, stat)
            if values is not None and len(values) not in (1, self.num_channels()):
                counts = "1 value" if self.num_channels() == 1 else f"1 or {self.num_channels()} values"
                raise ConfigError(f"data.{stat} needs {counts} (one per channel), got {values}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std must be positive (it divides the pixels), got {self.std}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(
                f"data.max_image_pixels must be a positive number of pixels, got {self.max_image_pixels}; "
                "pass null for no limit"
            )

    def num_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 3 if self.name in ("folder", "shards") else 1


def _looks_like_idx_dir(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("train-images-idx3-ubyte*"))


def _looks_like_shards(path: str) -> bool:
    """A folder ``openmae shard`` wrote: its index.json beside tar files (openmae.shards reads and checks them)."""
    return (Path(path) / "index.json").is_file() and any(Path(path).glob("*.tar"))


@dataclass
class OptimConfig:
    base_lr: float = opt(1e-3, "lr = base_lr * effective batch / 256 (paper: 1.5e-4 for 800 epochs)", alias="--blr")
    lr: float | None = opt(None, "absolute learning rate (overrides base_lr)", alias="--lr")
    min_lr: float = opt(0.0, "floor of the cosine schedule")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, 1-D params, tokens)")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    warmup_epochs: float = opt(0.25, "linear warmup length in epochs (paper: 40 of 800)", alias="--warmup-epochs")
    clip_grad: float | None = opt(None, "clip the global gradient norm to this value (off by default)")

    def __post_init__(self) -> None:
        check_types(self, "optim")
        for name in ("base_lr", "lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be positive, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad must be positive (null: no clipping), got {self.clip_grad}")

    def resolved_lr(self, effective_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * effective_batch / 256


@dataclass
class TrainConfig:
    epochs: int = opt(2, "number of epochs: whole passes over the data (max_steps stops earlier)", alias="--epochs")
    batch_size: int = opt(256, "images per process per step (effective batch = this x accum x world)", alias="--batch-size")
    accum_steps: int = opt(1, "gradient accumulation steps", alias="--accum")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (schedule still spans epochs)")
    precision: str = precision_opt()
    device: str = device_opt()
    seed: int = opt(0, "seed of data order, augmentation, masks and init", alias="--seed")
    output_dir: str = opt("runs/pretrain", "where logs, checkpoints and the summary go", alias="--output")
    save_every: int = opt(1, "save a checkpoint every N epochs")
    save_every_steps: int | None = opt(None, "also save every N steps (0 or null: only at epoch ends)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    log_every: int = opt(20, "log scalars every N steps")
    resume: str | None = opt("auto", "checkpoint to resume: a path, 'auto' (latest in output dir) or 'none'", alias="--resume")
    recon_every: int = opt(1, "reconstruct fixed held-out images every N epochs (0: never)")
    recon_images: int = opt(8, "how many held-out images those figures show")
    recon_bands: list[int] | None = opt(
        None, "the channels those figures show, 0-based: 3 as R G B or 1 as gray (default: all of 1- or 3-channel "
        "images, the first three bands of multi-band ones)"
    )
    knn_every: int = opt(
        0, "pretraining: kNN top-1 of the encoder on the labelled held-out split every N epochs and after the last "
        "(knn/top1 in metrics.jsonl, TensorBoard and summary.json); 0: off",
    )
    knn_limit: int | None = opt(
        10000, "images of each split the kNN monitor encodes (memory bank and queries, re-encoded each time); null: all"
    )
    knn_k: int = opt(20, "neighbours that vote in the kNN monitor (weights exp(cosine / 0.07))")
    knn_pool: str = opt(
        "auto", "the kNN monitor's feature: token (cls token), avg (mean patch token), auto (token where the encoder "
        "has a cls token, else avg)", choices=("auto", "token", "avg"),
    )
    compile: bool = opt(
        False, "torch.compile the model (off by default: on a 2-core CPU it took 1-5 min to compile and ran "
        "0.96-1.13x as fast, benchmarks/compile_speed.py)",
    )
    strategy: str = opt(
        "ddp", "how processes under torchrun share the model: ddp (each holds all of it) or fsdp (FSDP2: weights, "
        "gradients and optimizer state sharded, each block gathered as it runs); one process ignores it",
        choices=("ddp", "fsdp"),
    )
    activation_checkpointing: bool = opt(
        False, "recompute each transformer block's activations in the backward pass instead of keeping them: "
        "less memory, about a third more compute; same gradients",
    )
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_types(self, "train")
        counts = (
            "epochs", "batch_size", "accum_steps", "save_every", "log_every", "keep_checkpoints", "recon_images", "knn_k"
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name, off in (("recon_every", "0: never"), ("save_every_steps", "0 or null: off"), ("knn_every", "0: off")):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"train.{name} must be >= 0 ({off}), got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 (null: run every epoch), got {self.max_steps}")
        if self.recon_bands is not None and (len(self.recon_bands) not in (1, 3) or min(self.recon_bands) < 0):
            raise ConfigError(
                f"train.recon_bands takes 1 band (gray) or 3 (R G B), each a 0-based index, got {self.recon_bands}"
            )
        if self.knn_limit is not None and self.knn_limit < 1:
            raise ConfigError(f"train.knn_limit must be >= 1 images (null: every image), got {self.knn_limit}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed must be a whole number in [0, 2^63), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("train.output_dir is empty; pass --output FOLDER")
        check_choices(self, "train")
        if self.resume in ("none", "None", "", "no"):
            self.resume = None


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- output paths ------------------------------------------------------------------------------
# Checked before a command does any work, so a run that cannot write its results fails at once,
# naming the path, instead of after hours of training; nothing is created by the check.


def check_output_dir(path: str | Path, setting: str = "output_dir") -> Path:
    """Refuse an output folder that is a file or cannot be created or written; returns the path.

    Creates nothing: an existing folder must be writable, a missing one needs its nearest existing
    parent to be a writable folder. ``setting`` names the option in messages (``train.output_dir``).
    """
    path = Path(path)  # os.path's tests below count a path they may not look at as missing
    what = f"output folder {path} ({setting})"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} is a file, not a folder; choose a folder path")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} is not writable; fix its permissions or choose another folder")
        return path
    _check_creatable(path, what)
    return path


def check_output_file(path: str | Path, setting: str = "out") -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be created or written;
    returns the path. Creates nothing (see :func:`check_output_dir`)."""
    path = Path(path)
    what = f"output file {path} ({setting})"
    if os.path.isdir(path):
        raise ConfigError(f"{what} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} exists and is not writable; choose another path")
    if os.path.isdir(path.parent):
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {what}: its folder {path.parent} is not writable; choose another path")
    else:
        _check_creatable(path.parent, f"the folder of {what}")
    return path


def _check_creatable(path: Path, what: str) -> None:
    """Refuse a missing folder that cannot be created: its nearest existing parent must be a writable folder."""
    parent = path.absolute()
    while not os.path.lexists(parent):
        parent = parent.parent
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create {what}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what}: {parent} is not writable; choose another path")


# -- YAML and command line --------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return _hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def from_dict(cls: type, data: dict[str, Any] | None, source: str | Path | None = None) -> Any:
    """Build the settings ``cls`` from nested dicts (a recipe's, or Python's).

    Every value is checked against its field's type, and an unknown key is refused naming the
    closest valid one, before anything is built; then each section's ``__post_init__`` checks what
    the values mean. ``source`` (the recipe file) prefixes the messages of the first kind, as only
    a recipe can give an unknown key or a wrongly typed value (flags are checked as they are parsed).
    """
    return _build(cls, _checked_from(cls, {} if data is None else data, source))


def _checked_from(cls: type, data: Any, source: str | Path | None) -> dict[str, Any]:
    """:func:`_checked`, its messages prefixed with ``recipe SOURCE:`` when ``source`` is given."""
    try:
        return _checked(cls, data, "")
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"recipe {source}: {e}") from None


def _checked(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """``data`` with every value converted to its field's type, recursively (``prefix``: ``train.``)."""
    if not isinstance(data, dict):
        what = f"{prefix.rstrip('.')} must be a mapping of settings" if prefix else "the settings must be a mapping"
        raise ConfigError(f"{what}, got {show_value(data)}; write it like {{name: value}}")
    hints = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            kind = "section" if not prefix and any(map(_is_section, hints.values())) else "setting"
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            guess = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"unknown {kind} {prefix}{key}; {guess}valid: {', '.join(hints)}")
        if _is_section(hints[key]):
            out[key] = _checked(hints[key], {} if value is None else value, f"{prefix}{key}.")
        else:
            out[key] = coerce_setting(value, hints[key], f"{prefix}{key}")
    return out


def _build(cls: type, checked: dict[str, Any]) -> Any:
    hints = _field_types(cls)
    return cls(**{k: _build(hints[k], v) if _is_section(hints[k]) else v for k, v in checked.items()})


def resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no recipe {name_or_path!r}: give a YAML path or a shipped recipe ({names})")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The mapping a YAML recipe holds (a path, or a shipped recipe's name). A file that cannot be
    read, is not YAML, or does not hold a mapping of sections is refused naming the file (and, for
    YAML syntax, the line)."""
    path = resolve_recipe(name_or_path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a text file; give a YAML recipe") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty; a recipe holds sections of overrides, e.g. train: {{epochs: 10}}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe {path} must be a mapping of sections (like train: {{epochs: 10}}), got {type(data).__name__} "
            f"{show_value(data)[:60]}"
        )
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _parse_value(text: str, tp: Any) -> Any:
    """One command-line token as a value of type ``tp``, read as YAML (``null``, ``[a, b]``, ``{k: v}``)."""
    return _convert(yaml.safe_load(text), text, tp)


def _convert(value: Any, text: str, tp: Any) -> Any:
    """``value`` (``text`` read as YAML) as the type ``tp``, with the settings' rules (:func:`coerce_setting`)."""
    base = _unwrap_optional(tp)
    if base is str and not (value is None and base is not tp):
        return text  # the token as typed: --output 2024, --resume no
    try:
        return _coerce(value, tp)
    except _Mismatch as e:
        raise argparse.ArgumentTypeError(f"must be {e.expected}, got {text!r}; {e.hint}") from None


def _parse_items(text: str, item: Any) -> list | None:
    """One token of a list flag: an item (``0.5``) or a YAML list of items (``[0.5, 0.5]``)."""
    value = yaml.safe_load(text)
    if value is None:
        return None  # `--data.mean null`: back to the default
    if isinstance(value, list):
        return [_convert(v, str(v), item) for v in value]
    return [_convert(value, text, item)]


def _parse_entries(text: str) -> dict:
    """One token of a mapping flag: ``KEY=VALUE`` (VALUE read as YAML) or a YAML mapping ``{k: v}``."""
    key, sep, value = text.partition("=")
    if sep and key.strip().isidentifier():
        parsed = _yaml_token(value, text)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-6 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        return {key.strip(): parsed}
    mapping = _yaml_token(text, text)
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or a mapping like {{k: v}}, got {text!r}")
    return mapping


def _yaml_token(value: str, text: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:  # argparse reports ArgumentTypeError as one usage line
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid YAML ({_yaml_problem(e)}); quote the whole mapping, e.g. \"{{k: v, k2: v2}}\", "
            "or pass KEY=VALUE"
        ) from None


class _Items(argparse.Action):
    """A list flag's tokens, each an item or a list of items, joined in order."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list, option_string: str | None
    ) -> None:
        joined = None if values == [None] else [item for items in values for item in items or ()]
        setattr(namespace, self.dest, joined)


class _Entries(argparse.Action):
    """A repeatable mapping flag: each occurrence adds its entries, later keys win."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: dict, option_string: str | None
    ) -> None:
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **values})


def _argument(f: dataclasses.Field, tp: Any, flat: bool) -> dict[str, Any]:
    """argparse keywords for the field ``f`` of type ``tp`` (see :func:`add_config_args`)."""
    base = _unwrap_optional(tp)
    origin = typing.get_origin(base) or base
    if f.default is not dataclasses.MISSING:
        default = f.default
    else:
        default = REQUIRED if f.default_factory is dataclasses.MISSING else f.default_factory()
    text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if flat and base is bool and default is not None:
        # a switch: an optional value would take the positional that follows (inspect --json PATH)
        help = f"do not {text}" if default else text
        return {"default": argparse.SUPPRESS, "help": help, "action": "store_const", "const": not default}
    help = text
    if default is not REQUIRED and not f.metadata.get("positional") and "(default:" not in text:
        help = f"{text} (default: {default})"
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help}
    if origin is list:
        item = (typing.get_args(base) or (Any,))[0]
        kw.update(nargs="+", action=_Items, type=lambda s, item=item: _parse_items(s, item))
    elif origin is dict:
        kw.update(action=_Entries, type=_parse_entries, metavar="KEY=VALUE")
    else:
        kw.update(type=lambda s, tp=tp: _parse_value(s, tp))
    if base is bool:
        kw["metavar"] = "{true,false}"
        if not flat:
            kw.update(nargs="?", const=True)  # --eval-only alone means true
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]  # argparse refuses other values and lists these in --help
    else:
        kw.setdefault("metavar", f.name.upper())
    if f.metadata.get("positional"):
        # no recipe gives a positional, so an absent optional one takes the field's default
        kw.update(default=default, metavar=f.name.upper(), nargs=None if default is REQUIRED else "?")
    elif default is REQUIRED:
        kw["required"] = True
    return kw


def _flat_flags(f: dataclasses.Field, tp: Any) -> list[str]:
    name = f.name.replace("_", "-")
    if _unwrap_optional(tp) is bool and f.default is True:
        name = f"no-{name}"  # the switch turns it off
    return [f"--{name}"]


def add_config_args(parser: argparse.ArgumentParser, cls: type = PretrainConfig) -> None:
    """Add the command-line arguments of the settings dataclass ``cls``.

    A field that is itself a dataclass is a section: its fields become ``--section.field`` flags
    (one help group per section), and ``--config`` reads a YAML recipe of sections. Any other field
    is flat: a flag ``--field-name``, or with ``opt(positional=True)`` a positional argument
    (optional when it has a default). A field's ``alias`` is a second spelling of its flag, and
    argparse gets its declared ``choices``. By type:

    - ``list[T]``: one or more values, ``--mean 0.5 0.5 0.5`` (a YAML list ``"[0.5, 0.5]"`` too);
    - ``dict``: repeatable, each ``KEY=VALUE`` or a YAML mapping, merged in order
      (``--set num_heads=6 --set norm_pix_loss=true``); a recipe's entries are kept unless a flag
      gives the same key;
    - ``bool`` in a section: ``--section.field [BOOL]``, the flag alone meaning true (``--eval-only``);
    - ``bool`` in flat settings: a switch that flips the default (``--json``, or ``--no-progress``
      for a field that defaults to true); a ``bool | None`` field takes ``true``/``false``;
    - anything else: one value, read as YAML and converted to the field's type.
    """
    hints = _field_types(cls)
    if any(_is_section(tp) for tp in hints.values()):
        parser.add_argument(
            "--config",
            help="YAML recipe: a path or a shipped name (see `openmae recipes`); "
            "settings are dataclass defaults < recipe < flags",
        )
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not _is_section(tp):
            kw = _argument(f, tp, flat=True)
            if f.metadata.get("positional"):
                parser.add_argument(f.name, **kw)
            else:
                aliases = [f.metadata["alias"]] if f.metadata.get("alias") else []
                parser.add_argument(*_flat_flags(f, tp), *aliases, dest=f.name, **kw)
            continue
        group = parser.add_argument_group(f.name)
        section_hints = _field_types(tp)
        for sf in dataclasses.fields(tp):
            flags = [f"--{f.name}.{sf.name}"]
            if sf.metadata.get("alias"):
                flags.append(sf.metadata["alias"])
            group.add_argument(*flags, dest=f"{f.name}.{sf.name}", **_argument(sf, section_hints[sf.name], flat=False))


def config_from_args(args: argparse.Namespace, cls: type = PretrainConfig) -> Any:
    """The settings ``cls`` from parsed arguments: defaults < recipe < flags. The recipe's keys and
    types are checked first (naming the file), the flags' as argparse reads them; what the values
    mean is checked in each dataclass's ``__post_init__``, and a refusal of a value the recipe gave
    names the recipe too."""
    data: dict[str, Any] = {}
    recipe_path, from_recipe = None, set()
    if getattr(args, "config", None):
        recipe_path = resolve_recipe(args.config)
        data = _checked_from(cls, load_recipe(args.config), recipe_path)
        # the settings the recipe gave (only sectioned settings take recipes)
        from_recipe = {f"{name}.{key}" for name, section in data.items() for key in section}
    given = vars(args)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not _is_section(tp):
            if f.name in given:
                data[f.name] = given[f.name]
            continue
        section = dict(data.get(f.name) or {})
        for sf in dataclasses.fields(tp):
            value = given.get(f"{f.name}.{sf.name}", dataclasses.MISSING)
            if value is dataclasses.MISSING:
                continue
            from_recipe.discard(f"{f.name}.{sf.name}")
            recipe = section.get(sf.name)
            section[sf.name] = {**recipe, **value} if isinstance(value, dict) and isinstance(recipe, dict) else value
        data[f.name] = section
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        key = re.match(r"[a-z_]+\.[a-z_]+", str(e))  # messages start with the setting they refuse
        if key is None or key.group() not in from_recipe:
            raise
        raise ConfigError(f"recipe {recipe_path}: {e}") from None
