"""Swin Transformer (SwinClassifier) and its SimMIM pretraining (SimMIMSwin): the paper's variants,
exact round trips with timm's SwinTransformer, the readout interface the protocols use, SimMIM's
masking contract (no leak from masked pixels, noise / explicit masks, the loss on masked pixels only)
and the reconstruction figures built on MAE's interface."""

import json

import pytest
import timm
import torch

import openmae
from openmae.inference import pooled_features
from openmae.models import SimMIMSwin, SwinClassifier, arch_of, create_model, list_models, model_factory
from openmae.models.classifier import classifier_name
from openmae.reconstruction import PANELS, reconstruct
from openmae.tasks import freeze_for_tuning

# Shrunk: two stages at 32 px (8 x 8 and 4 x 4 grids), 4 x 4 windows so the first stage's second
# block is shifted; the mask cell is 8 px, the mask grid 4 x 4.
SHRINK = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
SWIN_MODELS = [n for n in list_models("swin_") if n.startswith("swin_")]
SIMMIM_MODELS = list_models("simmim_swin_")
PAPER = {  # Liu et al., 2021: C, depths, heads
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
}


def tiny_swin(**kw) -> SwinClassifier:
    return create_model("swin_tiny_patch4_window7", **{**SHRINK, "num_classes": 5, **kw})


def tiny_simmim(**kw) -> SimMIMSwin:
    return create_model("simmim_swin_tiny_patch4_window7", **{**SHRINK, **kw})


