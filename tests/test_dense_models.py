"""Dense models: the pyramids (ViT simple pyramid, ConvViT and Swin stages), the segmentor with its
heads, torchvision's detectors on the pyramids, layer-wise lr decay, encoders from checkpoints used
at another image size."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import openmae
from openmae.dense.models import Segmentor, build_dense_encoder, build_detector, dense_param_groups
from openmae.dense.pyramid import build_pyramid, resample_pos_embed
from openmae.dense.tasks import dense_record, save_dense_model
from openmae.eval_config import EncoderConfig
from openmae.interop.classifier import ClassifierLayout, build_classifier, read_encoder
from openmae.patches import sincos_2d

VIT = dict(embed_dim=32, depth=2, num_heads=2)
CONVVIT = dict(embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=2)
SWIN4 = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
MAE_DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def vit(patch: int, img_size=32, **kw):
    """A tiny headless ViT: patch 4 (grayscale, the CPU models') or 16 (RGB)."""
    name = "vit_micro_patch4" if patch == 4 else "vit_tiny_patch16"
    return build_dense_encoder(name, img_size=img_size, **{**VIT, **kw})


def convvit(img_size=64, **kw):
    return build_dense_encoder("convvit_tiny_patch16", img_size=img_size, **{**CONVVIT, **kw})


def swin(img_size=64):
    return build_dense_encoder("swin_tiny_patch4_window7", img_size=img_size, **SWIN4)


def images_for(encoder, h: int, w: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, encoder.in_chans, h, w)


def assert_levels(maps: dict, pyramid, size: tuple[int, int], n: int = 2) -> None:
    assert list(maps) == list(pyramid.out_channels) == list(pyramid.strides)
    for name, m in maps.items():
        s = pyramid.strides[name]
        assert name == f"p{round(math.log2(s))}"
        assert m.shape == (n, pyramid.out_channels[name], math.ceil(size[0] / s), math.ceil(size[1] / s)), name
        assert torch.isfinite(m).all()


# -- pyramids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [4, 16])
@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 96), (38, 50)])
def test_vit_pyramid_levels_follow_the_input_grid(patch, size):
    pyramid = build_pyramid(vit(patch, img_size=32))  # built at 32 px; other inputs take their own grid
    maps = pyramid(images_for(pyramid.encoder, *size))
    assert_levels(maps, pyramid, size)
    # scale factors 4, 2, 1, 1/2 of the patch grid: strides p/4 ... 2p, ViTDet's widths D/4 ... D
    assert list(pyramid.strides.values()) == [patch / 4, patch / 2, patch, 2 * patch]
    assert list(pyramid.out_channels.values()) == [8, 16, 32, 32]
    assert list(pyramid.strides) == (["p0", "p1", "p2", "p3"] if patch == 4 else ["p2", "p3", "p4", "p5"])


def test_vit_pyramid_common_width_option():
    pyramid = build_pyramid(vit(16), out_channels=24)
    maps = pyramid(images_for(pyramid.encoder, 32, 48))
    assert set(pyramid.out_channels.values()) == {24}
    assert_levels(maps, pyramid, (32, 48))


def test_vit_pyramid_reads_the_encoders_tokens():
    encoder = vit(4, img_size=32).eval()
    pyramid = build_pyramid(encoder)
    x = images_for(encoder, 32, 32)
    tokens = encoder.forward_features(x)[:, 1:]  # (N, L, D) after the final norm
    expected = tokens.transpose(1, 2).reshape(2, 32, 8, 8)
    torch.testing.assert_close(pyramid(x)["p2"], expected)  # stride 4 = the patch grid, identity


def test_vit_pyramid_recomputes_sincos_positions_for_another_grid():
    small = vit(4, img_size=32).eval()
    large = vit(4, img_size=48).eval()
    large.load_state_dict({k: v for k, v in small.state_dict().items() if k != "pos_embed"}, strict=False)
    x = images_for(small, 48, 48)
    got, _ = build_pyramid(small).forward_tokens(x)
    want, _ = build_pyramid(large).forward_tokens(x)  # built at 48 px: its own 12 x 12 table
    torch.testing.assert_close(got, want)


