"""Weights in and out: openmae, official MAE, Hugging Face ViTMAE and timm checkpoints.

Every file here is built in the test, from random weights, in each format's layout; nothing is
downloaded. Round trips run in every direction and must keep the numbers exactly.
"""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import openmae
from openmae.cli import main
from openmae.interop import UnsafeCheckpointError, detect_format, export_pretrained, inspect_checkpoint, load
from openmae.patches import sincos_2d

FORMATS = ["openmae", "official", "hf", "timm"]
# non-standard widths: nothing can be guessed, so a round trip keeps the config or fails
SMALL = dict(
    img_size=16,
    in_chans=3,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)
# standard widths (ViT-T encoder: 3 heads; 128-wide decoder: 4 heads): files without a config infer them
STANDARD = dict(
    img_size=16,
    in_chans=3,
    embed_dim=192,
    depth=1,
    num_heads=3,
    decoder_embed_dim=128,
    decoder_depth=1,
    decoder_num_heads=4,
)
ARCH = "mae_vit_tiny_patch4"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread is fastest, and unaffected by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values in every trainable tensor (LayerNorms and biases too), so a dropped or
    swapped tensor changes the outputs; the fixed sin-cos tables stay as they are."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and name not in ("pos_embed", "decoder_pos_embed"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def make_mae(norm_pix_loss: bool = False, **kw) -> torch.nn.Module:
    return randomise(openmae.create_model(ARCH, norm_pix_loss=norm_pix_loss, **{**SMALL, **kw})).eval()


def batch(grid: int = 4, chans: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, chans, grid * 4, grid * 4, generator=g), torch.rand(2, grid * grid, generator=g)


def destination(tmp_path, fmt: str, tag: str):
    return (
        tmp_path
        / {"openmae": f"{tag}.safetensors", "official": f"{tag}.pth", "hf": f"{tag}_hf", "timm": f"{tag}.safetensors"}[
            fmt
        ]
    )


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks.", "norm."))
    }


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def official_layout(model: torch.nn.Module, **extra) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, **extra}


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dst", FORMATS)
@pytest.mark.parametrize("src", FORMATS)
def test_round_trip(tmp_path, src, dst):
    """openmae -> src -> openmae -> dst -> openmae keeps every tensor, the config and the numbers."""
    model = make_mae(norm_pix_loss=True)
    export_pretrained(model, destination(tmp_path, src, "a"), format=src)
    first, report = load(destination(tmp_path, src, "a"))
    assert report.format == src
    if src == "timm" and dst == "openmae":  # the random decoder cannot be left out of an openmae file
        with pytest.warns(UserWarning, match="never loaded"):
            export_pretrained(first, destination(tmp_path, dst, "b"), format=dst)
    else:
        export_pretrained(first, destination(tmp_path, dst, "b"), format=dst)
    assert detect_format(destination(tmp_path, dst, "b")) == dst
    second, report = load(destination(tmp_path, dst, "b"))
    second.eval()

    for key in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "mlp_ratio", "norm_eps"):
        assert second.config[key] == model.config[key], key
    x, noise = batch()
    torch.testing.assert_close(second.encode(x), model.encode(x), rtol=0, atol=0)
    if "timm" in (src, dst):  # an encoder format: the decoder does not survive, and the report says so
        assert_same_state(encoder_state(second), encoder_state(model))
        if dst == "openmae":
            return
        assert any("no decoder" in n for n in report.notes)
        assert any(k.startswith("decoder_blocks.") for k in report.missing)
        return
    assert_same_state(second.state_dict(), model.state_dict())
    assert second.norm_pix_loss and report.missing == []
    with torch.no_grad():
        expected, got = model(x, noise=noise), second(x, noise=noise)
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.pred, expected.pred)


def test_openmae_own_files_still_load(tmp_path):
    from openmae.checkpoint import save_training_state
    from openmae.interop import save_pretrained

    model = make_mae()
    save_pretrained(model, tmp_path / "m.safetensors")
    save_pretrained(model, tmp_path / "dir")
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path / "run" / "checkpoint-00000010.safetensors", model, opt, {"step": 10})
    for path in (tmp_path / "m.safetensors", tmp_path / "dir", tmp_path / "run"):
        assert detect_format(path) == "openmae"
        assert_same_state(openmae.load_pretrained(path).state_dict(), model.state_dict())
    assert load(tmp_path / "run")[1].kind == "training checkpoint"


# -- official MAE files ------------------------------------------------------------------------


