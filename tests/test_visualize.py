"""Reconstruction figures and training curves: panels, un-normalisation, layout, determinism,
encoder-only refusal, every registered model, the CLI end to end."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import openmae
from openmae.data import DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from openmae.io import model_record, read_safetensors
from openmae.models.mae import MaskedAutoencoder
from openmae.models.vit import ViTEncoder
from openmae.reconstruction import (
    MASK_FILL,
    DecoderMissingError,
    Reconstruction,
    checkpoint_normalization,
    denormalize,
    load_reconstruction_model,
    normalize,
    patch_normalize,
    read_image,
    reconstruct,
    require_decoder,
    unnormalize_patches,
)
from openmae.visualize import figure_size, log_reconstructions, plot_loss_curve, read_metrics, save_figure
from tests.conftest import tiny_overrides

SMALL_DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_patch4(**kw) -> MaskedAutoencoder:
    """mae_vit_tiny_patch4 (28 px, 1 channel, 7x7 grid) with a shrunk encoder."""
    return openmae.create_model(
        "mae_vit_tiny_patch4", embed_dim=32, depth=1, num_heads=2, **SMALL_DECODER, **{"norm_pix_loss": True, **kw}
    )


def tiny_patch16_rgb(**kw) -> MaskedAutoencoder:
    """mae_vit_tiny_patch16 shrunk to 3 channels at 32 px (a 2x2 grid)."""
    return openmae.create_model(
        "mae_vit_tiny_patch16",
        img_size=32,
        in_chans=3,
        embed_dim=32,
        depth=1,
        num_heads=2,
        **SMALL_DECODER,
        **{"norm_pix_loss": True, **kw},
    )


class OracleMAE(MaskedAutoencoder):
    """Predicts exactly the training target: what a perfect model would output."""

    def forward(self, images, mask_ratio=0.75, noise=None, mask=None):
        out = super().forward(images, mask_ratio, noise, mask)
        out.pred = self.target(images)
        return out


def oracle(norm_pix_loss: bool) -> OracleMAE:
    return OracleMAE(
        img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, norm_pix_loss=norm_pix_loss,
        **SMALL_DECODER,
    )  # fmt: skip


def fmnist_batch(n: int = 2, seed: int = 0) -> torch.Tensor:
    """(n, 1, 28, 28) pixels in [0, 1] normalised as the pipeline does for Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, 28, 28, generator=g)
    return normalize(pixels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def removed_pixels(model, mask: torch.Tensor) -> torch.Tensor:
    """(N, L) mask -> (N, C, H, W) bool, True on removed pixels."""
    p = model.patch_size**2 * model.in_chans
    return model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p).contiguous()) > 0.5


# -- un-normalisation ------------------------------------------------------------------------


def test_normalize_denormalize_round_trip():
    x = torch.rand(2, 3, 8, 8)
    z = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.456) / 0.224)
    assert torch.allclose(denormalize(z, IMAGENET_MEAN, IMAGENET_STD), x, atol=1e-6)
    assert torch.equal(denormalize(x, None, None), x)
    with pytest.raises(ValueError, match="2 values for 3-channel"):
        normalize(x, [0.5, 0.5], [0.2, 0.2])


def test_patch_normalize_is_the_training_target():
    m = tiny_patch4()
    x = fmnist_batch()
    normed, _, _ = patch_normalize(m.patchify(x))
    assert torch.allclose(normed, m.target(x), atol=1e-6)


def test_unnormalize_inverts_normalisation_on_visible_patches():
    m = tiny_patch4()
    x = fmnist_batch(3)
    patches = m.patchify(x)  # (3, 49, 16)
    normed, mean, var = patch_normalize(patches)
    mask = torch.rand(3, 49, generator=torch.Generator().manual_seed(1)) < 0.75  # True = removed
    out = unnormalize_patches(normed, patches, mask, "visible")
    visible = ~mask
    assert torch.allclose(out[visible], patches[visible], atol=1e-5)
    # removed patches get the image's average visible-patch mean and variance (their own are unknown)
    for n in range(3):
        mu = mean[n][visible[n]].mean()
        sd = (var[n][visible[n]].mean() + 1e-6) ** 0.5
        assert torch.allclose(out[n][mask[n]], normed[n][mask[n]] * sd + mu, atol=1e-5)
        assert not torch.allclose(out[n][mask[n]], patches[n][mask[n]], atol=1e-3)
    # dataset / none leave the prediction as mean 0, std 1 patches in normalised space
    assert torch.equal(unnormalize_patches(normed, patches, mask, "dataset"), normed)
    with pytest.raises(ValueError, match="unnormalize must be one of"):
        unnormalize_patches(normed, patches, mask, "magic")