def test_resample_pos_embed_sincos_exact_learned_bicubic():
    fixed = sincos_2d(16, (4, 4), cls_token=True).unsqueeze(0)
    out = resample_pos_embed(fixed, (4, 4), (6, 8), prefix=1)
    torch.testing.assert_close(out, sincos_2d(16, (6, 8), cls_token=True).unsqueeze(0))

    learned = torch.randn(1, 1 + 16, 16)
    out = resample_pos_embed(learned, (4, 4), (6, 8), prefix=1)
    assert out.shape == (1, 1 + 48, 16)
    torch.testing.assert_close(out[:, :1], learned[:, :1])  # the cls row is kept
    # bicubic, not nearest: a table linear along columns stays monotone along columns
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1).expand(1, 16, 4).contiguous()
    wide = resample_pos_embed(ramp, (4, 4), (4, 8), prefix=0).reshape(4, 8, 4)
    assert (wide[:, 1:] >= wide[:, :-1] - 1e-6).all() and len(wide[0, :, 0].unique()) == 8


def test_vit_window_attention_changes_output_not_shapes():
    encoder = vit(4, img_size=32, depth=4).eval()
    x = images_for(encoder, 32, 48)
    plain = build_pyramid(encoder)  # ViTDet's default for depth 4 keeps every block global
    assert not any(plain.windowed)
    windowed = build_pyramid(encoder, window_size=2, global_blocks=(1, 3))
    assert windowed.windowed == [True, False, True, False]
    padded = build_pyramid(encoder, window_size=3, global_blocks=(3,))  # 8 x 12 grid: windows padded
    a, b, c = plain(x), windowed(x), padded(x)
    for name in a:
        assert a[name].shape == b[name].shape == c[name].shape
        assert torch.isfinite(c[name]).all()
    assert not torch.allclose(a["p2"], b["p2"]) and not torch.allclose(b["p2"], c["p2"])


def test_vit_window_attention_is_local():
    encoder = vit(4, img_size=32).eval()
    pyramid = build_pyramid(encoder, window_size=2, global_blocks=())  # every block windowed
    x = images_for(encoder, 32, 32)
    y = x.clone()
    y[..., :8, :8] += 1.0  # the first 2 x 2-token window only
    a, b = pyramid(x)["p2"], pyramid(y)["p2"]  # p2: stride 4, one cell per token
    changed = (a - b).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[:2, :2].all()
    assert not changed[2:].any() and not changed[:, 2:].any()


def test_convvit_pyramid_stages():
    pyramid = build_pyramid(convvit(64))
    assert pyramid.strides == {"p2": 4.0, "p3": 8.0, "p4": 16.0, "p5": 32.0}
    assert list(pyramid.out_channels.values()) == [16, 32, 48, 48]
    for size in [(64, 64), (48, 64)]:  # smaller inputs are padded to the built size, maps cropped
        assert_levels(pyramid(images_for(pyramid.encoder, *size)), pyramid, size)
    with pytest.raises(ValueError, match="larger than the 64x64"):
        pyramid(images_for(pyramid.encoder, 80, 64))


def test_convvit_windows_are_an_encoder_option():
    encoder = convvit(64, window_size=2, global_blocks=(1,))
    pyramid = build_pyramid(encoder)
    assert_levels(pyramid(images_for(encoder, 64, 64)), pyramid, (64, 64))
    with pytest.raises(ValueError, match="build_dense_encoder"):
        build_pyramid(convvit(64), window_size=2)


def test_swin_pyramid_stages():
    pyramid = build_pyramid(swin(64))
    assert pyramid.strides == {"p2": 4.0, "p3": 8.0, "p4": 16.0, "p5": 32.0}
    assert list(pyramid.out_channels.values()) == [16, 32, 64, 128]
    for size in [(64, 64), (64, 48)]:
        assert_levels(pyramid(images_for(pyramid.encoder, *size)), pyramid, size)
    micro = build_pyramid(build_dense_encoder("swin_micro_patch4_window7"))  # two stages: two levels
    assert micro.strides == {"p2": 4.0, "p3": 8.0}
    assert_levels(micro(torch.randn(2, 1, 56, 56)), micro, (56, 56))


def test_pyramid_refuses_an_encoder_with_a_decoder_or_head():
    mae = openmae.create_model("mae_vit_micro_patch4", img_size=32, **VIT, **MAE_DECODER)
    with pytest.raises(ValueError, match="build_dense_encoder"):
        build_pyramid(mae)
    classifier = openmae.create_model("vit_micro_patch4", img_size=32, **VIT)
    with pytest.raises(ValueError, match="head"):
        build_pyramid(classifier)