def half_mask(model: SimMIMSwin, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(N, L) bool, True = removed: half the mask cells, a different half per row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, model.num_patches, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(model.num_patches, generator=g)[: model.num_patches // 2]] = True
    return mask


def pixels_of(model: SimMIMSwin, mask: torch.Tensor) -> torch.Tensor:
    """(N, L) cell mask -> (N, 1, H, W) bool, True inside those cells."""
    cell = model.patch_size
    return mask.reshape(-1, 1, *model.grid_size).repeat_interleave(cell, 2).repeat_interleave(cell, 3)


# -- the registered variants ------------------------------------------------------------------------


def test_registered_names_and_paper_sizes():
    sizes = ("tiny", "small", "base", "micro")
    assert SWIN_MODELS == sorted(f"swin_{s}_patch4_window7" for s in sizes)
    assert SIMMIM_MODELS == sorted(f"simmim_swin_{s}_patch4_window7" for s in sizes)
    for size, (dim, depths, heads) in PAPER.items():
        for name in (f"swin_{size}_patch4_window7", f"simmim_swin_{size}_patch4_window7"):
            with torch.device("meta"):  # full size, without allocating the weights
                model = create_model(name)
            cfg = model.config
            assert (cfg["embed_dim"], cfg["depths"], cfg["num_heads"]) == (dim, depths, heads), name
            assert (cfg["img_size"], cfg["patch_size"], cfg["window_size"], cfg["in_chans"]) == (224, 4, 7, 3)
            assert model.embed_dim == dim * 8  # the last stage's width
        assert model.patch_size == 32 and model.grid_size == (7, 7) and model.num_patches == 49  # the mask grid
        assert model_factory(f"swin_{size}_patch4_window7").defaults.get("num_classes", 1000) == 1000


def test_full_size_classifiers_have_timms_parameters():
    for size in PAPER:
        with torch.device("meta"):
            ours = create_model(f"swin_{size}_patch4_window7")
            theirs = timm.create_model(f"swin_{size}_patch4_window7_224", pretrained=False)
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}, size
    with torch.device("meta"):
        tiny = create_model("swin_tiny_patch4_window7")
    assert 28.0e6 < sum(p.numel() for p in tiny.parameters()) < 28.6e6  # the paper's Swin-T: 28M


def test_micro_variant_fits_fashion_mnist_at_56_px():
    clf = create_model("swin_micro_patch4_window7")
    simmim = create_model("simmim_swin_micro_patch4_window7")
    assert (clf.img_size, clf.in_chans, clf.num_classes) == ((56, 56), 1, 10)
    # stage grids 14 x 14 and 7 x 7: a 7 x 7 window fits both, the first stage's odd blocks shifted by 3
    stages = [stage.blocks for stage in clf.layers]
    assert [blocks[0].input_resolution for blocks in stages] == [(14, 14), (7, 7)]
    assert [tuple(b.shift_size) for b in stages[0]] == [(0, 0), (3, 3)]
    assert (simmim.patch_size, simmim.grid_size, simmim.num_patches) == (8, (7, 7), 49)
    x = torch.randn(2, 1, 56, 56)
    assert clf(x).shape == (2, 10)
    out = simmim(x)
    assert out.pred.shape == (2, 49, 8 * 8 * 1)
    assert int(out.mask[0].sum()) == 49 - int(49 * 0.4)  # the default ratio is SimMIM's 0.6


# -- the classifier ---------------------------------------------------------------------------------


def test_classifier_interface():
    model = tiny_swin().eval()
    x = torch.randn(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (3, 4, 4, 32)  # NHWC after the final norm; the last stage is 2 x 16 wide
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (3, model.embed_dim) and model.embed_dim == 32
    torch.testing.assert_close(pooled, features.mean(dim=(1, 2)))
    assert model(x).shape == (3, 5)
    torch.testing.assert_close(model.encode(x), features.flatten(1, 2))
    assert (model.global_pool, model.use_fc_norm, model.num_prefix_tokens) == ("avg", False, 0)
    assert (model.img_size, model.in_chans, model.num_classes) == ((32, 32), 3, 5)
    assert pooled_features(model, x).shape == (3, 32)  # what openmae.inference extracts
    assert model.config == json.loads(json.dumps(model.config))  # JSON-safe as it is: tuples are lists
    assert model.config["depths"] == [2, 2] and model.config["img_size"] == 32


def test_head_layouts():
    plain = tiny_swin()
    assert [k for k in plain.state_dict() if k.startswith("head.")] == ["head.fc.weight", "head.fc.bias"]
    probe = tiny_swin(head_norm=True)
    assert [k for k in probe.state_dict() if k.startswith("head.")] == [
        "head.fc.0.running_mean", "head.fc.0.running_var", "head.fc.0.num_batches_tracked",
        "head.fc.1.weight", "head.fc.1.bias",
    ]
    bn = probe.head.fc[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert probe.head_linear is probe.head.fc[1] and float(probe.head_linear.weight.detach().std()) < 0.02
    headless = tiny_swin(num_classes=0, head_norm=True)
    assert not [k for k in headless.state_dict() if k.startswith("head.")] and headless.head_linear is None
    x = torch.randn(2, 3, 32, 32)
    assert headless(x).shape == (2, 32)


def test_readout_errors_are_clear():
    with pytest.raises(ValueError, match="no cls token, so global_pool must be 'avg'"):
        tiny_swin(global_pool="token")
    with pytest.raises(ValueError, match="final norm already normalises"):
        tiny_swin(fc_norm=True)
    tiny_swin(fc_norm=False)
    tiny_swin(fc_norm=None)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        tiny_swin(num_classes=-1)
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        tiny_swin(img_size=30)
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_swin(num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        tiny_swin(num_heads=(3, 2))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\)"):
        tiny_swin()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="mask cell, 8 px"):
        tiny_simmim(img_size=36)  # a multiple of the 4-px patch, not of the 8-px cell
    with pytest.raises(ValueError, match="pixel_loss must be one of l1, l2"):
        tiny_simmim(pixel_loss="huber")
    with pytest.raises(ValueError, match="mask_type must be one of"):
        tiny_simmim(mask_type="checkerboard")


@pytest.mark.parametrize("kw", [{}, {"img_size": (32, 48), "in_chans": 2, "window_size": 2, "mlp_ratio": 2.0}])
def test_classifier_round_trips_with_timm_exactly(kw):
    ours = tiny_swin(drop_path_rate=0.1, **kw).eval()
    cfg = ours.config
    shape = {k: cfg[k] for k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
                                 "num_heads", "window_size", "mlp_ratio")}
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **shape).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, cfg["in_chans"], *ours.img_size)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
        assert torch.equal(theirs.forward_features(x), ours.forward_features(x))
    # and back: timm's weights (its own initialisation) into ours
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **shape).eval()
    back = tiny_swin(**kw).eval()
    back.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), theirs(x))


