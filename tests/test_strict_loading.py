"""Files are validated before they are trusted, and loading is strict everywhere.

Every bad file here is built in the test from a tiny MAE (2 blocks, 32 wide, 16 px, one channel, so
the digits and a folder of grey images fit it): truncated, missing an encoder block or part of its
decoder, or describing itself wrongly (a Hugging Face config.json that is a list, a non-numeric or
contradicted hidden_size, a shard index whose paths leave its folder, absurd recorded sizes). Each is
refused through the CLI with one line naming the file and what is wrong (the ``cli_fails`` fixture),
and from Python with a ``ValueError``; ``--allow-partial`` / ``allow_partial=True`` accepts a file
that lacks tensors and says which.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import openmae
from openmae.cli import main
from openmae.interop import export_pretrained, inspect_checkpoint, load

MAE = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
MAE.update(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
ARCH = "mae_vit_tiny_patch4"
DIGITS = ["--dataset", "digits", "--img-size", "16", "--data.limit", "64", "--data.num_workers", "0"]
QUICK = ["--run.device", "cpu", "--run.precision", "fp32", "--run.progress", "false"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _without(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items() if not k.startswith(prefix)}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad checkpoints of one tiny MAE, and a folder of images it can encode."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    mae = openmae.create_model(ARCH, **MAE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "trained": no tensor keeps its initial value
        for t in mae.parameters():
            if t.requires_grad:
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    good = export_pretrained(mae, root / "mae.safetensors")
    export_pretrained(mae, root / "official.pth", format="official")
    out = {"good": good, "official": root / "official.pth"}
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "truncated.pth").write_bytes((root / "official.pth").read_bytes()[:3000])
    state, meta = load_file(good), _metadata(good)
    save_file(_without(state, "blocks.1."), str(root / "no_block.safetensors"), metadata=meta)  # records depth 2
    plain = {k: v.clone() for k, v in mae.state_dict().items()}
    torch.save({"model": _without(plain, "blocks.0.")}, root / "no_block.pth")  # blocks.1 says depth 2
    torch.save({"model": _without(plain, "decoder_pred.")}, root / "half_decoder.pth")
    for name in ("truncated.safetensors", "truncated.pth", "no_block.safetensors", "no_block.pth", "half_decoder.pth"):
        out[name.replace(".", "_")] = root / name
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    out["images"] = images
    return out


def hf_folder(tmp_path: Path, mae_file: Path, config=None, name: str = "hf") -> Path:
    """A Hugging Face ViTMAE folder of the tiny MAE, its config.json replaced by ``config`` (JSON text or data)."""
    folder = tmp_path / name
    export_pretrained(openmae.load_pretrained(mae_file), folder, format="hf")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
    return folder


def hf_config(folder: Path, **changes) -> dict:
    return {**json.loads((folder / "config.json").read_text()), **changes}


# -- truncated and corrupt files ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["truncated_safetensors", "truncated_pth"])
def test_truncated_checkpoint_is_named_by_every_command(files, cli_fails, tmp_path, name):
    bad = files[name]
    cli_fails(["inspect", bad], [str(bad), "truncated"], keep=[bad])
    cli_fails(["embed", files["images"], "--checkpoint", bad, "--out", tmp_path / "f.npy"], [str(bad)], keep=[bad])
    assert not (tmp_path / "f.npy").exists()
    cli_fails(["knn", "--checkpoint", bad, *DIGITS, *QUICK, "--output", tmp_path / "k"], [str(bad)], keep=[bad])
    cli_fails(["finetune", "--checkpoint", bad, *DIGITS, "--output", tmp_path / "f"], [str(bad)], keep=[bad])
    cli_fails(["convert", bad, tmp_path / "c.pth", "--to", "official"], [str(bad)], keep=[bad])
    assert not (tmp_path / "c.pth").exists()
    with pytest.raises(ValueError, match="truncated"):
        openmae.load_pretrained(bad)


@pytest.mark.parametrize(
    "content,expect",
    [
        (b"", "too short"),  # safetensors: no header at all
        (b"\xff" * 64, "not a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not JSON"),
    ],
)
def test_corrupt_safetensors(tmp_path, cli_fails, content, expect):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    cli_fails(["inspect", bad], [str(bad), expect], keep=[bad])


@pytest.mark.parametrize(
    "content,expect",
    [
        (b"", "truncated or corrupt"),
        (b"hello world, not a checkpoint", "truncated or corrupt"),
        (b'{"model": 1}', "refusing to load"),  # pickle opcodes torch's safe unpickler does not take
    ],
)
def test_corrupt_pth(tmp_path, cli_fails, content, expect):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    cli_fails(["inspect", bad], [str(bad), expect], keep=[bad])


@pytest.mark.parametrize(
    "obj,expect",
    [
        ([1, 2, 3], "expected a dict of tensors, found list"),
        ({1: torch.zeros(2)}, "not names"),
        ({"model": {"patch_embed.proj.weight": torch.zeros(3, 4)}}, "patch_embed.proj.weight has shape (3, 4)"),
        ({"model": {"patch_embed.proj.weight": torch.zeros(0, 1, 4, 4)}}, "no empty dimension"),
        ({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": {"input_size": "big"}}, "args.input_size is 'big'"),
        ({"other": torch.zeros(2)}, "no ViT / MAE tensors recognised"),
    ],
)
def test_official_structures_are_refused_by_name(tmp_path, cli_fails, obj, expect):
    bad = tmp_path / "odd.pth"
    torch.save(obj, bad)
    cli_fails(["inspect", bad], [str(bad), expect], keep=[bad])


def test_official_args_of_the_wrong_type(files, tmp_path):
    obj = torch.load(files["official"], weights_only=True)
    torch.save({**obj, "args": {"input_size": 16, "mask_ratio": 1.5}}, tmp_path / "ratio.pth")
    with pytest.raises(ValueError, match=r"ratio\.pth: args\.mask_ratio is 1\.5"):
        openmae.load_pretrained(tmp_path / "ratio.pth")
    torch.save({**obj, "args": ["not", "a", "namespace"]}, tmp_path / "list.pth")  # ignored: no args to read
    assert openmae.load_pretrained(tmp_path / "list.pth").config["depth"] == 2


# -- a file's own description ------------------------------------------------------------------


def _with_record(files, tmp_path: Path, **config) -> Path:
    """The good file with its openmae record's config changed."""
    meta = _metadata(files["good"])
    record = json.loads(meta["openmae"])
    record["config"].update(config)
    path = tmp_path / "described.safetensors"
    save_file(load_file(files["good"]), str(path), metadata={**meta, "openmae": json.dumps(record)})
    return path