# -- segmentor -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: vit(4), (32, 48)),
        (lambda: vit(16), (64, 96)),
        (lambda: vit(16), (36, 52)),
        (lambda: convvit(64), (48, 64)),
        (lambda: swin(64), (64, 48)),
    ],
    ids=["vit4", "vit16", "vit16-odd", "convvit", "swin"],
)
@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_segmentor_logits_match_the_input(make, size, head):
    encoder = make()
    model = Segmentor(encoder, num_classes=5, head=head, channels=16)
    logits = model(images_for(encoder, *size))
    assert logits.shape == (2, 5, *size)
    masks = torch.randint(0, 5, (2, *size))
    loss = model.loss(logits, masks)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing left unused


def test_segmentor_loss_ignores_the_ignore_index():
    model = Segmentor(vit(4), num_classes=3, channels=16)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[0] = 255
    torch.testing.assert_close(model.loss(logits, masks), F.cross_entropy(logits[1:], masks[1:]))
    empty = model.loss(logits, torch.full((2, 8, 8), 255))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="do not fit"):
        model.loss(logits, masks[:, :4])


def rectangle_scenes(n: int = 4, size=(32, 32), seed: int = 0):
    """Grayscale noise with one bright rectangle (class 1) and one dark one (class 2), 10-19 px a side.

    Bright against dark rather than two brightness levels: a random ViT's LayerNorms make a constant
    patch's embedding blind to its intensity (only the sign survives), so those would take long to tell apart."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = 0.3 * torch.randn(n, 1, h, w, generator=g)
    masks = torch.zeros(n, h, w, dtype=torch.long)
    for i in range(n):
        for c in (1, 2):
            rh, rw = (int(v) for v in torch.randint(10, 20, (2,), generator=g))
            y, x = int(torch.randint(0, h - rh, (1,), generator=g)), int(torch.randint(0, w - rw, (1,), generator=g))
            masks[i, y : y + rh, x : x + rw] = c
    images += torch.tensor([0.0, 1.5, -1.5])[masks][:, None]
    return images, masks


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_segmentor_overfits_a_few_images(head):
    images, masks = rectangle_scenes()
    foreground = masks > 0
    model = Segmentor(vit(4), num_classes=3, head=head, channels=32, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses, accuracy = [], []
    for _ in range(30):
        logits = model(images)
        loss = model.loss(logits, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        pred = logits.argmax(1)
        accuracy.append(((pred == masks).float().mean().item(), (pred == masks)[foreground].float().mean().item()))
    assert losses[-1] < 0.5 * losses[0], losses
    (pixels_before, _), (pixels_after, objects_after) = accuracy[0], accuracy[-1]
    assert pixels_after > pixels_before and pixels_after > 0.9, accuracy
    assert objects_after > 0.9, accuracy  # the rectangles themselves, not just the background


def test_upernet_batch_norm_refuses_one_image_group_norm_takes_it():
    images, masks = rectangle_scenes(n=1)
    with pytest.raises(ValueError, match="batch of one image"):
        Segmentor(vit(4), num_classes=3, channels=16)(images)
    model = Segmentor(vit(4), num_classes=3, channels=16, norm="gn")
    model.loss(model(images), masks).backward()
    assert Segmentor(vit(4), num_classes=3, channels=16).eval()(images).shape == (1, 3, 32, 32)


# -- layer-wise lr decay ---------------------------------------------------------------------------


def test_layer_decay_gives_earlier_blocks_smaller_lr():
    model = Segmentor(vit(4), num_classes=3, channels=16)
    groups = model.param_groups(weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    enc = "backbone.encoder."
    # timm's layers, as classification fine-tuning: stem 0, block i at i + 1 (the final norm with the
    # last block), everything new one above with the full lr
    assert scale[enc + "patch_embed.proj.weight"] == 0.125
    assert scale[enc + "blocks.0.attn.qkv.weight"] == 0.25
    assert scale[enc + "blocks.1.attn.qkv.weight"] == scale[enc + "norm.weight"] == 0.5
    new = [n for n in scale if not n.startswith(enc)]
    assert new and all(scale[n] == 1.0 for n in new)
    assert enc + "pos_embed" not in scale  # the fixed sin-cos table is frozen
    assert decay[enc + "cls_token"] == decay[enc + "norm.weight"] == decay[enc + "blocks.0.attn.qkv.bias"] == 0.0
    assert decay[enc + "blocks.0.attn.qkv.weight"] == decay["head.classifier.conv.weight"] == 0.05
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == sum(p.requires_grad for p in model.parameters())


def test_layer_decay_on_convvit_and_a_detector():
    model = Segmentor(convvit(64), num_classes=3, channels=16)
    scale = {n: g["lr_scale"] for g in model.param_groups(0.05, 0.5) for n in g["names"]}
    enc = "backbone.encoder."
    assert scale[enc + "patch_embed1.proj.weight"] == scale[enc + "blocks1.0.conv1.weight"] == 0.125
    assert scale[enc + "blocks3.0.attn.qkv.weight"] == 0.25 and scale[enc + "blocks3.1.attn.qkv.weight"] == 0.5
    assert scale["backbone.norms.p2.weight"] == 1.0

    detector = build_detector(vit(4), num_classes=3, fpn_channels=16, representation_size=32)
    scale = {n: g["lr_scale"] for g in dense_param_groups(detector, 0.05, 0.5) for n in g["names"]}
    enc = "backbone.body.encoder."
    assert scale[enc + "blocks.0.attn.qkv.weight"] < scale[enc + "blocks.1.attn.qkv.weight"] < 1.0
    assert scale["backbone.fpn.inner_blocks.0.0.weight"] == scale["roi_heads.box_predictor.cls_score.weight"] == 1.0


# -- detection -------------------------------------------------------------------------------------


def box_scenes(n: int = 4, size: int = 64, channels: int = 3, seed: int = 0):
    """Noise with 1-2 bright squares (10-20 px) of class 1 or 2: images, torchvision targets."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = 0.2 * torch.randn(1, size, size, generator=g)
        boxes, labels, masks = [], [], []
        for k in range(int(torch.randint(1, 3, (1,), generator=g))):
            side = int(torch.randint(10, 21, (1,), generator=g))
            x = 2 + k * 24 + int(torch.randint(0, max(1, 24 - side - 2), (1,), generator=g))
            y = int(torch.randint(0, size - side, (1,), generator=g))
            label = int(torch.randint(1, 3, (1,), generator=g))
            image[:, y : y + side, x : x + side] += label
            boxes.append([x, y, x + side, y + side])
            labels.append(label)
            mask = torch.zeros(size, size, dtype=torch.uint8)
            mask[y : y + side, x : x + side] = 1
            masks.append(mask)
        images.append(image.expand(channels, -1, -1))
        targets.append(
            dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels), masks=torch.stack(masks))
        )
    return images, targets


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_detector_trains_and_detects(kind):
    images, targets = box_scenes()
    model = build_detector(
        vit(16, img_size=64),
        kind=kind,
        num_classes=3,
        fpn_channels=16,
        representation_size=64,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=100,
        box_batch_size_per_image=64,
    )
    assert model.transform.min_size == (64,) and model.transform.max_size == 64  # 64 px images stay 64 px
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss_dict = model(images, targets)
        if kind == "mask_rcnn":
            assert "loss_mask" in loss_dict
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    model.eval()
    with torch.no_grad():
        out = model(images[:2])
    assert len(out) == 2
    for det in out:
        k = len(det["boxes"])
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == det["scores"].shape == (k,)
        assert k == 0 or (det["boxes"] >= 0).all() and (det["boxes"] <= 64).all()
        if kind == "mask_rcnn":
            assert det["masks"].shape == (k, 1, 64, 64)