def test_official_training_checkpoint_with_namespace_args(tmp_path):
    model = make_mae(norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(batch()[0]).loss.backward()
    opt.step()
    args = argparse.Namespace(
        model=ARCH, input_size=16, norm_pix_loss=True, mask_ratio=0.6, blr=1e-3, epochs=400, output_dir="./out"
    )
    ckpt = official_layout(model, optimizer=opt.state_dict(), epoch=3, scaler={"scale": 65536.0}, args=args)
    torch.save(ckpt, tmp_path / "checkpoint-3.pth")
    with pytest.raises(pickle.UnpicklingError):  # the trap: plain weights_only refuses the Namespace
        torch.load(tmp_path / "checkpoint-3.pth", weights_only=True)

    loaded, report = load(tmp_path / "checkpoint-3.pth", num_heads=2, decoder_num_heads=2)
    assert report.format == "official" and "training checkpoint, epoch 3" in report.kind
    assert report.arch == ARCH and loaded.norm_pix_loss and report.norm_pix_loss
    assert report.mask_ratio == 0.6 and any("mask_ratio=0.6" in n for n in report.notes)
    assert_same_state(loaded.state_dict(), model.state_dict())
    x, noise = batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, 0.6, noise).loss, model(x, 0.6, noise).loss)


def test_official_encoder_only_file(tmp_path):
    """A released ``mae_pretrain_vit_*.pth``: the encoder under 'model', no config."""
    model = make_mae()
    torch.save({"model": encoder_state(model)}, tmp_path / "mae_pretrain.pth")
    loaded, report = load(tmp_path / "mae_pretrain.pth", num_heads=2)
    assert report.kind == "encoder only" and not report.has_decoder
    assert any("no decoder: reconstruction unavailable" in n for n in report.notes)
    assert "decoder_pred.weight" in report.missing and "mask_token" in report.missing
    x, _ = batch()
    torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    # a file without config, into a model the user names
    built = openmae.create_model(ARCH, pretrained=str(tmp_path / "mae_pretrain.pth"), **SMALL)
    torch.testing.assert_close(built.encode(x), model.encode(x), rtol=0, atol=0)
    assert built.load_report.format == "official" and "decoder_pred.weight" in built.load_report.missing


def test_official_full_file_infers_architecture_from_shapes(tmp_path):
    """A visualize / ``*_full.pth`` file: encoder and decoder, no args. Standard widths give the
    head counts; image size comes from pos_embed."""
    model = make_mae(**STANDARD)
    torch.save(official_layout(model), tmp_path / "mae_visualize.pth")
    info = inspect_checkpoint(tmp_path / "mae_visualize.pth")
    assert info["format"] == "official" and info["has_decoder"] and info["norm_pix_loss"] is None
    loaded, report = load(tmp_path / "mae_visualize.pth")
    for key, value in STANDARD.items():
        assert loaded.config[key] == value, key
    assert report.arch == ARCH and report.missing == []
    assert any("norm_pix_loss is not recorded" in n for n in report.notes)
    x, noise = batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, noise=noise).pred, model(x, noise=noise).pred)


