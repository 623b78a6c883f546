"""Fine-tuning at another resolution than pretraining: position tables follow the model's grid.

A fixed sin-cos table is recomputed for the new grid (so it equals a freshly built model's); a
learned one is resampled bicubically with its cls row kept, from the grid of the image size the
file records (non-square included), else the square grid of its rows. Tiny models: 32-wide, two
blocks, patch 4 (ViT) or ConvViT's 16-px stage-3 patches.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import openmae
from openmae.cli import main
from openmae.patches import is_sincos, resample_pos_embed, sincos_2d

VIT = dict(embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
CONVVIT = dict(embed_dim=(16, 16, 32), depth=(1, 1, 2), num_heads=2)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    """An MAE pretrained (here: initialised) at 32 px: an 8 x 8 grid of 4-px patches."""
    torch.manual_seed(1)
    mae = openmae.create_model("mae_vit_micro_patch4", img_size=32, **VIT, **DECODER)
    return mae, openmae.save_pretrained(mae, tmp_path_factory.mktemp("mae") / "mae.safetensors")


def learned_classifier(img_size, path):
    """A classifier whose position table is no longer the sin-cos one (as if trained), saved."""
    vit = openmae.create_model("vit_micro_patch4", img_size=img_size, **VIT)
    with torch.no_grad():
        vit.pos_embed.add_(0.5 * torch.randn_like(vit.pos_embed))
    return vit, openmae.save_pretrained(vit, path)


def bicubic(table, src, dst):
    """The expected resampling, written out: cls row as is, the grid rows bicubically."""
    grid = table[0, 1:].reshape(*src, -1).permute(2, 0, 1)[None]  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    return torch.cat([table[0, :1], grid.reshape(-1, table.shape[-1])])[None]


@pytest.mark.parametrize("size, grid", [(48, (12, 12)), ((32, 48), (8, 12))])
def test_vit_from_an_mae_at_another_size(mae_file, size, grid):
    mae, path = mae_file
    vit = openmae.create_model("vit_micro_patch4", pretrained=path, img_size=size, **VIT)
    fresh = openmae.create_model("vit_micro_patch4", img_size=size, **VIT)
    torch.testing.assert_close(vit.pos_embed, fresh.pos_embed)  # the sin-cos table of the new grid
    torch.testing.assert_close(vit.pos_embed[0], sincos_2d(32, grid, cls_token=True))
    for key in ("patch_embed.proj.weight", "cls_token", "blocks.1.mlp.fc2.weight"):
        torch.testing.assert_close(vit.state_dict()[key], mae.state_dict()[key])
    notes = vit.load_report.notes
    assert f"pos_embed resampled from 8x8 to {grid[0]}x{grid[1]} (fixed sin-cos: recomputed for the new grid)" in notes
    assert any("decoder tensors ignored" in n for n in notes)  # the encoder loads; the decoder is set aside
    h, w = vit.img_size
    assert vit(torch.randn(2, 1, h, w)).shape == (2, 10)


def test_vit_from_an_mae_at_its_own_size_loads_the_encoder(mae_file):
    mae, path = mae_file
    vit = openmae.create_model("vit_micro_patch4", pretrained=path, img_size=32, **VIT)
    assert not any("resampled" in n for n in vit.load_report.notes)
    assert not [k for k in vit.load_report.missing if not k.startswith(("head.", "fc_norm."))]
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


def test_an_mae_rebuilt_at_another_size_fits_both_tables(mae_file):
    _, path = mae_file
    model = openmae.load_pretrained(path, img_size=(48, 32))
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, (12, 8), cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d(16, (12, 8), cls_token=True))
    assert any(n.startswith("decoder_pos_embed resampled from 8x8 to 12x8") for n in model.load_report.notes)


@pytest.mark.parametrize("size, grid", [(48, (12, 12)), ((32, 48), (8, 12))])
def test_a_learned_table_is_resampled_bicubically(tmp_path, size, grid):
    vit, path = learned_classifier(32, tmp_path / "vit.safetensors")
    big = openmae.create_model("vit_micro_patch4", pretrained=path, img_size=size, **VIT)
    torch.testing.assert_close(big.pos_embed, bicubic(vit.pos_embed, (8, 8), grid))
    assert torch.equal(big.pos_embed[:, 0], vit.pos_embed[:, 0])  # the cls row as it was
    assert not is_sincos(big.pos_embed[:, 1:], grid)
    assert f"pos_embed resampled from 8x8 to {grid[0]}x{grid[1]} (learned: bicubic, the cls row kept)" in (
        big.load_report.notes
    )


def test_a_non_square_learned_table_follows_the_recorded_size(tmp_path):
    # 8 x 12 and 12 x 8 hold as many rows: only the recorded img_size tells them apart
    vit, path = learned_classifier((32, 48), tmp_path / "wide.safetensors")
    tall = openmae.load_pretrained(path, img_size=(48, 32))
    torch.testing.assert_close(tall.pos_embed, bicubic(vit.pos_embed, (8, 12), (12, 8)))
    square = openmae.create_model("vit_micro_patch4", pretrained=path, img_size=64, **VIT)
    torch.testing.assert_close(square.pos_embed, bicubic(vit.pos_embed, (8, 12), (16, 16)))


def test_resampling_to_the_same_grid_is_the_identity(tmp_path):
    vit, path = learned_classifier(32, tmp_path / "vit.safetensors")
    same = openmae.create_model("vit_micro_patch4", pretrained=path, img_size=32, **VIT)
    assert torch.equal(same.pos_embed, vit.pos_embed)
    assert not any("resampled" in n for n in same.load_report.notes)
    table = torch.randn(1, 1 + 24, 8)
    assert torch.equal(resample_pos_embed(table, (4, 6), (4, 6), prefix=1), table)


def test_sincos_is_recognised_without_cls_row_and_in_half_precision():
    table = sincos_2d(32, (3, 5)).unsqueeze(0)  # ConvViT's layout: no cls row
    assert is_sincos(table, (3, 5)) and is_sincos(table.half(), (3, 5)) and is_sincos(table.bfloat16(), (3, 5))
    assert not is_sincos(table, (5, 3))  # the same rows on another grid
    assert not is_sincos(table + 0.01, (3, 5))


@pytest.mark.parametrize("fmt", ["openmae", "official"])
def test_convvit_from_a_convmae_at_another_size(tmp_path, fmt):
    convmae = openmae.create_model("convmae_tiny_patch16", img_size=32, **CONVVIT, **DECODER)
    path = tmp_path / ("convmae.safetensors" if fmt == "openmae" else "convmae.pth")
    openmae.export_pretrained(convmae, path, format=fmt)
    for size, grid in [(64, (4, 4)), ((32, 64), (2, 4))]:
        convvit = openmae.create_model("convvit_tiny_patch16", pretrained=path, img_size=size, **CONVVIT)
        fresh = openmae.create_model("convvit_tiny_patch16", img_size=size, **CONVVIT)
        torch.testing.assert_close(convvit.pos_embed, fresh.pos_embed)
        torch.testing.assert_close(convvit.blocks3[1].attn.qkv.weight, convmae.blocks3[1].attn.qkv.weight)
        note = f"pos_embed resampled from 2x2 to {grid[0]}x{grid[1]}"
        assert any(n.startswith(note) for n in convvit.load_report.notes)


def test_what_cannot_be_fitted_stays_an_error(tmp_path):
    # a non-square table in a file that records no image size: its grid is unknown
    mae = openmae.create_model("mae_vit_micro_patch4", img_size=(16, 24), **VIT, **DECODER)
    torch.save({"model": mae.state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 25, 32\) vs model \(1, 65, 32\) \(its 24 grid"):
        openmae.create_model("vit_micro_patch4", pretrained=tmp_path / "bare.pth", img_size=32, **VIT)
    # another channel count is another model, whatever the grid (which alone would be fitted)
    _, path = learned_classifier(32, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="shape mismatch") as err:
        openmae.create_model("vit_micro_patch4", pretrained=path, img_size=48, in_chans=3, **VIT)
    assert "patch_embed.proj.weight: checkpoint (32, 1, 4, 4) vs model (32, 3, 4, 4)" in str(err.value)
    assert "pos_embed" not in str(err.value)


def test_finetune_cli_at_another_resolution(tmp_path, capsys):
    mae = openmae.create_model("mae_vit_micro_patch4", img_size=16, **VIT, **DECODER)
    path = openmae.save_pretrained(mae, tmp_path / "mae16.safetensors")
    common = ["--data.name", "digits", "--data.limit", "64", "--data.num_workers", "0", "--train.precision", "fp32"]
    common += ["--train.progress", "false"]
    out = tmp_path / "ft32"
    argv = ["finetune", "--checkpoint", path, "--data.img_size", "32", "--train.epochs", "1"]
    argv += ["--train.batch_size", "32"]
    assert main([str(a) for a in [*argv, *common, "--output", out]]) == 0
    assert "pos_embed resampled from 4x4 to 8x8" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    trained = openmae.load_pretrained(out)
    assert trained.config["img_size"] == 32 and trained.grid_size == (8, 8)
    # the fine-tuned classifier evaluated at yet another size
    argv = ["finetune", "--eval.only", "--checkpoint", out, "--data.img_size", "48", *common]
    argv += ["--output", tmp_path / "ev"]
    assert main([str(a) for a in argv]) == 0
    assert "pos_embed resampled from 8x8 to 12x12" in capsys.readouterr().err
    assert (tmp_path / "ev" / "metrics.json").exists()
