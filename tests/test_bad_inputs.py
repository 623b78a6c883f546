"""Bad inputs through the CLI: each one gets exit 2 and one `openmae CMD: error:` line naming the
file or setting, with no traceback, and leaves every file (and folder) that existed as it was.

Resuming, loading checkpoints and reading images have their own tables (test_fault_injection,
test_strict_loading, test_bad_images); this one covers settings, recipes and output paths.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest

from openmae.cli import COMMANDS, describe_error, main
from openmae.masking import largest_mask_ratio, num_kept

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores permissions
needs_permissions = pytest.mark.skipif(ROOT, reason="root ignores file permissions")

# a run that stops at once (16 images, too few for a batch) if a case wrongly got through
QUICK = [
    "--dataset", "digits", "--data.limit", "16", "--data.num_workers", "0", "--train.recon_every", "0",
    "--train.progress", "false",
]  # fmt: skip


def pretrain(*args: str, recipe: bool = False) -> list[str]:
    """``openmae pretrain`` into the test's ``out`` folder, with ``recipe.yaml`` when ``recipe``."""
    return ["pretrain", *(["--config", "recipe.yaml"] if recipe else []), "--output", "out", *QUICK, *args]


# (id, recipe.yaml text or None, argv, strings the message must name); argv paths are relative to
# the test's folder, which holds out/previous.txt (an earlier run's file), a file `afile.txt` and
# a folder `images/` with one file.
CASES = [
    # recipes: wrong types, named by file, dotted key and the expected type
    ("epochs-lots", "train: {epochs: lots}", pretrain(recipe=True),
     ["recipe.yaml", "train.epochs must be an integer", "'lots'"]),
    ("batch-size-fractional", "train: {batch_size: 64.7}", pretrain(recipe=True),
     ["recipe.yaml", "train.batch_size must be an integer, got 64.7", "whole number"]),
    ("base-lr-abc", "optim: {base_lr: abc}", pretrain(recipe=True),
     ["recipe.yaml", "optim.base_lr must be a number", "'abc'"]),
    ("lr-nan", "optim: {lr: .nan}", pretrain(recipe=True), ["optim.lr must be a number", "nan"]),
    ("epochs-fractional", "train: {epochs: 2.5}", pretrain(recipe=True),
     ["recipe.yaml", "train.epochs must be an integer, got 2.5"]),
    ("bool-as-quoted-word", "train: {compile: 'yes'}", pretrain(recipe=True), ["train.compile must be true or false"]),
    ("yaml-no-for-a-string", "train: {resume: no}", pretrain(recipe=True), ["train.resume must be a string", "quotes"]),
    ("list-item", "data: {crop_scale: [0.2, x]}", pretrain(recipe=True), ["data.crop_scale[1] must be a number"]),
    ("scalar-for-a-list", "optim: {betas: 0.9}", pretrain(recipe=True), ["optim.betas must be a list"]),
    ("list-for-a-mapping", "model: {kwargs: [1, 2]}", pretrain(recipe=True), ["model.kwargs must be a mapping"]),
    ("list-for-a-string", "model: {name: [a, b]}", pretrain(recipe=True), ["model.name must be a string"]),
    ("null-for-a-number", "train: {epochs: null}", pretrain(recipe=True),
     ["train.epochs must be an integer, got null"]),
    # recipes: structure
    ("recipe-a-list", "- train\n- model\n", pretrain(recipe=True), ["recipe.yaml must be a mapping of sections"]),
    ("recipe-a-scalar", "42\n", pretrain(recipe=True), ["recipe.yaml must be a mapping", "42"]),
    ("recipe-empty", "# nothing\n", pretrain(recipe=True), ["recipe.yaml is empty"]),
    ("yaml-syntax", "train: {epochs: 2\nmodel: x\n", pretrain(recipe=True),
     ["recipe.yaml is not valid YAML", "line 2"]),
    ("yaml-tab-indent", "train:\n\tepochs: 2\n", pretrain(recipe=True), ["recipe.yaml is not valid YAML", "line 2"]),
    ("unknown-setting", "train: {bacth_size: 8}", pretrain(recipe=True),
     ["recipe.yaml", "unknown setting train.bacth_size", "did you mean train.batch_size"]),
    ("unknown-section", "trian: {epochs: 1}", pretrain(recipe=True), ["unknown section trian", "did you mean train"]),
    ("section-a-scalar", "train: 5", pretrain(recipe=True), ["recipe.yaml", "train must be a mapping of settings"]),
    ("recipe-missing", None, ["pretrain", "--config", "missing.yaml"], ["no recipe 'missing.yaml'"]),
    ("recipe-a-folder", None, ["pretrain", "--config", "images"], ["recipe images is a folder"]),
    ("recipe-binary", b"\xff\xfe\x00train", pretrain(recipe=True), ["recipe.yaml is not a text file"]),
    # settings that make no sense
    ("save-every-steps-negative", "train: {save_every_steps: -3}", pretrain(recipe=True),
     ["recipe.yaml", "train.save_every_steps must be >= 0", "-3"]),
    ("max-steps-zero", "train: {max_steps: 0}", pretrain(recipe=True), ["train.max_steps must be >= 1"]),
    ("seed-negative", None, pretrain("--seed", "-1"), ["train.seed", "-1"]),
    ("workers-negative", None, pretrain("--data.num_workers", "-2"), ["data.num_workers must be >= 0"]),
    ("std-zero", None, pretrain("--data.std", "0"), ["data.std must be positive"]),
    ("mean-too-long", None, pretrain("--data.mean", "0.5", "0.5"), ["data.mean needs 1 value"]),
    ("weight-decay-negative", None, pretrain("--optim.weight_decay", "-0.1"), ["optim.weight_decay must be >= 0"]),
    ("betas-out-of-range", None, pretrain("--optim.betas", "0.9", "1.5"), ["optim.betas", "[0, 1)"]),
    ("mask-ratio-one", None, pretrain("--mask-ratio", "1.0"), ["model.mask_ratio must be in [0, 1)"]),
    ("mask-ratio-empties-the-grid", None,
     pretrain("--model", "mae_vit_micro_patch4", "--img-size", "28", "--mask-ratio", "0.99"),
     ["model.mask_ratio 0.99", "7x7 grid of 49 patches", "--mask-ratio 0.979"]),
    ("mask-ratio-empties-a-convmae-grid", None,
     pretrain("--model", "convmae_tiny_patch16", "--img-size", "32", "--mask-ratio", "0.8",
              "--model.kwargs", "{embed_dim: [8, 16, 32], depth: [1, 1, 1], num_heads: 2, decoder_embed_dim: 16}"),
     ["model.mask_ratio 0.8", "2x2 grid of 4 patches", "--mask-ratio 0.75"]),
    ("model-kwargs-wrong-type", None, pretrain("--model.kwargs", "depth=lots"),
     ["model.kwargs.depth must be an integer, got 'lots'"]),
    ("model-kwargs-unknown", None, pretrain("--model.kwargs", "dept=2"), ["cannot build mae_vit_micro_patch4", "dept"]),
    ("model-unknown", None, pretrain("--model", "mae_vit_bse_patch16"), ["model.name", "did you mean"]),
    # paths
    ("output-a-file", None, ["pretrain", "--output", "afile.txt", *QUICK],
     ["output folder afile.txt (train.output_dir) is a file"]),
    ("output-under-a-file", None, ["pretrain", "--output", "afile.txt/run", *QUICK], ["afile.txt is a file"]),
    ("data-missing", None, ["pretrain", "--data", "no_such_folder", "--output", "out"],
     ["data.path no_such_folder does not exist"]),
    ("data-a-file", None, ["pretrain", "--data", "afile.txt", "--output", "out"], ["data.path afile.txt is a file"]),
    ("data-path-for-digits", None, pretrain("--data", "images"), ["data.path images is set but data.name is digits"]),
    ("finetune-checkpoint-missing", None,
     ["finetune", "--checkpoint", "missing.pth", "--output", "out", *QUICK[:6]], ["missing.pth"]),
    ("linprobe-output-a-file", None, ["linprobe", "--output", "afile.txt", *QUICK[:6]], ["afile.txt", "is a file"]),
    ("linprobe-max-steps-zero", "train: {max_steps: 0}", ["linprobe", "--config", "recipe.yaml", "--output", "out"],
     ["recipe.yaml", "train.max_steps must be >= 1"]),
    ("finetune-tune-blocks", "finetune: {tune_blocks: -1}", ["finetune", "--config", "recipe.yaml"],
     ["finetune.tune_blocks"]),
    ("knn-checkpoint-missing", None,
     ["knn", "--checkpoint", "missing.pth", "--output", "out", "--dataset", "digits"], ["missing.pth"]),
    ("knn-output-a-file", None, ["knn", "--output", "afile.txt", "--dataset", "digits"],
     ["output folder afile.txt (run.output_dir) is a file"]),
    ("knn-k-zero", "knn: {k: 0}", ["knn", "--config", "recipe.yaml", "--output", "out"], ["recipe.yaml", "knn.k"]),
    ("reconstruct-image-missing", None, ["reconstruct", "missing.png", "--checkpoint", "c", "--out", "out/f.png"],
     ["missing.png"]),
    ("reconstruct-out-a-folder", None, ["reconstruct", "images", "--checkpoint", "c", "--out", "out"],
     ["output file out (--out) is a folder"]),
    ("reconstruct-mask-ratio-one", None,
     ["reconstruct", "images", "--checkpoint", "c", "--out", "f.png", "--mask-ratio", "0.5", "1.0"], ["--mask-ratio"]),
    ("recipes-a-folder", None, ["recipes", "images"], ["images is a folder"]),
]  # fmt: skip


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a folder (so a created folder shows too)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("an earlier run's file\n")
    (tmp_path / "afile.txt").write_text("not a folder\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "note.txt").write_text("no image here\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe,argv,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_gets_one_line_and_changes_nothing(workdir, cli_fails, recipe, argv, expect):
    if recipe is not None:
        (workdir / "recipe.yaml").write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    before = tree(workdir)
    cli_fails(argv, expect, keep=[workdir])
    assert tree(workdir) == before  # not even an empty folder was created


@needs_permissions
@pytest.mark.parametrize("command", ["pretrain", "linprobe"])
def test_a_read_only_output_folder_is_refused_before_any_work(workdir, cli_fails, command):
    readonly = workdir / "out"
    readonly.chmod(0o555)
    try:
        cli_fails([command, "--output", "out", *QUICK[:6]], ["out", "is not writable"], keep=[workdir])
        cli_fails([command, "--output", "out/run", *QUICK[:6]], ["cannot create output folder out/run"], keep=[workdir])
    finally:
        readonly.chmod(0o755)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe", "knn"])
def test_a_folder_the_os_says_is_not_writable_is_refused(workdir, cli_fails, monkeypatch, command):
    """What the read-only case checks, where the tests run as root: the folder as os.access sees it."""
    real = os.access
    monkeypatch.setattr("openmae.config.os.access", lambda p, mode: Path(p).name != "out" and real(p, mode))
    cli_fails([command, "--output", "out", "--dataset", "digits"], ["output folder out", "is not writable"],
              keep=[workdir])  # fmt: skip
    cli_fails([command, "--output", "out/run", "--dataset", "digits"], ["cannot create output folder out/run"],
              keep=[workdir])  # fmt: skip
    assert not (workdir / "out" / "run").exists()


@needs_permissions
def test_an_unreadable_recipe_is_named(workdir, cli_fails):
    recipe = workdir / "recipe.yaml"
    recipe.write_text("train: {epochs: 1}\n")
    recipe.chmod(0)
    try:
        cli_fails(["pretrain", "--config", "recipe.yaml"], ["cannot read recipe recipe.yaml", "permission denied"])
    finally:
        recipe.chmod(0o644)


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--epochs", "2.5"], "argument --train.epochs/--epochs: must be an integer, got '2.5'; write a whole number"),
        (["--batch-size", "64.7"], "must be an integer, got '64.7'"),
        (["--train.batch_size", "true"], "must be an integer, got 'true'"),
        (["--blr", "abc"], "argument --optim.base_lr/--blr: must be a number, got 'abc'"),
        (["--optim.lr", "inf"], "must be a number, got 'inf'"),
        (["--train.compile", "maybe"], "must be true or false, got 'maybe'"),
        (["--data.crop_scale", "0.2", "x"], "must be a number, got 'x'"),
        (["--train.nonsense", "1"], "unrecognized arguments: --train.nonsense"),
    ],
)
def test_a_flag_of_the_wrong_type_is_refused_by_argparse(workdir, capsys, flags, expect):
    before = tree(workdir)
    with pytest.raises(SystemExit) as exit:
        main(pretrain(*flags))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and expect in err and "Traceback" not in err  # unknown flags: the top parser's line
    assert tree(workdir) == before


