"""``openmae <command>``: one table of commands, all built the same way.

Each command's settings are a dataclass that openmae.config turns into flags
(:func:`~openmae.config.add_config_args`) and back (:func:`~openmae.config.config_from_args`).
The training and evaluation commands have sections (``--train.epochs``) and take YAML recipes;
the tools that read a file or folder and write one (embed, reconstruct, convert, inspect, models,
recipes) have flat settings, as a single concern with positional arguments reads best as
``--out``, not ``--embed.out``. A command's ``run(settings)`` does the work and returns its
one-line result, which main prints to stdout on rank 0 only (logs and progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from safetensors import SafetensorError

from openmae.commands import (
    convert,
    detect,
    embed,
    finetune,
    inspect,
    knn,
    linprobe,
    models,
    pretrain,
    recipes,
    reconstruct,
    segment,
    shard,
    sweep,
)
from openmae.config import PretrainConfig, add_config_args, config_from_args
from openmae.eval_config import FinetuneConfig, KNNConfig, LinprobeConfig

# the failures a user's input or machine can cause; FileNotFoundError and PermissionError are OSErrors
ANTICIPATED = (ValueError, OSError, yaml.YAMLError, SafetensorError)


@dataclass(frozen=True)
class Command:
    """One row of the table: what ``openmae NAME`` parses, runs and shows in its help."""

    settings: type  # the dataclass of its settings
    run: Callable[[Any], str | None]  # settings -> the one-line result (None: the command printed its output)
    help: str  # one line in `openmae --help`
    description: str | None = None  # `openmae CMD --help`; default: help
    examples: str | None = None


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        PretrainConfig, pretrain.run, "pretrain a masked autoencoder", pretrain.DESCRIPTION, pretrain.EXAMPLES
    ),
    "models": Command(models.ModelsSettings, models.run, "list registered models"),
    "recipes": Command(recipes.RecipesSettings, recipes.run, "list shipped YAML recipes, or print one"),
    "reconstruct": Command(
        reconstruct.ReconstructSettings, reconstruct.run,
        "figure of original / masked / reconstruction / reconstruction + visible", reconstruct.DESCRIPTION,
    ),
    "convert": Command(
        convert.ConvertSettings, convert.run,
        "convert weights between openmae, official MAE, Hugging Face ViTMAE and timm", convert.DESCRIPTION,
    ),
    "inspect": Command(
        inspect.InspectSettings, inspect.run,
        "describe a checkpoint: format, architecture, decoder, norm-pix, parameter count",
    ),
    "finetune": Command(
        FinetuneConfig, finetune.run, "fine-tune a pretrained encoder on labelled images", finetune.DESCRIPTION,
        finetune.EXAMPLES,
    ),
    "linprobe": Command(
        LinprobeConfig, linprobe.run, "linear probe of a frozen encoder on labelled images", linprobe.DESCRIPTION,
        linprobe.EXAMPLES,
    ),
    "knn": Command(KNNConfig, knn.run, "weighted kNN accuracy of frozen features", knn.DESCRIPTION, knn.EXAMPLES),
    "segment": Command(
        segment.SegmentConfig, segment.run, "fine-tune a pretrained encoder for semantic segmentation (mIoU)",
        segment.DESCRIPTION, segment.EXAMPLES,
    ),
    "detect": Command(
        detect.DetectConfig, detect.run, "fine-tune a pretrained encoder for detection / instance segmentation (mAP)",
        detect.DESCRIPTION, detect.EXAMPLES,
    ),
    "sweep": Command(
        sweep.SweepConfig, sweep.run, "vary one setting: pretrain per value, evaluate, compare with baselines",
        sweep.DESCRIPTION, sweep.EXAMPLES,
    ),
    "embed": Command(
        embed.EmbedSettings, embed.run, "features of a folder of images, to safetensors or .npy", embed.DESCRIPTION,
        embed.EXAMPLES,
    ),
    "shard": Command(
        shard.ShardSettings, shard.run, "write an image folder as webdataset tar shards, to stream in training",
        shard.DESCRIPTION, shard.EXAMPLES,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from openmae.io import openmae_version

    parser = argparse.ArgumentParser(
        prog="openmae",
        description="Masked-autoencoder pretraining and evaluation for vision models.",
    )
    parser.add_argument("--version", action="version", version=f"openmae {openmae_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=textwrap.fill(command.description or command.help, 100),
            epilog=command.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples keep their layout
        )
        add_config_args(p, command.settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``openmae ARGV``: returns the exit status, 0 when the command ran, 2 for a user error (argparse
    exits 2 itself on a flag it cannot read), 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = COMMANDS[args.command]
    try:
        result = command.run(config_from_args(args, command.settings))
    except KeyboardInterrupt:
        if os.environ.get("OPENMAE_DEBUG"):
            raise
        print(f"openmae {args.command}: interrupted", file=sys.stderr)
        return 130
    except ANTICIPATED as e:
        # user-facing errors (ConfigError, unsafe pickles, shape mismatches, a file that cannot be
        # read or written, ...) say what to change; OPENMAE_DEBUG=1 shows the traceback. Anything
        # else (a TypeError, KeyError, ... from openmae's own code) is a bug and keeps its traceback.
        if os.environ.get("OPENMAE_DEBUG"):
            raise
        print(f"openmae {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        print(result)
    return 0


def describe_error(e: BaseException) -> str:
    """One line for an anticipated failure: openmae's own message as it is; for an error from the
    system or a library, what failed, the file where it is known, and what to try."""
    if isinstance(e, OSError) and e.strerror:  # raised by the system: errno, strerror, filename
        return _describe_os_error(e)
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e}; check that the file is complete and is JSON"
    if isinstance(e, yaml.YAMLError):
        return f"invalid YAML: {' '.join(str(e).split())}"
    if isinstance(e, SafetensorError):
        return f"cannot read a safetensors file: {e}; it may be truncated or not a safetensors file"
    return " ".join(str(e).split()) or type(e).__name__  # one line


_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "the disk is full; free some space or choose another path",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another path",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _describe_os_error(e: OSError) -> str:
    """``PATH: what failed; what to try`` for an OSError the system raised (it names its file)."""
    what = e.strerror.rstrip(".").lower()
    where = e.filename
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    hint = _OS_HINTS.get(e.errno)
    line = f"{where}: {what}" if where is not None else what
    return f"{line}; {hint}" if hint else line


if __name__ == "__main__":
    sys.exit(main())