def test_detector_anchors_follow_the_levels():
    model = build_detector(vit(16, img_size=64), num_classes=3, fpn_channels=16, representation_size=32)
    # strides 4, 8, 16, 32 and FPN's extra pool level (64): anchors 4 x stride
    assert model.rpn.anchor_generator.sizes == ((16.0,), (32.0,), (64.0,), (128.0,), (256.0,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="one tuple per FPN level"):
        build_detector(vit(16, img_size=64), num_classes=3, anchor_sizes=((8,), (16,)))
    with pytest.raises(ValueError, match="background"):
        build_detector(vit(16, img_size=64), num_classes=1)


# -- encoders from checkpoints ---------------------------------------------------------------------


def test_encoder_from_an_mae_checkpoint_at_another_size(tmp_path):
    mae = openmae.create_model("mae_vit_micro_patch4", img_size=32, **VIT, **MAE_DECODER)
    path = openmae.save_pretrained(mae, tmp_path / "mae.safetensors")
    for size, grid in [(48, (12, 12)), ((32, 48), (8, 12))]:
        encoder = build_dense_encoder(path, img_size=size)
        assert tuple(encoder.grid_size) == grid and not encoder.load_report.missing
        torch.testing.assert_close(encoder.pos_embed[0], sincos_2d(32, grid, cls_token=True))
        for key in ("blocks.1.mlp.fc2.weight", "norm.weight", "patch_embed.proj.weight", "cls_token"):
            torch.testing.assert_close(encoder.state_dict()[key], mae.state_dict()[key])
        model = Segmentor(encoder, num_classes=3, channels=16)
        h, w = encoder.img_size
        assert model(torch.randn(2, 1, h, w)).shape == (2, 3, h, w)


def test_encoder_from_a_checkpoint_with_a_learned_table(tmp_path):
    encoder = vit(4, img_size=32)
    with torch.no_grad():
        encoder.pos_embed.normal_()
    path = openmae.save_pretrained(encoder, tmp_path / "vit.safetensors")
    wide = build_dense_encoder(path, img_size=(32, 64))
    expected = resample_pos_embed(encoder.pos_embed, (8, 8), (8, 16), prefix=1)
    torch.testing.assert_close(wide.pos_embed, expected)
    assert any("pos_embed resampled from 8x8 to 8x16" in note for note in wide.load_report.notes)


def test_convvit_encoder_from_a_convmae_checkpoint_at_another_size(tmp_path):
    convmae = openmae.create_model("convmae_tiny_patch16", img_size=32, **CONVVIT, **MAE_DECODER)
    path = openmae.save_pretrained(convmae, tmp_path / "convmae.safetensors")
    encoder = build_dense_encoder(path, img_size=64)
    torch.testing.assert_close(encoder.pos_embed[0], sincos_2d(48, (4, 4)))
    torch.testing.assert_close(encoder.blocks3[1].attn.qkv.weight, convmae.blocks3[1].attn.qkv.weight)
    pyramid = build_pyramid(encoder)
    assert_levels(pyramid(torch.randn(2, 3, 64, 64)), pyramid, (64, 64))


def test_build_dense_encoder_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a registered model name"):
        build_dense_encoder(tmp_path / "missing.safetensors")
    encoder = build_dense_encoder("mae_vit_micro_patch4", **VIT)  # a pretraining name picks its encoder
    assert type(encoder).__name__ == "VisionTransformer" and encoder.num_classes == 0


# -- a saved dense model as a pretrained encoder ---------------------------------------------------------


def saved_dense_model(tmp_path, task: str, encoder):
    """(path, model): a segment / detect model with a perturbed encoder, saved as the commands save it."""
    torch.manual_seed(0)
    if task == "segment":
        args = dict(num_classes=3, channels=16)
        model = Segmentor(encoder, **args)
    else:
        args = dict(num_classes=3, fpn_channels=16, representation_size=32)
        model = build_detector(encoder, **args)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))  # not the initial values, so loading them is seen
    record = dense_record(task, encoder, args, ["background", "a", "b"], img_size=32, channels=encoder.in_chans,
                          mean=[0.5], std=[0.25])
    return save_dense_model(model, record, tmp_path / f"{task}.safetensors"), model


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_a_saved_dense_model_loads_as_its_encoder(tmp_path, task):
    encoder = vit(4, img_size=32)
    path, _ = saved_dense_model(tmp_path, task, encoder)
    loaded = openmae.load_pretrained(path)  # the encoder alone, as the record names it
    assert openmae.registry.arch_of(loaded) == "vit_micro_patch4" and not loaded.load_report.missing
    assert loaded.load_report.kind == f"the encoder of a {task} model"
    assert loaded.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a classifier at another size, as `openmae finetune --checkpoint` builds it: blocks loaded, table fitted
    source = str(path)
    clf = build_classifier(EncoderConfig(checkpoint=source), read_encoder(source), ClassifierLayout(num_classes=10),
                           img_size=16, in_chans=1)
    torch.testing.assert_close(clf.blocks[1].mlp.fc1.weight, encoder.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(clf.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    assert any("pos_embed resampled from 8x8 to 4x4" in n for n in clf.load_report.notes)


def test_a_dense_model_of_a_convvit_loads_as_its_encoder(tmp_path):
    encoder = convvit(img_size=32)
    path, _ = saved_dense_model(tmp_path, "segment", encoder)
    info = openmae.inspect_checkpoint(path)
    assert info["arch"] == "convvit_tiny_patch16" and not info["missing_encoder"] and not info["unexpected"]
    loaded = openmae.load_pretrained(path)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_dense_model_without_one_encoder_is_refused(tmp_path):
    from openmae.io import DENSE_KEY, write_safetensors

    record = {"task": "segment", "encoder": {"arch": "vit_micro_patch4", "config": {}}}
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, {"head.weight": torch.zeros(2)}, {DENSE_KEY: json.dumps(record)})
    with pytest.raises(ValueError, match="encoder cannot be told apart"):
        openmae.load_pretrained(bad)
    write_safetensors(bad, {"head.weight": torch.zeros(2)}, {DENSE_KEY: "{not json"})
    with pytest.raises(ValueError, match="metadata is damaged"):
        openmae.load_pretrained(bad)
