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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openmae.masking import MASK_TYPES
from openmae.models.classifier import GLOBAL_POOLS  # noqa: F401  (the protocols' settings read it here)

AUGMENTATIONS = ("rrc", "crop", "none", "rrc_jitter")
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
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}; 0.75 is the paper's default")
        check_choices(self, "model")
        from openmae.models import model_factory

        try:
            model_factory(self.name)
        except ValueError as e:
            raise ConfigError(f"model.name: {e}") from None


@dataclass
class DataConfig:
    name: str = opt(
        "fashion-mnist",
        "dataset: fashion-mnist, digits (scikit-learn), or folder (set --data PATH)",
        alias="--dataset",
    )
    path: str | None = opt(None, "image folder (or a folder of Fashion-MNIST IDX files)", alias="--data")
    img_size: int = opt(28, "training resolution in pixels", alias="--img-size")
    channels: int | None = opt(
        None, "image channels (1 or 3); default 1 for the grayscale built-ins (3 repeats the gray), 3 for folders"
    )
    augment: str = opt("rrc", "rrc: RandomResizedCrop+flip; crop: fixed-size crop+flip; none; rrc_jitter", choices=AUGMENTATIONS)
    crop_scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range")
    mean: list[float] | None = opt(None, "per-channel normalisation mean (default: the dataset's)")
    std: list[float] | None = opt(None, "per-channel normalisation std (default: the dataset's)")
    num_workers: int = opt(2, "data-loading processes per rank")
    limit: int | None = opt(None, "use only the first N images (quick runs)")
    max_bad_fraction: float = opt(0.05, "stop when more than this fraction of images fail to load")

    def __post_init__(self) -> None:
        if self.path is not None and self.name == "fashion-mnist" and not _looks_like_idx_dir(self.path):
            self.name = "folder"  # `--data DIR` alone means an image folder
        if self.name not in ("fashion-mnist", "digits", "folder"):
            raise ConfigError(f"data.name must be fashion-mnist, digits or folder, got {self.name!r}")
        if self.name == "folder":
            if self.path is None:
                raise ConfigError("data.name=folder needs a path: pass --data /path/to/images")
            if not Path(self.path).is_dir():
                raise ConfigError(f"data path {self.path} does not exist or is not a directory")
        if self.img_size < 1:
            raise ConfigError(f"data.img_size must be positive, got {self.img_size}")
        check_choices(self, "data")  # augment, as this class or a protocol's subclass declares it
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {self.limit}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    def num_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 3 if self.name == "folder" else 1


def _looks_like_idx_dir(path: str) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("train-images-idx3-ubyte*"))


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
        if self.base_lr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ConfigError("learning rates must be positive")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {self.betas}")

    def resolved_lr(self, effective_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * effective_batch / 256


@dataclass
class TrainConfig:
    epochs: int = opt(2, "number of epochs", alias="--epochs")
    batch_size: int = opt(256, "images per process per step (effective batch = this x accum x world)", alias="--batch-size")
    accum_steps: int = opt(1, "gradient accumulation steps", alias="--accum")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (schedule still spans epochs)")
    precision: str = precision_opt()
    device: str = device_opt()
    seed: int = opt(0, "seed of data order, augmentation, masks and init", alias="--seed")
    output_dir: str = opt("runs/pretrain", "where logs, checkpoints and the summary go", alias="--output")
    save_every: int = opt(1, "save a checkpoint every N epochs")
    save_every_steps: int | None = opt(None, "also save every N steps")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    log_every: int = opt(20, "log scalars every N steps")
    resume: str | None = opt("auto", "checkpoint to resume: a path, 'auto' (latest in output dir) or 'none'", alias="--resume")
    recon_every: int = opt(1, "reconstruct fixed held-out images every N epochs (0: never)")
    recon_images: int = opt(8, "how many held-out images those figures show")
    compile: bool = opt(False, "torch.compile the model")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.recon_every < 0 or self.recon_images < 1:
            raise ConfigError("train.recon_every must be >= 0 and train.recon_images >= 1")
        for name in ("epochs", "batch_size", "accum_steps", "save_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        check_choices(self, "train")
        if self.resume in ("none", "None", "", "no"):
            self.resume = None


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- YAML and command line --------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build ``cls`` from nested dicts; unknown keys are errors that list the valid ones."""
    hints = _field_types(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown setting {cls.__name__}.{key}; valid: {', '.join(hints)}")
        kwargs[key] = from_dict(hints[key], value) if _is_section(hints[key]) else value
    return cls(**kwargs)


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
    with open(resolve_recipe(name_or_path)) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name_or_path} must be a mapping of sections")
    return data


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _parse_value(text: str, tp: Any) -> Any:
    """One command-line token as a value of type ``tp``, read as YAML (``null``, ``[a, b]``, ``{k: v}``)."""
    return _convert(yaml.safe_load(text), text, tp)


def _convert(value: Any, text: str, tp: Any) -> Any:
    base = _unwrap_optional(tp)
    if base is Any or (value is None and base is not tp):  # null for an optional field
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return value
    if base is str:
        return text
    if base in (int, float):
        try:
            return base(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    base = typing.get_origin(base) or base
    if base in (list, dict) and not isinstance(value, base):
        raise argparse.ArgumentTypeError(f"expected a {base.__name__} like {'[a, b]' if base is list else '{k: v}'}, got {text!r}")
    return value


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
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-6 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        return {key.strip(): parsed}
    mapping = yaml.safe_load(text)
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or a mapping like {{k: v}}, got {text!r}")
    return mapping


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
    """The settings ``cls`` from parsed arguments: defaults < recipe < flags; validation runs in
    each dataclass's ``__post_init__``."""
    data: dict[str, Any] = load_recipe(args.config) if getattr(args, "config", None) else {}
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
            recipe = section.get(sf.name)
            section[sf.name] = {**recipe, **value} if isinstance(value, dict) and isinstance(recipe, dict) else value
        data[f.name] = section
    return from_dict(cls, data)