def test_flags_give_numbers_their_field_types(workdir):
    from tests.test_cli import parse

    cfg = parse(pretrain("--epochs", "3.0", "--blr", "2", "--optim.lr", "1e-4"))
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.optim.base_lr == 2.0 and type(cfg.optim.base_lr) is float and cfg.optim.lr == 1e-4


# -- the error boundary ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error,expect",
    [
        (PermissionError(errno.EACCES, "Permission denied", "runs/x/config.yaml"),
         "runs/x/config.yaml: permission denied; check its permissions or choose another path"),
        (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint-00000010.safetensors"),
         "runs/x/checkpoint-00000010.safetensors: no space left on device; the disk is full"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device; the disk is full"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "weights"), "weights: is a directory; it is a folder"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a.txt/b"),
         "a.txt/b: not a directory; a part of the path"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "a -> b: invalid cross-device link"),
        (FileNotFoundError("no such checkpoint: x.pth"), "no such checkpoint: x.pth"),
        (ValueError("two\nlines"), "two lines"),
    ],
)  # fmt: skip
def test_anticipated_errors_become_one_line_naming_the_file(monkeypatch, capsys, error, expect):
    def fail(settings):
        raise error

    monkeypatch.setitem(COMMANDS, "models", dataclasses.replace(COMMANDS["models"], run=fail))
    monkeypatch.delenv("OPENMAE_DEBUG", raising=False)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == f"openmae models: error: {describe_error(error)}\n" and expect in err
    monkeypatch.setenv("OPENMAE_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["models"])


def test_library_errors_are_named(tmp_path):
    import json

    import yaml
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}")
    with pytest.raises(SafetensorError) as caught:
        load_file(tmp_path / "bad.safetensors")
    assert describe_error(caught.value).startswith("cannot read a safetensors file: ")
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads("{")
    assert describe_error(caught.value).startswith("invalid JSON: ")
    with pytest.raises(yaml.YAMLError) as caught:
        yaml.safe_load("a: [")
    assert describe_error(caught.value).startswith("invalid YAML: ") and "\n" not in describe_error(caught.value)


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("a bug"), AttributeError("a bug")])
def test_a_programming_error_keeps_its_traceback(monkeypatch, error):
    def fail(settings):
        raise error

    monkeypatch.setitem(COMMANDS, "models", dataclasses.replace(COMMANDS["models"], run=fail))
    monkeypatch.delenv("OPENMAE_DEBUG", raising=False)
    with pytest.raises(type(error)):
        main(["models"])


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "models", dataclasses.replace(COMMANDS["models"], run=interrupted))
    monkeypatch.delenv("OPENMAE_DEBUG", raising=False)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "openmae models: interrupted\n"


# -- the largest mask ratio a grid allows ---------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 16, 49, 196, 256, 3136])
def test_the_largest_mask_ratio_named_keeps_a_patch_and_is_the_largest(length):
    ratio = largest_mask_ratio(length)
    assert num_kept(length, ratio) >= 1
    above = round(ratio + 0.001, 3)
    if above < 1 and int(length * (1 - above)) < 1:
        with pytest.raises(ValueError, match=f"keeps none of the model's {length} patches.*at most {ratio}"):
            num_kept(length, above)


@pytest.mark.parametrize("token", ["{patch_size:", "a=[1", "{a: b"])
def test_a_mapping_flag_that_is_not_yaml_is_one_usage_line(capsys, token):
    from openmae.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model.kwargs", token])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "is not valid YAML" in err and "quote the whole mapping" in err
