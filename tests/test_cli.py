"""The command table: every command is built from its settings dataclass by openmae.config, shows
and enforces its declared choices, and shares the device/precision defaults. Parsing only."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import openmae
from openmae.cli import COMMANDS, build_parser, main
from openmae.config import config_from_args

NAMES = sorted(COMMANDS)


def settings_fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
    """(dest, field) of every setting: ``section.field`` in a sectioned dataclass, ``field`` in a flat one."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [(f"{f.name}.{sf.name}", sf) for sf in dataclasses.fields(hints[f.name])]
        else:
            out.append((f.name, f))
    return out


def required_argv(name: str) -> list[str]:
    """The least a command needs to parse: its positionals and required flags."""
    argv = [name]
    for dest, f in settings_fields(COMMANDS[name].settings):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        value = f.metadata["choices"][0] if f.metadata.get("choices") else "x"
        argv += [value] if f.metadata.get("positional") else [f"--{dest.replace('_', '-')}", value]
    return argv


def subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def setting(settings, dest: str):
    for part in dest.split("."):
        settings = getattr(settings, part)
    return settings


def parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    return config_from_args(args, COMMANDS[args.command].settings)


@pytest.mark.parametrize("name", NAMES)
def test_help_lists_every_declared_choice(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    for dest, f in settings_fields(COMMANDS[name].settings):
        if f.metadata.get("choices"):
            assert "{" + ",".join(f.metadata["choices"]) + "}" in shown, dest


@pytest.mark.parametrize("name", NAMES)
def test_every_argument_comes_from_the_settings_dataclass(name):
    settings = COMMANDS[name].settings
    expected = {dest for dest, _ in settings_fields(settings)} | {"help"}
    if any(dataclasses.is_dataclass(tp) for tp in typing.get_type_hints(settings).values()):
        expected.add("config")  # sectioned settings take recipes
    assert {a.dest for a in subparsers()[name]._actions} == expected
    # and the defaults parse into the dataclass
    assert isinstance(parse(required_argv(name)), settings)


def test_the_table_is_the_only_way_to_build_a_command():
    assert subparsers().keys() == COMMANDS.keys()
    for path in (Path(openmae.__file__).parent / "commands").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "argparse" not in modules, f"{path.name} builds flags by hand"


@pytest.mark.parametrize(
    "name,dest", [(n, d) for n in NAMES for d, f in settings_fields(COMMANDS[n].settings) if f.metadata.get("choices")]
)
def test_a_value_outside_the_choices_is_refused_by_argparse(name, dest, capsys):
    flag = dest if "." in dest else dest.replace("_", "-")
    with pytest.raises(SystemExit) as exit:
        main([*required_argv(name), f"--{flag}", "bogus"])
    assert exit.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_device_and_precision_default_to_auto_everywhere():
    found = set()
    for name in NAMES:
        settings = parse(required_argv(name))
        for dest, _ in settings_fields(COMMANDS[name].settings):
            key = dest.rpartition(".")[2]
            if key in ("device", "precision"):
                assert setting(settings, dest) == "auto", f"{name} {dest}"
                found.add((name, key))
    for name in ("pretrain", "finetune", "linprobe", "knn", "embed"):
        assert {(name, "device"), (name, "precision")} <= found
    assert ("reconstruct", "device") in found  # reconstruction runs in fp32 by design: no precision


def test_positional_list_and_switch_arguments_parse():
    reconstruct = ["reconstruct", "photo.jpg", "--checkpoint", "c", "--out", "f.png"]
    rec = parse([*reconstruct, "--mask-ratio", "0.75", "0.85"])
    assert rec.image_or_folder == "photo.jpg" and rec.mask_ratio == [0.75, 0.85] and rec.norm_pix_loss is None
    rec = parse([*reconstruct, "--mask", "grid", "--norm-pix-loss", "false"])
    assert rec.mask_type == "grid" and rec.norm_pix_loss is False
    emb = parse(["embed", "--no-progress", "photos", "--out", "x.npy", "--mean", ".5", ".5", ".5", "--std", "[.2, .2]"])
    assert emb.folder == "photos" and emb.progress is False and emb.mean == [0.5] * 3 and emb.std == [0.2] * 2
    conv = parse(["convert", "a", "b", "--to", "hf", "--set", "num_heads=6", "--set", "eps=1e-6", "--set", "{x: 1}"])
    assert (conv.src, conv.dst) == ("a", "b") and conv.overrides == {"num_heads": 6, "eps": 1e-6, "x": 1}
    assert parse(["inspect", "--json", "model.pth"]).json is True
    assert parse(["inspect", "model.pth"]).json is False
    assert parse(["models"]).pattern == "" and parse(["models", "vit_"]).pattern == "vit_"
    assert parse(["recipes"]).name is None


def test_section_flags_override_a_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {kwargs: {num_heads: 2, depth: 3}}\ntrain: {epochs: 7, progress: true}\n")
    cfg = parse([
        "finetune", "--config", str(recipe), "--eval-only", "--train.progress", "false",
        "--model.kwargs", "depth=4", "--model.kwargs", "{embed_dim: 64}", "--data.crop_scale", "0.3", "1.0",
    ])  # fmt: skip
    assert cfg.eval.only is True and cfg.train.progress is False and cfg.train.epochs == 7
    assert cfg.model.kwargs == {"num_heads": 2, "depth": 4, "embed_dim": 64} and cfg.data.crop_scale == [0.3, 1.0]
    assert parse(["finetune", "--eval-only", "true"]).eval.only is True
    assert parse(["pretrain", "--optim.betas", "[0.9, 0.99]"]).optim.betas == [0.9, 0.99]
    assert parse(["pretrain", "--resume", "none"]).train.resume is None


def test_errors_exit_2_and_the_result_prints_on_rank_0_only(monkeypatch, capsys):
    assert main(["recipes", "no_such_recipe"]) == 2
    assert "openmae recipes: error: no recipe 'no_such_recipe'" in capsys.readouterr().err
    monkeypatch.setenv("OPENMAE_DEBUG", "1")
    with pytest.raises(ValueError, match="no recipe"):
        main(["recipes", "no_such_recipe"])
    monkeypatch.setitem(COMMANDS, "models", dataclasses.replace(COMMANDS["models"], run=lambda s: f"found {s.pattern}"))
    for rank, printed in (("0", "found vit\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert main(["models", "vit"]) == 0
        assert capsys.readouterr().out == printed
