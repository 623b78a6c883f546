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
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openmae.commands import convert, embed, finetune, inspect, knn, linprobe, models, pretrain, recipes, reconstruct
from openmae.config import PretrainConfig, add_config_args, config_from_args
from openmae.eval_config import FinetuneConfig, KNNConfig, LinprobeConfig


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
    "embed": Command(
        embed.EmbedSettings, embed.run, "features of a folder of images, to safetensors or .npy", embed.DESCRIPTION,
        embed.EXAMPLES,
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
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = COMMANDS[args.command]
    try:
        result = command.run(config_from_args(args, command.settings))
    except (ValueError, FileNotFoundError) as e:
        # user-facing errors (ConfigError, unsafe pickles, shape mismatches, missing decoder, ...)
        # say what to change; OPENMAE_DEBUG=1 shows the traceback
        if os.environ.get("OPENMAE_DEBUG"):
            raise
        print(f"openmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
