"""Settings dataclasses: declared choices and types are enforced for recipes, dicts and Python construction;
settings that make no sense are refused; output paths are checked without creating anything."""

from __future__ import annotations

import pytest

from openmae.commands.reconstruct import ReconstructSettings
from openmae.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    check_output_dir,
    check_output_file,
    from_dict,
)
from openmae.eval_config import EncoderConfig, FinetuneConfig, KNNSettings, LinprobeConfig, ProbeEncoderConfig


def test_fine_tuning_refuses_the_probes_auto_pool():
    with pytest.raises(ConfigError, match="model.global_pool must be one of avg, token, got 'auto'"):
        EncoderConfig(global_pool="auto")
    assert ProbeEncoderConfig(global_pool="auto").global_pool == "auto"
    assert EncoderConfig(global_pool="token").global_pool == "token"


def test_linear_probing_refuses_drop_path_when_built():
    with pytest.raises(ConfigError, match="keeps the encoder frozen"):
        from_dict(LinprobeConfig, {"model": {"drop_path_rate": 0.1}})


# -- types: every setting is checked against its field's type, from a dict or from Python ------


@pytest.mark.parametrize(
    "data,message",
    [
        ({"train": {"epochs": "lots"}}, "train.epochs must be an integer, got 'lots'; write a whole number"),
        ({"train": {"batch_size": 64.7}}, "train.batch_size must be an integer, got 64.7"),
        ({"train": {"batch_size": True}}, "train.batch_size must be an integer, got true"),
        ({"optim": {"base_lr": "abc"}}, "optim.base_lr must be a number, got 'abc'"),
        ({"optim": {"base_lr": float("inf")}}, "optim.base_lr must be a number, got inf"),
        ({"train": {"compile": "yes"}}, "train.compile must be true or false, got 'yes'"),
        ({"train": {"compile": 1}}, "train.compile must be true or false, got 1"),
        ({"model": {"name": ["a"]}}, "model.name must be a string, got \\[.a.\\]"),
        ({"train": {"resume": False}}, "train.resume must be a string, got false; YAML reads yes/no/on/off"),
        ({"data": {"crop_scale": [0.2, "x"]}}, r"data.crop_scale\[1\] must be a number, got 'x'"),
        ({"data": {"mean": 0.5}}, "data.mean must be a list, got 0.5"),
        ({"model": {"kwargs": [1]}}, "model.kwargs must be a mapping, got \\[1\\]"),
        ({"model": {"kwargs": {1: 2}}}, "model.kwargs must be a mapping with names as keys"),
        ({"train": {"epochs": None}}, "train.epochs must be an integer, got null"),
        ({"train": 5}, "train must be a mapping of settings, got 5"),
        ({"train": {"bacth_size": 8}}, "unknown setting train.bacth_size; did you mean train.batch_size\\?"),
        ({"trian": {}}, "unknown section trian; did you mean train\\?"),
    ],
)
def test_from_dict_refuses_a_wrong_type_naming_the_setting(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PretrainConfig, data)
    with pytest.raises(ConfigError, match=f"^recipe runs/x.yaml: {message}"):
        from_dict(PretrainConfig, data, source="runs/x.yaml")


def test_values_take_their_field_types():
    cfg = from_dict(
        PretrainConfig,
        {"train": {"epochs": 3.0, "max_steps": None}, "optim": {"base_lr": 1, "lr": "1e-4", "betas": [0, 0.99]}},
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int and cfg.train.max_steps is None
    assert type(cfg.optim.base_lr) is float and cfg.optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.optim.betas == [0.0, 0.99] and all(type(b) is float for b in cfg.optim.betas)
    assert from_dict(FinetuneConfig, {"finetune": {"tune_blocks": 2}}).finetune.tune_blocks == "2"
    assert from_dict(PretrainConfig, {"train": None}).train == TrainConfig()  # an empty section


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="train.epochs must be an integer, got 2.5"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ConfigError, match="knn.temperature must be a number, got 'warm'"):
        KNNSettings(temperature="warm")
    with pytest.raises(ConfigError, match="max_images must be an integer"):
        ReconstructSettings(image_or_folder="a", checkpoint="c", out="f.png", max_images="all")


@pytest.mark.parametrize(
    "section,kwargs,message",
    [
        (TrainConfig, {"save_every_steps": -1}, "train.save_every_steps must be >= 0"),
        (TrainConfig, {"max_steps": 0}, "train.max_steps must be >= 1"),
        (TrainConfig, {"seed": -5}, "train.seed"),
        (TrainConfig, {"recon_images": 0}, "train.recon_images must be >= 1"),
        (TrainConfig, {"output_dir": " "}, "train.output_dir is empty"),
        (OptimConfig, {"lr": -1.0}, "optim.lr must be positive"),
        (OptimConfig, {"min_lr": -1e-6}, "optim.min_lr must be >= 0"),
        (OptimConfig, {"clip_grad": 0.0}, "optim.clip_grad must be positive"),
        (OptimConfig, {"betas": [0.9, 1.0]}, "optim.betas must be two numbers in \\[0, 1\\)"),
        (ModelConfig, {"mask_ratio": 1.0}, "model.mask_ratio must be in \\[0, 1\\)"),
        (ModelConfig, {"mask_ratio": -0.1}, "model.mask_ratio must be in \\[0, 1\\)"),
        (DataConfig, {"num_workers": -1}, "data.num_workers must be >= 0"),
        (DataConfig, {"std": [0.5, 0.0, 0.5], "channels": 3}, "data.std must be positive"),
        (DataConfig, {"mean": [0.5, 0.5], "channels": 3}, "data.mean needs 1 or 3 values"),
        (DataConfig, {"name": "digits", "path": "."}, "data.path . is set but data.name is digits"),
    ],
)
def test_settings_that_make_no_sense_are_refused(section, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        section(**kwargs)


def test_save_every_steps_zero_means_off():
    assert TrainConfig(save_every_steps=0).save_every_steps == 0
    assert TrainConfig(save_every_steps=None).save_every_steps is None


# -- output paths: checked before any work, creating nothing ----------------------------------


def test_check_output_dir(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert check_output_dir(tmp_path) == tmp_path
    with pytest.raises(ConfigError, match="output folder .*file \\(train.output_dir\\) is a file, not a folder"):
        check_output_dir(tmp_path / "file", "train.output_dir")
    with pytest.raises(ConfigError, match="cannot create output folder .*: .*file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "run")
    monkeypatch.setattr("openmae.config.os.access", lambda path, mode: False)  # as a read-only folder reads
    with pytest.raises(ConfigError, match="is not writable; fix its permissions"):
        check_output_dir(tmp_path)
    with pytest.raises(ConfigError, match=f"cannot create output folder .*: {tmp_path} is not writable"):
        check_output_dir(tmp_path / "new" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_check_output_file(tmp_path, monkeypatch):
    assert check_output_file(tmp_path / "sub" / "f.png") == tmp_path / "sub" / "f.png"
    with pytest.raises(ConfigError, match="output file .* \\(--out\\) is a folder"):
        check_output_file(tmp_path, "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the folder of output file"):
        check_output_file(tmp_path / "file" / "f.png")
    monkeypatch.setattr("openmae.config.os.access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="its folder .* is not writable"):
        check_output_file(tmp_path / "f.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