@pytest.mark.parametrize(
    "config,expect",
    [
        ({"depth": 10**9}, ["config.depth is 1000000000", "beyond any model"]),
        ({"embed_dim": "wide"}, ["config.embed_dim is 'wide'", "not a whole number"]),
        ({"embed_dim": 64}, ["config.embed_dim is 64", "tensors give 32"]),
        ({"mlp_ratio": -1}, ["config.mlp_ratio is -1"]),
        ({"img_size": 8192}, ["would allocate about", "its tensors hold"]),  # 4M tokens from a 30k-value file
        ({"depth": 1}, ["config.depth is 1", "blocks up to blocks.1"]),
    ],
)
def test_recorded_sizes_are_checked_against_the_tensors(files, tmp_path, cli_fails, config, expect):
    path = _with_record(files, tmp_path, **config)
    cli_fails(["inspect", path], [str(path), *expect], keep=[path])
    with pytest.raises(ValueError, match="described.safetensors"):
        openmae.load_pretrained(path)


@pytest.mark.parametrize("name", openmae.list_models())
def test_the_allocation_estimate_is_close_for_every_family(name):
    """The guard refuses a model of more than 4x its file's values (+ 64M): it must never refuse a
    registered model's own file, so its estimate stays within a factor of two of the real count."""
    from openmae.interop.architecture import allocation_estimate
    from tests.test_registry import shrink

    model = openmae.create_model(name, **shrink(name))
    real = sum(t.numel() for t in model.state_dict().values())
    assert 0.5 <= allocation_estimate(model.config) / real <= 2