def test_partial_fine_tuning_sees_every_block():
    model = tiny_swin()
    blocks = model.tunable_blocks()
    assert blocks == [*model.layers[0].blocks, *model.layers[1].blocks]
    norm, fc_norm, head = model.readout_modules()
    assert norm is model.norm and head is model.head and not list(fc_norm.parameters())
    trainable = freeze_for_tuning(model, 1)
    assert trainable and all(n.startswith(("layers.1.blocks.1.", "norm.", "head.")) for n in trainable)
    assert any(n.startswith("layers.1.blocks.1.") for n in trainable)
    trainable = freeze_for_tuning(model, 0)
    assert all(n.startswith("head.") for n in trainable)
    trainable = freeze_for_tuning(model, "mlp")
    assert {n.split(".")[4] for n in trainable if n.startswith("layers.")} == {"norm2", "mlp"}


def test_layer_decay_groups_follow_timm():
    from timm.optim import param_groups_layer_decay

    model = tiny_swin()
    groups = param_groups_layer_decay(model, 0.05, list(model.no_weight_decay()), layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 2 + 4  # the stem, one layer per block, the head (with the final norm)
    assert scales[-1] == 1.0


# -- SimMIM -----------------------------------------------------------------------------------------


def test_simmim_encoder_loads_into_its_classifier():
    simmim = tiny_simmim(in_chans=1).eval()
    assert classifier_name(arch_of(simmim)) == "swin_tiny_patch4_window7"
    assert classifier_name("swin_tiny_patch4_window7") == "swin_tiny_patch4_window7"
    clf = create_model(classifier_name(simmim.arch), **simmim.config).eval()
    assert isinstance(clf, SwinClassifier) and clf.in_chans == 1 and "mask_type" not in clf.config
    missing, unexpected = clf.load_state_dict(simmim.state_dict(), strict=False)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"]
    assert sorted(unexpected) == ["decoder_pred.bias", "decoder_pred.weight", "mask_token"]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf.forward_features(x), simmim.forward_features(x))
        assert torch.equal(clf.encode(x), simmim.encode(x))
    assert simmim.encode(x).shape == (2, 16, 32)  # (N, L_final, D): the last stage's 4 x 4 tokens
    assert pooled_features(simmim, x, pool="avg").shape == (2, 32)


def test_prediction_never_reads_masked_pixels():
    model = tiny_simmim(in_chans=2).eval()
    x = torch.randn(2, 2, 32, 32)
    mask = half_mask(model)
    removed = pixels_of(model, mask)
    with torch.no_grad():
        out = model(x, mask=mask)
        # anything at all in the masked cells, even inf / NaN, leaves the prediction exactly as it was
        for fill in (100 * torch.randn_like(x), torch.full_like(x, float("nan")), torch.full_like(x, float("inf"))):
            assert torch.equal(model(torch.where(removed, fill, x), mask=mask).pred, out.pred)
        first_visible = int((~mask[0]).nonzero()[0])
        visible = pixels_of(model, torch.arange(model.num_patches).eq(first_visible).expand_as(mask))
        changed = model(torch.where(visible, x + 1.0, x), mask=mask)
    assert (changed.pred[0] - out.pred[0]).abs().amax() > 1e-3
    # every token sees the whole (mask-token filled) grid: a visible change reaches masked cells too
    assert (changed.pred[0, mask[0]] - out.pred[0, mask[0]]).abs().amax() > 0