def test_panels_of_a_perfect_model_in_every_mode():
    x = fmnist_batch(2)
    pixels = denormalize(x, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    kw = dict(mask_ratios=(0.75,), seed=0, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    m = oracle(norm_pix_loss=True)
    rec = reconstruct(m, x, unnormalize="visible", **kw)
    assert rec.mode == "visible" and "visible patches" in rec.description
    removed = removed_pixels(m, rec.mask[:, 0])
    p = rec.as_dict()
    assert torch.allclose(p["original"][:, 0], pixels, atol=1e-5)
    assert torch.allclose(p["masked"][:, 0][~removed], pixels[~removed], atol=1e-5)
    assert bool((p["masked"][:, 0][removed] == MASK_FILL).all())
    assert torch.allclose(p["reconstruction"][:, 0][~removed], pixels[~removed], atol=1e-5)
    pasted = p["reconstruction + visible"][:, 0]
    assert torch.allclose(pasted[~removed], pixels[~removed], atol=1e-5)
    assert torch.allclose(pasted[removed], p["reconstruction"][:, 0][removed])

    rec = reconstruct(m, x, unnormalize="dataset", **kw)
    normed = m.unpatchify(patch_normalize(m.patchify(x))[0])
    expected = denormalize(normed, FASHION_MNIST_MEAN, FASHION_MNIST_STD).clamp(0, 1)
    assert rec.mode == "dataset" and "dataset statistics" in rec.description
    assert torch.allclose(rec.panel("reconstruction")[:, 0], expected, atol=1e-5)

    rec = reconstruct(m, x, unnormalize="none", **kw)
    assert rec.mode == "none" and "normalised view" in rec.description
    view = (0.5 + normed / 4).clamp(0, 1)
    assert torch.allclose(rec.panel("original")[:, 0], view, atol=1e-5)
    assert torch.allclose(rec.panel("reconstruction")[:, 0], view, atol=1e-5)

    m = oracle(norm_pix_loss=False)  # a pixel-target model: nothing to un-normalise
    rec = reconstruct(m, x, unnormalize="visible", **kw)
    assert rec.mode == "pixels"
    assert torch.allclose(rec.panel("reconstruction")[:, 0], pixels, atol=1e-5)


# -- masks and determinism -------------------------------------------------------------------


def test_same_seed_same_panels_and_png(tmp_path):
    m = tiny_patch4()
    x = fmnist_batch(2)
    m.train()
    state = torch.get_rng_state()
    a = reconstruct(m, x, (0.75, 0.85, 0.95), seed=3, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    assert torch.equal(torch.get_rng_state(), state), "reconstruct must not touch the global RNG"
    assert m.training, "the model's mode is restored"
    torch.manual_seed(123)  # other global RNG state: no effect
    b = reconstruct(m, x, (0.75, 0.85, 0.95), seed=3, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    c = reconstruct(m, x, (0.75, 0.85, 0.95), seed=4, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    assert torch.equal(a.panels, b.panels) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask) and not torch.equal(a.panels, c.panels)
    fa, fb, fc = (save_figure(r, tmp_path / f"{k}.png") for k, r in (("a", a), ("b", b), ("c", c)))
    assert fa.read_bytes() == fb.read_bytes()
    assert fa.read_bytes() != fc.read_bytes()


def test_random_masks_are_nested_across_ratios_and_counts_match():
    m = tiny_patch4()
    rec = reconstruct(m, fmnist_batch(2), (0.5, 0.75, 0.95), seed=0)
    mask = rec.mask  # (N, R, L)
    assert mask.shape == (2, 3, 49) and mask.dtype == torch.bool
    assert mask.sum(-1).tolist() == [[49 - 24, 49 - 12, 49 - 2]] * 2
    assert bool((mask[:, 1] >= mask[:, 0]).all() and (mask[:, 2] >= mask[:, 1]).all())  # visible at 95% visible at 75%


def test_block_and_grid_masks():
    m = tiny_patch4()
    x = fmnist_batch(2)
    rec = reconstruct(m, x, (0.5, 0.75), mask_type="block", seed=1)
    assert rec.mask.shape == (2, 2, 49) and rec.mask.sum(-1).tolist() == [[25, 37]] * 2
    assert rec.row_label(1) == "block mask 75%"
    with pytest.warns(UserWarning, match="grid masks always remove 3 of every 4"):
        rec = reconstruct(m, x, (0.5, 0.75), mask_type="grid", seed=1)
    assert rec.panels.shape[1] == 1 and rec.mask.shape == (2, 1, 49)
    assert rec.mask_ratios == pytest.approx((37 / 49,)) and rec.row_label(0) == "grid mask (76%)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct(m, x, 0.75, mask_type="grid")  # one ratio: nothing to warn about


def test_bad_arguments_are_refused():
    m = tiny_patch16_rgb()  # 4 patches: 0.9 keeps none
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="keeps none of the model's 4 patches"):
        reconstruct(m, x, (0.75, 0.9))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        reconstruct(m, x, 1.0)
    with pytest.raises(ValueError, match="mask_type must be one of"):
        reconstruct(m, x, mask_type="checkerboard")
    with pytest.raises(ValueError, match="unnormalize must be one of"):
        reconstruct(m, x, unnormalize="stretch")
    with pytest.raises(ValueError, match="has no pixel head"):
        reconstruct(m, x, unnormalize="head")


def test_pixel_head_is_a_readout_that_changes_nothing_else():
    torch.manual_seed(0)
    plain = openmae.create_model("mae_vit_micro_patch4", norm_pix_loss=True, pixel_head=False)
    torch.manual_seed(0)
    headed = openmae.create_model("mae_vit_micro_patch4", norm_pix_loss=True, pixel_head=True)
    headed.load_state_dict(plain.state_dict(), strict=False)
    x, noise = torch.randn(2, 1, 28, 28), torch.rand(2, 49)
    a, b = plain(x, noise=noise), headed(x, noise=noise)
    assert torch.equal(a.pred, b.pred)
    assert b.loss.item() == pytest.approx((a.loss + b.pixel_loss).item())
    b.loss.backward()
    a.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), headed.parameters()):  # same order: the head comes last
        if p.requires_grad:  # the pixel loss reaches only its own head
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert headed.decoder_pred_pixel.weight.grad.abs().sum() > 0
    rec = reconstruct(headed, x)  # auto: shown through the head
    assert rec.mode == "head" and "pixel head" in rec.description
    assert reconstruct(headed, x, unnormalize="visible").mode == "visible"


# -- figures ---------------------------------------------------------------------------------


def test_figure_for_two_images_and_three_ratios_has_the_expected_size(tmp_path):
    m = tiny_patch4()
    rec = reconstruct(m, fmnist_batch(2), (0.75, 0.85, 0.95), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    assert rec.panels.shape == (2, 3, 4, 1, 28, 28)
    assert float(rec.panels.min()) >= 0.0 and float(rec.panels.max()) <= 1.0
    assert rec.numpy().shape == (2, 3, 4, 28, 28, 1)
    path = save_figure(rec, tmp_path / "sub" / "fig.png", titles=["shirt", "boot"])
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == figure_size(6) == (840, 1280)  # 0.4 in labels + 4 x 2 in; 0.8 in header + 6 x 2 in
    with pytest.raises(ValueError, match="1 titles for 2 images"):
        save_figure(rec, tmp_path / "bad.png", titles=["one"])


@pytest.mark.parametrize("channels", [1, 3])
def test_figure_layout_places_each_panel_in_its_cell(tmp_path, channels):
    # known constant panels: column c of row r has a distinct grey level / colour
    n, r = 2, 2
    levels = torch.tensor([0.0, 0.25, 0.6, 1.0])
    panels = torch.zeros(n, r, 4, channels, 8, 8)
    for c in range(4):
        panels[:, :, c] = levels[c]
    if channels == 3:
        panels[1, :, :, 0] = 1.0  # second image: red channel saturated
    rec = Reconstruction(
        panels=panels, mask=torch.zeros(n, r, 4, dtype=torch.bool), mask_ratios=(0.5, 0.75),
        mask_type="random", mode="pixels", description="test", seed=0,
    )  # fmt: skip
    path = save_figure(rec, tmp_path / "layout.png")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert rgb.shape[:2][::-1] == figure_size(n * r)
    for row in range(n * r):
        for c in range(4):
            x = int((0.4 + (c + 0.5) * 2.0) * 100)
            y = int((0.8 + (row + 0.5) * 2.0) * 100)
            grey = round(float(levels[c]) * 255)
            want = [grey] * 3
            if channels == 3 and row >= r:
                want[0] = 255
            assert np.abs(rgb[y, x] - np.array(want)).max() <= 1, (row, c, rgb[y, x], want)


def test_log_reconstructions_writes_png_and_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    class Writer:
        def __init__(self):
            self.calls = []

        def add_image(self, tag, img, global_step=None, dataformats="CHW"):
            self.calls.append((tag, img, global_step, dataformats))

    m = tiny_patch4(mask_type="block")
    x = fmnist_batch(3)
    writer = Writer()
    path = log_reconstructions(m, x, writer, tmp_path, 3, FASHION_MNIST_MEAN, FASHION_MNIST_STD, mask_ratios=0.75)
    assert path == tmp_path / "reconstructions" / "epoch_0003.png"
    width, height = figure_size(3)
    with Image.open(path) as img:
        assert img.size == (width, height)
    ((tag, img, step, fmt),) = writer.calls
    assert (tag, step, fmt) == ("reconstructions", 3, "HWC")
    assert img.shape == (height, width, 3) and img.dtype == np.uint8
    # the same batch and seed at a later epoch: same masks (the model's own block sampler)
    again = log_reconstructions(m, x, None, tmp_path, 12, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert again.name == "epoch_0012.png"

    tb = SummaryWriter(log_dir=str(tmp_path / "tb"))
    log_reconstructions(m, x[:1], tb, tmp_path, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_loss_curve_from_metrics_jsonl(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = [
        {"step": 10, "epoch": 0.5, "loss": 1.0, "lr": 1e-5, "images_per_s": 900.0},
        {"step": 20, "epoch": 1.0, "loss": 0.9, "lr": 2e-5},
        {"epoch_end": 1, "step": 20, "loss": 0.95},
        {"step": 30, "epoch": 1.5, "loss": 0.8},  # no lr
        {"step": 40, "epoch": 2.0, "loss": 0.7, "lr": 3e-5},
        {"step": 30, "epoch": 1.5, "loss": 0.75, "lr": 2.5e-5},  # resumed from step 20: replays 30, 40
        {"step": 40, "epoch": 2.0, "loss": None, "lr": 3e-5},  # missing value
        {"epoch_end": 2, "loss": 0.72},  # no step: placed at the last step
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 50, "lo'  # a line cut short by a crash
    metrics.write_text(text)
    steps, epochs = read_metrics(metrics)
    assert [s["step"] for s in steps] == [10, 20, 30, 40]
    assert [s["loss"] for s in steps] == [1.0, 0.9, 0.75, None]
    assert [(e["epoch_end"], e["_step"]) for e in epochs] == [(1, 20), (2, 40)]
    png = plot_loss_curve(metrics, tmp_path / "loss.png")
    with Image.open(png) as img:
        assert img.size == (800, 450)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with Image.open(plot_loss_curve(empty, tmp_path / "empty.png")) as img:
        assert img.size == (800, 450)
    only_epochs = tmp_path / "epochs.jsonl"
    only_epochs.write_text("\n".join(json.dumps({"epoch_end": e, "loss": math.exp(-e)}) for e in range(1, 4)))
    assert plot_loss_curve(only_epochs, tmp_path / "epochs.png").exists()


# -- decoder required ------------------------------------------------------------------------


def encoder_only_file(tmp_path, drop=lambda k: k.startswith("decoder") or k == "mask_token"):
    """Save a tiny MAE the normal way, then rewrite it without (some of) its decoder weights."""
    m = tiny_patch4()
    full = tmp_path / "full.safetensors"
    openmae.save_pretrained(m, full)
    tensors, meta = read_safetensors(full)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v for k, v in tensors.items() if not drop(k)}, str(path), metadata=meta)
    return full, path


def test_encoder_only_is_refused_clearly(tmp_path):
    full, enc = encoder_only_file(tmp_path)
    assert hasattr(load_reconstruction_model(full), "decoder_pred")
    with pytest.raises(
        DecoderMissingError, match="reconstruction needs the decoder; this checkpoint holds the encoder"
    ):
        load_reconstruction_model(enc)
    # only the head missing: the loader's own mismatch error becomes the same clear message
    _, partial = encoder_only_file(tmp_path, drop=lambda k: k.startswith("decoder_pred"))
    with pytest.raises(DecoderMissingError, match="decoder_pred"):
        load_reconstruction_model(partial)
    # an official-format encoder-only .pth (released mae_pretrain_vit_*.pth), read by openmae.interop
    from openmae.interop import export_pretrained

    export_pretrained(tiny_patch4(), tmp_path / "full.pth", "official")
    state = torch.load(tmp_path / "full.pth", weights_only=True)["model"]
    encoder_state = {k: v for k, v in state.items() if not (k.startswith("decoder") or k == "mask_token")}
    torch.save({"model": encoder_state}, tmp_path / "mae_pretrain.pth")
    with pytest.raises(DecoderMissingError, match="holds the encoder only .*mae_pretrain.pth"):
        load_reconstruction_model(tmp_path / "mae_pretrain.pth")
    # a model object without a decoder, and one whose loader reports missing decoder weights
    encoder = ViTEncoder((28, 28), 4, 1, 32, 1, 2)
    with pytest.raises(DecoderMissingError, match="ViTEncoder has no decoder_pred"):
        reconstruct(encoder, torch.zeros(1, 1, 28, 28))
    m = tiny_patch4()
    m.load_report = {"missing": ["decoder_pred.weight", "decoder_pred.bias"], "unexpected": []}
    with pytest.raises(DecoderMissingError, match="decoder weights not in the file"):
        require_decoder(m)


def _shrunk(name: str) -> dict:
    if name.startswith(("swin_", "simmim_swin_")):  # two stages at 32 px: 8 x 8 and 4 x 4 grids
        return dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    if name.startswith(("convmae", "convvit")):
        kw = dict(img_size=32, embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=2)
        return {**kw, **SMALL_DECODER} if name.startswith("convmae") else kw
    return tiny_overrides(name)


@pytest.mark.parametrize("name", openmae.list_models())
def test_every_registered_model_reconstructs_or_is_refused(name):
    m = openmae.create_model(name, **_shrunk(name))
    x = torch.randn(2, m.in_chans, *m.img_size)
    if not hasattr(m, "decoder_pred"):  # an encoder or classifier
        with pytest.raises(DecoderMissingError, match="reconstruction needs the decoder"):
            reconstruct(m, x)
        return
    rec = reconstruct(m, x, (0.5, 0.75), seed=0)
    assert rec.panels.shape == (2, 2, 4, m.in_chans, *m.img_size)
    assert torch.isfinite(rec.panels).all()
    keep = [int(m.num_patches * 0.5), int(m.num_patches * 0.25)]
    assert (m.num_patches - rec.mask.sum(-1)).tolist() == [keep, keep]


# -- checkpoints, images, CLI ----------------------------------------------------------------


def test_normalisation_from_checkpoint_metadata(tmp_path):
    m = tiny_patch16_rgb()
    plain = openmae.save_pretrained(m, tmp_path / "plain.safetensors")
    assert checkpoint_normalization(plain) is None

    def with_training_meta(name: str, data: dict):
        meta = {"openmae": json.dumps(model_record(m.arch, m.config)), "training": json.dumps({"step": 5, "config": {"data": data}})}
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path), metadata=meta)
        return path

    given = with_training_meta("a.safetensors", {"name": "folder", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    assert checkpoint_normalization(given) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    default = with_training_meta("b.safetensors", {"name": "digits", "mean": None, "std": None})
    assert checkpoint_normalization(default) == (list(DIGITS_MEAN), list(DIGITS_STD))
    assert checkpoint_normalization(tmp_path / "missing.safetensors") is None


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # H 20, W 40
    array[:, 10:30] = 255  # the middle half is white
    Image.fromarray(array).save(tmp_path / "wide.png")
    rgb = read_image(tmp_path / "wide.png", 3, 32)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == torch.float32
    assert float(rgb[:, :, 2:30].min()) > 0.95  # the crop keeps the middle, scaled 1.6x
    gray = read_image(tmp_path / "wide.png", 1, (28, 14))
    assert gray.shape == (1, 28, 14)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        read_image(tmp_path / "wide.png", 2, 32)


def test_cli_end_to_end_on_a_photo(tmp_path, capsys):
    import skimage.data

    from openmae.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.png")
    Image.fromarray(skimage.data.camera()).save(photos / "camera.jpg")  # grayscale into an RGB model
    (photos / "notes.txt").write_text("not an image")
    ckpt = tmp_path / "tiny-mae"
    openmae.save_pretrained(tiny_patch16_rgb(patch_size=8), ckpt)  # a directory: model.safetensors + config.json

    out = tmp_path / "fig.png"
    args = [
        "reconstruct", str(photos), "--checkpoint", str(ckpt), "--out", str(out),
        "--mask-ratio", "0.5", "0.75", "0.9", "--seed", "7",
        "--device", "cpu",  # the device this was written for: auto would take a GPU where there is one
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 images x 3 mask ratios" in printed and "mode visible" in printed
    with Image.open(out) as img:
        assert img.size == figure_size(6)
    first = out.read_bytes()
    assert main(args) == 0  # same seed, same figure (the output in the input folder is skipped)
    assert out.read_bytes() == first

    one = tmp_path / "one.png"
    assert main(["reconstruct", str(photos / "astronaut.png"), "--checkpoint", str(ckpt), "--out", str(one),
                 "--mask", "grid", "--unnormalize", "none", "--mean", "0.5", "--std", "0.25"]) == 0  # fmt: skip
    assert "normalisation from --mean/--std" in capsys.readouterr().out
    with Image.open(one) as img:
        assert img.size == figure_size(1)

    pixels = tmp_path / "pixels.png"  # override what the file says: a pixel-target view
    assert main(["reconstruct", str(photos), "--checkpoint", str(ckpt), "--out", str(pixels), "--max-images", "1",
                 "--norm-pix-loss", "false"]) == 0  # fmt: skip
    assert "1 image x 1 mask ratio; mode pixels" in capsys.readouterr().out

    _, enc = encoder_only_file(tmp_path)
    assert main(["reconstruct", str(photos), "--checkpoint", str(enc), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "reconstruction needs the decoder; this checkpoint holds the encoder only" in err
    assert not (tmp_path / "x.png").exists()


def test_a_file_without_a_pixel_head_loads_without_one(tmp_path):
    # files written before the option existed record nothing about it: the loader follows the tensors
    plain = openmae.create_model("mae_vit_micro_patch4", pixel_head=False)
    openmae.save_pretrained(plain, tmp_path / "plain.safetensors")
    assert openmae.load_pretrained(tmp_path / "plain.safetensors").pixel_head is False
    headed = openmae.create_model("mae_vit_micro_patch4", pixel_head=True)
    openmae.save_pretrained(headed, tmp_path / "headed.safetensors")
    assert openmae.load_pretrained(tmp_path / "headed.safetensors").pixel_head is True