def test_damaged_openmae_metadata(files, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(load_file(files["good"]), str(path), metadata={"openmae": "{not json"})
    with pytest.raises(ValueError, match="openmae metadata is not valid JSON"):
        openmae.load_pretrained(path)
    save_file(load_file(files["good"]), str(path), metadata={"openmae": json.dumps({"arch": 5, "config": []})})
    with pytest.raises(ValueError, match="openmae metadata is damaged"):
        openmae.load_pretrained(path)


def test_hf_config_must_be_a_json_object(files, tmp_path, cli_fails):
    folder = hf_folder(tmp_path, files["good"], config="[1, 2, 3]")
    config = folder / "config.json"
    cli_fails(["inspect", folder], [str(config), "holds a list, not a JSON object"], keep=[folder])
    config.write_text('{"model_type": "vit_mae", "hidden_size": 32,')
    cli_fails(["inspect", folder], [str(config), "not valid JSON", "line 1"], keep=[folder])
    with pytest.raises(ValueError, match="not valid JSON"):
        openmae.load_pretrained(folder)


@pytest.mark.parametrize(
    "changes,expect",
    [
        ({"hidden_size": "big"}, ["config.json hidden_size is 'big'", "not a whole number"]),
        ({"hidden_size": 64, "intermediate_size": 256}, ["config.json hidden_size is 64", "tensors give 32"]),
        ({"num_hidden_layers": -1}, ["num_hidden_layers is -1"]),
        ({"num_hidden_layers": 1}, ["config.json num_hidden_layers is 1", "blocks up to blocks.1"]),
        ({"image_size": [16, 16, 3]}, ["image_size is [16, 16, 3]"]),
        ({"image_size": 10**6}, ["image_size", "beyond any model"]),
        ({"layer_norm_eps": "tiny"}, ["layer_norm_eps is 'tiny'"]),
        ({"norm_pix_loss": "yes"}, ["norm_pix_loss is 'yes'", "true or false"]),
        ({"mask_ratio": 1.0}, ["mask_ratio is 1.0"]),
    ],
)
def test_hf_config_values_are_checked(files, tmp_path, cli_fails, changes, expect):
    folder = hf_folder(tmp_path, files["good"])
    (folder / "config.json").write_text(json.dumps(hf_config(folder, **changes)))
    cli_fails(["inspect", folder], expect, keep=[folder])


def _sharded(tmp_path: Path, files, shard_name: str) -> Path:
    """An HF folder whose weights are one shard behind a model.safetensors.index.json naming ``shard_name``."""
    folder = hf_folder(tmp_path, files["good"])
    weights = folder / "model.safetensors"
    names = list(load_file(weights))
    (folder / "model-00001-of-00001.safetensors").write_bytes(weights.read_bytes())
    weights.unlink()
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = shard_name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_shard_index_paths_stay_in_the_folder(files, tmp_path, cli_fails):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files["good"].read_bytes())
    folder = _sharded(tmp_path, files, "../outside.safetensors")
    index = folder / "model.safetensors.index.json"
    cli_fails(
        ["inspect", folder], [str(index), "../outside.safetensors", "outside the index's folder"], keep=[tmp_path]
    )
    index.write_text(index.read_text().replace("../outside.safetensors", str(outside)))
    cli_fails(["inspect", folder], [str(index), "an absolute path"], keep=[tmp_path])
    index.write_text(index.read_text().replace(json.dumps(str(outside)), '"model.safetensors.index.json"'))
    cli_fails(["inspect", folder], [str(index), "another index"], keep=[tmp_path])
    index.write_text(index.read_text().replace('"model.safetensors.index.json"', '"gone.safetensors"'))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        openmae.load_pretrained(folder)
    # a well-formed index loads the same model
    index.write_text(index.read_text().replace('"gone.safetensors"', '"model-00001-of-00001.safetensors"'))
    torch.testing.assert_close(
        openmae.load_pretrained(folder).state_dict(), openmae.load_pretrained(files["good"]).state_dict()
    )


# -- strict loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,block", [("no_block_safetensors", "blocks.1."), ("no_block_pth", "blocks.0.")])
def test_a_missing_encoder_block_is_refused_by_every_command(files, tmp_path, cli_fails, name, block):
    bad = files[name]
    expect = [str(bad), f"{block}norm1.weight", "--allow-partial"]
    cli_fails(["embed", files["images"], "--checkpoint", bad, "--out", tmp_path / "f.npy"], expect, keep=[bad])
    cli_fails(["convert", bad, tmp_path / "c.safetensors", "--to", "openmae"], expect, keep=[bad])
    cli_fails(["finetune", "--checkpoint", bad, *DIGITS, "--output", tmp_path / "ft"], expect, keep=[bad])
    cli_fails(["knn", "--checkpoint", bad, *DIGITS, *QUICK, "--output", tmp_path / "k"], expect, keep=[bad])
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "c.safetensors").exists()
    cli_fails(
        ["reconstruct", files["images"], "--checkpoint", bad, "--out", tmp_path / "r.png"], expect[:2], keep=[bad]
    )
    with pytest.raises(ValueError, match=rf"{block}norm1\.weight.*allow_partial=True"):
        openmae.load_pretrained(bad)
    with pytest.raises(ValueError, match="allow_partial=True"):
        openmae.create_model(ARCH, pretrained=bad, **MAE)
    info = inspect_checkpoint(bad)
    assert len(info["missing_encoder"]) == 12 and all(k.startswith(block) for k in info["missing_encoder"])