def test_noise_and_explicit_mask_conventions():
    model = tiny_simmim().eval()
    x = torch.randn(2, 3, 32, 32)
    length = model.num_patches  # 16 cells
    noise = torch.rand(2, length)
    with torch.no_grad():
        a = model(x, mask_ratio=0.75, noise=noise)
        b = model(x, mask_ratio=0.75, noise=noise)
        assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
        assert a.mask.shape == a.ids_restore.shape == (2, length)
        kept = noise.argsort(1)[:, :4]  # ascend: small noise is kept
        assert torch.all(a.mask.gather(1, kept) == 0) and torch.all(a.mask.sum(1) == 12)
        c = model(x, mask=a.mask.bool())  # an explicit mask: the same cells, the same result
        assert torch.equal(c.mask, a.mask) and torch.equal(c.pred, a.pred) and torch.equal(c.loss, a.loss)
        assert torch.all(model(x, mask_ratio=0.5).mask.sum(1) == 8)  # the ratio is per call
        assert torch.all(model(x).mask.sum(1) == length - int(length * 0.4))  # default: 0.6
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 16\)"):
        model(x, mask=torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\)"):
        model(x, noise=torch.rand(2, 64))


@pytest.mark.parametrize("mask_type", ["random", "block", "grid"])
def test_mask_types_sample_on_the_mask_grid(mask_type):
    model = tiny_simmim(mask_type=mask_type)
    out = model(torch.randn(3, 3, 32, 32), mask_ratio=0.5)
    removed = out.mask.sum(1)
    assert torch.all(removed == removed[0]) and 0 < int(removed[0]) < model.num_patches
    if mask_type == "grid":
        assert int(removed[0]) == 12  # 3 of every 2 x 2 cells


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_on_masked_pixels_only(pixel_loss, norm_pix_loss):
    model = tiny_simmim(pixel_loss=pixel_loss, norm_pix_loss=norm_pix_loss)
    x = torch.randn(2, 3, 32, 32)
    mask = half_mask(model)
    pred = torch.randn(2, model.num_patches, 8 * 8 * 3)
    loss = model.forward_loss(x, pred, mask.float())
    # by hand: the error of every masked pixel and channel, averaged (each cell has as many values)
    target = model.patchify(x)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    error = (pred - target).abs() if pixel_loss == "l1" else (pred - target) ** 2
    torch.testing.assert_close(loss, error[mask].mean())
    removed = pixels_of(model, mask)
    visible_changed = torch.where(removed, x, torch.randn_like(x))
    assert torch.equal(model.forward_loss(visible_changed, pred, mask.float()), loss)
    masked_changed = torch.where(removed, torch.randn_like(x), x)
    assert model.forward_loss(masked_changed, pred, mask.float()) != loss


def test_training_reduces_the_loss_and_reaches_every_parameter():
    torch.manual_seed(0)
    model = tiny_simmim(in_chans=1).train()
    x = torch.rand(4, 1, 32, 32)
    noise = torch.rand(4, model.num_patches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(x, noise=noise)
        optimizer.zero_grad()
        out.loss.backward()
        if not losses:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert model.mask_token.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "mask_token" in model.no_weight_decay()


def test_reconstruction_figures_work_unchanged():
    model = tiny_simmim(in_chans=1)
    images = torch.rand(3, 1, 32, 32)
    rec = reconstruct(model, images, mask_ratios=(0.5, 0.75), seed=1)
    assert rec.panels.shape == (3, 2, len(PANELS), 1, 32, 32) and rec.mode == "pixels"
    assert rec.mask.shape == (3, 2, model.num_patches)
    assert torch.equal(rec.panel("original")[:, 0], images)
    # the masked panel is grey exactly on the removed 8 x 8 cells
    removed = pixels_of(model, rec.mask[:, 0]).squeeze(1)
    assert torch.all(rec.panel("masked")[:, 0, 0][removed] == 0.5)
    again = reconstruct(model, images, mask_ratios=(0.5, 0.75), seed=1)
    assert torch.equal(again.panels, rec.panels)
    grid = reconstruct(create_model("simmim_swin_micro_patch4_window7", **{**SHRINK, "img_size": 32}), images,
                       mask_type="grid")
    assert grid.panels.shape == (3, 1, len(PANELS), 1, 32, 32)


def test_openmae_top_level_builds_swin():
    model = openmae.create_model("simmim_swin_micro_patch4_window7", embed_dim=16)
    assert isinstance(model, SimMIMSwin) and model.arch == "simmim_swin_micro_patch4_window7"