def test_finetuned_classifier_file(tmp_path):
    """Fine-tuned with global pooling: no final norm, but fc_norm and a head."""
    model = make_mae()
    state = {k: v for k, v in encoder_state(model).items() if not k.startswith("norm.")}
    state.update({"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)})
    state.update({"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)})
    torch.save(
        {"model": state, "args": argparse.Namespace(model="vit_tiny_patch4", nb_classes=10)}, tmp_path / "ft.pth"
    )
    loaded, report = load(tmp_path / "ft.pth", num_heads=2)
    assert report.kind == "fine-tuned classifier" and report.arch == ARCH
    assert torch.equal(report.extras["head.weight"], state["head.weight"])
    assert set(report.extras) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert any("classifier head: 10 classes" in n for n in report.notes)
    assert "norm.weight" in report.missing
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert inspect_checkpoint(tmp_path / "ft.pth")["num_classes"] == 10


def test_official_export_opens_with_plain_weights_only_load(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "o.pth", format="official")
    obj = torch.load(tmp_path / "o.pth", weights_only=True)  # what the official code (torch >= 2.6) does
    assert_same_state(obj["model"], model.state_dict())
    assert obj["openmae"]["arch"] == ARCH


# -- timm --------------------------------------------------------------------------------------


def timm_vit(**kw) -> torch.nn.Module:
    args = dict(img_size=16, patch_size=4, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    return randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw})).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_load_as_encoder(tmp_path, suffix):
    ref = timm_vit()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"timm{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded, report = load(path)
    assert report.format == "timm" and report.kind == "encoder only" and loaded.config["num_heads"] == 3
    assert any("not the fixed sin-cos table" in n for n in report.notes)  # timm's learned positions
    x, _ = batch()
    torch.testing.assert_close(loaded.encode(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_classifier_head_is_reported(tmp_path):
    ref = timm_vit(num_classes=5)
    torch.save(ref.state_dict(), tmp_path / "cls.pth")
    report = load(tmp_path / "cls.pth")[1]
    assert report.extras["head.weight"].shape == (5, 192)
    assert any("classifier head: 5 classes" in n for n in report.notes)


def test_timm_export_loads_in_timm_unchanged(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "enc.safetensors", format="timm")
    export_pretrained(model, tmp_path / "enc_dir", format="timm")
    shape = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    by_file = timm.create_model(
        "vit_base_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.safetensors")),
        **shape,
    ).eval()
    by_dict = timm.create_model("vit_base_patch16_224", pretrained=False, **shape).eval()
    by_dict.load_state_dict(load_file(tmp_path / "enc.safetensors"))  # strict: every key matches
    by_dir = timm.create_model(f"local-dir:{tmp_path / 'enc_dir'}", pretrained=True).eval()
    x, _ = batch()
    expected = model.encode(x)
    for net in (by_file, by_dict, by_dir):
        torch.testing.assert_close(net.forward_features(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_features_are_refused(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=0, init_values=1e-5)
    torch.save(ref.state_dict(), tmp_path / "layerscale.pth")
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        openmae.load_pretrained(tmp_path / "layerscale.pth")


# -- refusals ----------------------------------------------------------------------------------


def test_shape_mismatch_names_the_parameter(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "o.pth", format="official")
    with pytest.raises(
        ValueError, match=r"patch_embed\.proj\.weight: checkpoint \(32, 3, 4, 4\) vs model \(64, 3, 4, 4\)"
    ):
        openmae.create_model(ARCH, pretrained=str(tmp_path / "o.pth"), **{**SMALL, "embed_dim": 64})
    with pytest.raises(ValueError, match=r"decoder_embed\.weight"):
        openmae.load_pretrained(tmp_path / "o.pth", decoder_embed_dim=32)


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, writer, capsys):
    marker = tmp_path / "pwned"
    payload = {"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": Evil(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        openmae.load_pretrained(path)
    with pytest.raises(UnsafeCheckpointError):
        openmae.create_model(ARCH, pretrained=str(path), **SMALL)
    assert main(["inspect", str(path)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


# -- details -----------------------------------------------------------------------------------


def test_position_tables_are_recomputed_for_another_image_size(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "o.pth", format="official")
    loaded, report = load(tmp_path / "o.pth", img_size=32)
    assert loaded.config["img_size"] == 32
    torch.testing.assert_close(loaded.pos_embed[0], sincos_2d(32, (8, 8), cls_token=True))
    assert any("recomputed" in n for n in report.notes) and report.missing == []
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)


def test_hf_directory_with_pytorch_model_bin(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "hf", format="hf", key_style="v5")
    folder = tmp_path / "hf"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_same_state(openmae.load_pretrained(folder).state_dict(), model.state_dict())


def test_hf_unknown_tensor_is_refused(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "hf", format="hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["vit.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="vit.pooler.dense.weight"):
        openmae.load_pretrained(tmp_path / "hf")


def test_inspect_counts_parameters(tmp_path):
    model = make_mae()
    export_pretrained(model, tmp_path / "m.safetensors")
    info = inspect_checkpoint(tmp_path / "m.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(("decoder", "mask_token"))
    )
    assert info["parameters"] == trainable and info["decoder_parameters"] == decoder
    assert info["arch"] == ARCH and info["norm_pix_loss"] is False


def test_cli_convert_and_inspect(tmp_path, capsys):
    model = make_mae(norm_pix_loss=True)
    export_pretrained(model, tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "enc.safetensors"), "--to", "timm"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "hf (encoder + decoder)" in out and "norm_pix_loss: yes" in out and "decoder:       yes" in out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"parameters:    {trainable:,}" in out
    assert main(["inspect", str(tmp_path / "enc.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "timm (encoder only)" in out and "decoder:       no" in out and "norm_pix_loss: unknown" in out
    # a file without config, into a named model with overrides
    torch.save({"model": encoder_state(model)}, tmp_path / "enc.pth")
    argv = [
        "convert",
        str(tmp_path / "enc.pth"),
        str(tmp_path / "back.safetensors"),
        "--to",
        "openmae",
        "--model",
        ARCH,
    ]
    argv += [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main(argv) == 0
    back = openmae.load_pretrained(tmp_path / "back.safetensors")
    x, _ = batch()
    torch.testing.assert_close(back.encode(x), model.encode(x), rtol=0, atol=0)


def test_convmae_files(tmp_path):
    """ConvMAE shares the official layout: its files convert to official and back, load into a
    named model, and are refused (with the reason) where they have no counterpart."""
    model = randomise(openmae.create_model("convmae_tiny_patch16")).eval()
    export_pretrained(model, tmp_path / "c.safetensors")
    assert inspect_checkpoint(tmp_path / "c.safetensors")["arch"] == "convmae_tiny_patch16"
    export_pretrained(load(tmp_path / "c.safetensors")[0], tmp_path / "c.pth", format="official")
    assert_same_state(openmae.load_pretrained(tmp_path / "c.pth").state_dict(), model.state_dict())
    for fmt in ("hf", "timm"):
        with pytest.raises(ValueError, match="no .* counterpart"):
            export_pretrained(model, tmp_path / f"c_{fmt}", format=fmt)
    torch.save({"model": model.state_dict()}, tmp_path / "official_convmae.pth")  # no config
    with pytest.raises(ValueError, match="ConvMAE checkpoint"):
        openmae.load_pretrained(tmp_path / "official_convmae.pth")
    built = openmae.create_model("convmae_tiny_patch16", pretrained=str(tmp_path / "official_convmae.pth"))
    assert_same_state(built.state_dict(), model.state_dict())
    assert built.load_report.missing == []