def test_allow_partial_accepts_the_file_with_a_report_line(files, tmp_path, capsys):
    bad = files["no_block_safetensors"]
    model, report = load(bad, allow_partial=True)
    line = report.partial_line()
    assert line is not None and "12 tensors not in the file" in line and "blocks.1.norm1.weight" in line
    good = openmae.load_pretrained(files["good"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, good.blocks[0].attn.qkv.weight)
    assert not torch.equal(model.blocks[1].attn.qkv.weight, good.blocks[1].attn.qkv.weight)  # its initial value
    built = openmae.create_model(ARCH, pretrained=bad, allow_partial=True, **MAE)
    assert built.load_report.partial_line() == line

    argv = ["embed", files["images"], "--checkpoint", bad, "--out", tmp_path / "f.npy", "--allow-partial"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "loaded partially" in err and "blocks.1.norm1.weight" in err
    argv = ["convert", bad, tmp_path / "c.safetensors", "--to", "openmae", "--allow-partial"]
    assert main([str(a) for a in argv]) == 0
    assert "loaded partially" in capsys.readouterr().out
    argv = ["finetune", "--checkpoint", bad, *DIGITS, "--epochs", "1", "--output", tmp_path / "ft", "--allow-partial"]
    argv += ["--batch-size", "32", "--eval.every", "0", "--train.progress", "false", "--train.precision", "fp32"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "loaded partially" in err and "blocks.1.norm1.weight" in err
    argv = ["reconstruct", files["images"], "--checkpoint", bad, "--out", tmp_path / "r.png", "--allow-partial"]
    assert main([str(a) for a in argv]) == 0
    assert "loaded partially" in capsys.readouterr().err and (tmp_path / "r.png").exists()


def test_a_partial_decoder_is_refused_where_the_decoder_is_kept(files, tmp_path, cli_fails, capsys):
    bad = files["half_decoder_pth"]
    cli_fails(["convert", bad, tmp_path / "c.pth", "--to", "official"], ["decoder_pred.weight", "--allow-partial"])
    with pytest.raises(ValueError, match=r"decoder_pred\.weight.*although it holds the rest"):
        openmae.load_pretrained(bad)
    info = inspect_checkpoint(bad)
    assert info["missing_encoder"] == [] and info["missing_decoder"] == ["decoder_pred.weight", "decoder_pred.bias"]
    # embed needs the encoder alone: the decoder is set aside, with nothing missing
    assert main(["embed", str(files["images"]), "--checkpoint", str(bad), "--out", str(tmp_path / "f.npy")]) == 0
    assert "loaded partially" not in capsys.readouterr().err


def test_an_encoder_only_file_loads_with_a_note(files, tmp_path):
    """No decoder at all is not a partial decoder: the MAE loads, its report says reconstruction is unavailable."""
    encoder = {k: v for k, v in load_file(files["good"]).items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    _, report = load(tmp_path / "encoder.pth", num_heads=2)
    assert report.partial_line() is None and any("no decoder" in n for n in report.notes)


def test_inspect_reports_what_is_missing(files, capsys):
    assert main(["inspect", str(files["no_block_safetensors"])]) == 0
    out = capsys.readouterr().out
    assert "missing:       12 encoder tensors not in the file" in out and "blocks.1.norm1.weight" in out
    assert main(["inspect", str(files["good"])]) == 0
    assert "tensors:       all of mae_vit_tiny_patch4's encoder and decoder" in capsys.readouterr().out


# -- convert never replaces what it should not -------------------------------------------------


def test_convert_refuses_to_overwrite(files, tmp_path, cli_fails):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"someone else's file")
    cli_fails(
        ["convert", files["good"], dst, "--to", "official"], [str(dst), "already exists", "--overwrite"], keep=[dst]
    )
    assert main(["convert", str(files["good"]), str(dst), "--to", "official", "--overwrite"]) == 0
    assert torch.load(dst, weights_only=True)["openmae"]["arch"] == ARCH
    folder = tmp_path / "hf"
    assert main(["convert", str(files["good"]), str(folder), "--to", "hf"]) == 0
    cli_fails(["convert", files["good"], folder, "--to", "hf"], ["config.json", "already exists"], keep=[folder])
    cli_fails(["convert", files["good"], dst, "--to", "hf", "--overwrite"], [str(dst), "is a file"], keep=[dst])


def test_convert_never_replaces_its_source(files, tmp_path, cli_fails):
    src = tmp_path / "m.safetensors"
    src.write_bytes(files["good"].read_bytes())
    cli_fails(["convert", src, src, "--to", "timm", "--overwrite"], ["never replaces its source"], keep=[src])
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    cli_fails(["convert", src, link, "--to", "openmae", "--overwrite"], ["never replaces its source"], keep=[src])
    folder = hf_folder(tmp_path, files["good"])
    cli_fails(["convert", folder, folder, "--to", "hf", "--overwrite"], ["never replaces its source"], keep=[folder])
    weights = folder / "model.safetensors"
    cli_fails(["convert", weights, folder, "--to", "timm", "--overwrite"], ["never replaces"], keep=[folder])
