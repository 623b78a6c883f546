"""ConvMAE and its ConvViT backbone: shapes, the no-leak property of masked convolution, every
registered variant, window attention, the pyramid and the official checkpoint layout."""

import argparse

import pytest
import torch

import openmae
from openmae.interop.convmae import load_official_convmae
from openmae.models.convmae import ConvMAE, visible_map
from openmae.models.convvit import ConvViT, window_attention_mask
from openmae.models.mae import MAEOutput

# shrunk widths: every case runs in well under a second on two cores
ENCODER = dict(embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
CONVMAE_MODELS = openmae.list_models("convmae_")
CONVVIT_MODELS = openmae.list_models("convvit_")


def tiny_convmae(img_size=32, **kw) -> ConvMAE:
    return openmae.create_model("convmae_tiny_patch16", img_size=img_size, **{**ENCODER, **DECODER, **kw})


def tiny_convvit(img_size=32, **kw) -> ConvViT:
    return openmae.create_model("convvit_tiny_patch16", img_size=img_size, **{**ENCODER, **kw})


def test_registry_and_paper_defaults():
    for size in ("tiny", "small", "base", "large"):
        assert f"convmae_{size}_patch16" in CONVMAE_MODELS
        assert f"convvit_{size}_patch16" in CONVVIT_MODELS
    m = openmae.create_model("convmae_base_patch16")
    cfg = m.config
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == ([256, 384, 768], [2, 2, 11], 12)
    assert (cfg["decoder_embed_dim"], cfg["decoder_depth"], cfg["decoder_num_heads"]) == (512, 8, 16)
    assert m.arch == "convmae_base_patch16"
    assert (m.patch_size, m.grid_size, m.num_patches, m.img_size) == (16, (14, 14), 196, (224, 224))
    encoder = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("decoder", "mask_token")))
    assert 85e6 < encoder < 92e6  # the paper's ConvMAE-B: 88M
    assert m.pos_embed.shape == (1, 196, 768) and not m.pos_embed.requires_grad


@pytest.mark.parametrize("img_size", [32, 48, 64, (32, 64)])
def test_shapes_at_several_image_sizes(img_size):
    m = tiny_convmae(img_size, in_chans=2)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    gh, gw = h // 16, w // 16
    x = torch.randn(3, 2, h, w)
    latent, mask, ids_restore = m.forward_encoder(x, mask_ratio=0.75)
    keep = int(gh * gw * 0.25)
    assert m.grid_size == (gh, gw) and m.num_patches == gh * gw and m.num_prefix_tokens == 0
    assert latent.shape == (3, keep, 48)  # no cls token
    assert mask.shape == ids_restore.shape == (3, gh * gw)
    assert int(mask.sum(1)[0]) == gh * gw - keep
    pred = m.forward_decoder(latent, ids_restore)
    assert pred.shape == (3, gh * gw, 16 * 16 * 2)
    assert m.unpatchify(pred).shape == x.shape
    assert m.encode(x).shape == (3, gh * gw, 48)
    out = m(x)
    assert isinstance(out, MAEOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_visible_map_upsamples_the_stage3_mask():
    mask = torch.tensor([[0, 1, 1, 0]])  # 2 x 2 grid, top-right and bottom-left removed
    vis = visible_map(mask, (2, 2), 4)
    assert vis.shape == (1, 1, 8, 8)
    assert vis[0, 0, :4, :4].eq(1).all() and vis[0, 0, :4, 4:].eq(0).all()
    assert vis[0, 0, 4:, :4].eq(0).all() and vis[0, 0, 4:, 4:].eq(1).all()


def _pixel_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, H, W) bool pixel mask, True inside removed patches."""
    return mask.bool().reshape(-1, 1, *grid).repeat_interleave(16, 2).repeat_interleave(16, 3)


def test_masked_patches_do_not_leak_into_visible_tokens():
    torch.use_deterministic_algorithms(True)
    try:
        m = tiny_convmae(64).eval()  # 4 x 4 stage-3 grid, fp32
        x = torch.randn(2, 3, 64, 64)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, [0, 1, 5, 6, 7, 10, 12, 15]] = True  # removed patches touch visible ones on every side
        mask[1, [2, 3, 4, 8, 9, 11, 13, 14]] = True
        pix = _pixel_mask(mask, m.grid_size)
        with torch.no_grad():
            latent, _, _ = m.forward_encoder(x, mask=mask)
            # new content inside removed patches only: the visible tokens must not move at all
            masked_changed = torch.where(pix, 10 * torch.randn_like(x), x)
            latent_m, _, _ = m.forward_encoder(masked_changed, mask=mask)
            # new content inside visible patches: they must
            visible_changed = torch.where(pix, x, torch.randn_like(x))
            latent_v, _, _ = m.forward_encoder(visible_changed, mask=mask)
            # control: without masked convolution the conv stages do leak, so the test can fail
            enc, enc_m = m.encode(x), m.encode(masked_changed)
        torch.testing.assert_close(latent_m, latent, rtol=0, atol=1e-6)
        assert (latent_v - latent).abs().amax() > 1e-2
        visible_rows = ~mask[0]
        assert (enc[0, visible_rows] - enc_m[0, visible_rows]).abs().amax() > 1e-2
    finally:
        torch.use_deterministic_algorithms(False)


def test_noise_and_explicit_mask_conventions():
    m = tiny_convmae(64)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    _, mask, ids_restore = m.forward_encoder(x, mask_ratio=0.75, noise=noise)
    kept = noise.argsort(1)[:, :4]
    assert mask.gather(1, kept).eq(0).all() and mask.sum() == 2 * 12  # small noise is kept
    explicit = torch.ones(2, 16, dtype=torch.bool)
    explicit[:, [3, 9]] = False
    latent, mask2, _ = m.forward_encoder(x, mask=explicit)
    assert latent.shape == (2, 2, 48) and torch.equal(mask2.bool(), explicit)


@pytest.mark.parametrize("mask_type", ["random", "block", "grid"])
def test_mask_types_on_the_stage3_grid(mask_type):
    m = tiny_convmae(64, mask_type=mask_type)
    out = m(torch.randn(2, 3, 64, 64))
    assert out.mask.shape == (2, 16) and int(out.mask[0].sum()) == 12
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", CONVMAE_MODELS)
def test_forward_backward_every_convmae_variant(name):
    m = openmae.create_model(name, img_size=32, norm_pix_loss=True, **ENCODER, **DECODER)
    assert m.arch == name
    out = m(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for n, p in m.named_parameters():
        if p.requires_grad:  # every trainable parameter takes part (DDP needs no unused ones)
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", CONVVIT_MODELS)
def test_forward_backward_every_convvit_variant(name):
    m = openmae.create_model(name, img_size=32, num_classes=5, drop_path_rate=0.1, **ENCODER)
    logits = m(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    logits.logsumexp(1).sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_classifier_head_and_features():
    m = tiny_convvit(64, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 48)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 48)
    torch.testing.assert_close(m(x), m.head(m.fc_norm(feats.mean(1))))
    features_only = openmae.create_model("convvit_tiny_patch16", num_classes=0, **ENCODER)
    assert features_only(torch.randn(1, 3, 32, 32)).shape == (1, 48)


@pytest.mark.parametrize("img_size", [32, 48, 64])
def test_pyramid_shapes(img_size):
    m = tiny_convvit(img_size, window_size=2, shifted_windows=True).eval()
    g = img_size // 16
    x = torch.randn(2, 3, img_size, img_size)
    maps = m.forward_pyramid(x)
    assert maps["E1"].shape == (2, 16, 4 * g, 4 * g)
    assert maps["E2"].shape == (2, 32, 2 * g, 2 * g)
    assert maps["E3"].shape == (2, 48, g, g)
    assert maps["E4"].shape == (2, 48, (g + 1) // 2, (g + 1) // 2)
    assert {k: v.shape[1] for k, v in maps.items()} == m.pyramid_channels
    assert m.pyramid_strides == {"E1": 4, "E2": 8, "E3": 16, "E4": 32}
    torch.testing.assert_close(maps["E3"].flatten(2).transpose(1, 2), m.forward_features(x))  # row-major


def test_window_smaller_than_the_grid_partitions():
    # one unshifted windowed block on a 4 x 4 grid, window 2: a token reaches its own window only
    windowed = tiny_convvit(64, depth=(1, 1, 1), window_size=2, global_blocks=()).eval()
    plain = tiny_convvit(64, depth=(1, 1, 1)).eval()
    plain.load_state_dict(windowed.state_dict())
    tokens = torch.randn(1, 16, 48)
    moved = tokens.clone()
    moved[0, 1 * 4 + 2] += torch.randn(48)  # token (1, 2): window rows 0-1, columns 2-3
    with torch.no_grad():
        diff = (windowed.forward_transformer(moved) - windowed.forward_transformer(tokens)).abs().amax(-1)
        global_diff = (plain.forward_transformer(moved) - plain.forward_transformer(tokens)).abs().amax(-1)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, 2:] = True
    assert torch.equal(diff.reshape(4, 4) > 1e-6, expected)
    assert (global_diff > 1e-6).all()  # control: the same weights attending globally reach every token


def _segments(size: int, window: int, shift: int) -> list[range]:
    """The runs of grid rows (or columns) that share a window: windows start at ``shift + k * window``
    (a cyclic shift), and the grid's edge cuts too, since rolled or padded positions are masked out."""
    cuts = sorted({0, size, *range(shift, size, window)})
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _windowed_by_hand(blk, tokens: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """One block run on each window's tokens as a sequence of its own (no padding, no mask)."""
    out = torch.empty_like(tokens)
    for rows in _segments(grid[0], window, shift):
        for cols in _segments(grid[1], window, shift):
            idx = torch.tensor([r * grid[1] + c for r in rows for c in cols])
            out[:, idx] = blk(tokens[:, idx])
    return out


# grids 4 x 4, 3 x 3 (padded), 5 x 3 (padded, not square: a transposed partition cannot pass)
@pytest.mark.parametrize("img_size, window", [(64, 2), (48, 2), ((80, 48), 2), ((80, 48), 3)])
@pytest.mark.parametrize("shifted", [False, True])
def test_windowed_blocks_equal_attention_window_by_window(img_size, window, shifted):
    # unshifted: one windowed block; shifted: an unshifted block, then one shifted by window // 2
    shifts = [0, window // 2] if shifted else [0]
    m = tiny_convvit(img_size, depth=(1, 1, len(shifts)), window_size=window, global_blocks=(), shifted_windows=shifted)
    m.eval()
    assert m.block_shifts == shifts
    tokens = torch.randn(2, m.num_patches, 48)
    with torch.no_grad():
        expected = tokens
        for blk, shift in zip(m.blocks3, shifts):
            expected = _windowed_by_hand(blk, expected, m.grid_size, window, shift)
        torch.testing.assert_close(m.forward_transformer(tokens), expected)


def test_shifted_windows_only_mix_neighbours():
    # two windowed blocks on a 4 x 4 grid, window 2: the first unshifted, the second shifted by 1.
    # Token (0, 0) reaches its own window, then (via (1, 1)) the shifted window at rows/cols 1-2;
    # tokens that the cyclic shift wraps next to it (row 3, col 3) must stay untouched.
    m = tiny_convvit(64, depth=(1, 1, 2), window_size=2, global_blocks=(), shifted_windows=True).eval()
    assert m.block_shifts == [0, 1]
    tokens = torch.randn(1, 16, 48)
    moved = tokens.clone()
    moved[0, 0] += torch.randn(48)  # not a constant: LayerNorm would cancel that
    with torch.no_grad():
        diff = (m.forward_transformer(moved) - m.forward_transformer(tokens)).abs().amax(-1).reshape(4, 4)
    changed = diff > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(changed, expected), changed


def test_window_mask_keeps_padding_out():
    allowed = window_attention_mask((3, 3), 2, 0)  # padded to 4 x 4: 4 windows of 4 tokens
    assert allowed.shape == (4, 4, 4)
    assert allowed[0].all()  # the top-left window is all real
    # top-right window: columns 2 (real) and 3 (padding); real tokens see only real ones
    assert allowed[1].tolist() == [[True, False, True, False], [False, True, False, True]] * 2
    assert window_attention_mask((4, 4), 2, 0) is None  # plain windows need no mask
    padded = tiny_convvit(48, window_size=2)  # 3 x 3 grid
    assert padded.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 9, 48)


def test_pretrained_encoder_loads_into_backbone():
    mae = tiny_convmae(64)
    vit = tiny_convvit(64, num_classes=3)
    missing, unexpected = vit.load_state_dict(mae.state_dict(), strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    pretrain_only = ("decoder_", "mask_token", "stage1_output_decode.", "stage2_output_decode.", "norm.")
    assert unexpected and all(k.startswith(pretrain_only) for k in unexpected)
    # the same names play the same roles: the backbone reproduces ConvMAE's unmasked stage 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, _, tokens = mae.forward_conv_stages(x)
        for blk in mae.blocks3:
            tokens = blk(tokens)
        torch.testing.assert_close(vit.forward_features(x), tokens)


def test_backbone_from_the_pretraining_config_and_layer_decay():
    from timm.optim import param_groups_layer_decay

    mae = tiny_convmae(32)
    vit = openmae.create_model("convvit_tiny_patch16", **mae.config, num_classes=3)  # decoder args dropped
    assert vit.img_size == mae.img_size and vit.embed_dims == mae.embed_dims
    vit.load_state_dict(mae.state_dict(), strict=False)
    scales = {}
    for group in param_groups_layer_decay(vit, 0.05, no_weight_decay_list=["pos_embed"], layer_decay=0.5):
        for p in group["params"]:
            scales[p.data_ptr()] = group["lr_scale"]
    named = dict(vit.named_parameters())

    def scale(name):
        return scales[named[name].data_ptr()]

    # official grouping: stem + conv stages = layer 0, blocks3.i = i + 1, head on top (depth3 = 2)
    for stem in ("patch_embed1.proj.weight", "blocks2.0.conv1.weight", "patch_embed4.weight"):
        assert scale(stem) == 0.5**3, stem
    assert scale("blocks3.0.attn.qkv.weight") == 0.5**2 and scale("blocks3.1.mlp.fc2.weight") == 0.5
    assert scale("head.weight") == scale("fc_norm.weight") == 1.0


def official_convmae_state(
    in_chans=3, dims=(16, 32, 48), depth=(1, 1, 2), mlp=(4, 4, 4), dec=16, dec_depth=1, grid=(2, 2)
):
    """Random weights under the names and shapes of Alpha-VL/ConvMAE models_convmae.py, written
    out from that file's layout (not from openmae's modules)."""
    g = torch.Generator().manual_seed(1)
    s = {}

    def t(*shape):
        return torch.randn(*shape, generator=g)

    def linear(name, i, o):
        s[f"{name}.weight"], s[f"{name}.bias"] = t(o, i), t(o)

    def conv(name, i, o, k, groups=1):
        s[f"{name}.weight"], s[f"{name}.bias"] = t(o, i // groups, k, k), t(o)

    def layernorm(name, d):
        s[f"{name}.weight"], s[f"{name}.bias"] = 1 + 0.1 * t(d), 0.1 * t(d)

    def vit_block(name, d, ratio):
        layernorm(f"{name}.norm1", d)
        linear(f"{name}.attn.qkv", d, 3 * d)
        linear(f"{name}.attn.proj", d, d)
        layernorm(f"{name}.norm2", d)
        linear(f"{name}.mlp.fc1", d, int(d * ratio))
        linear(f"{name}.mlp.fc2", int(d * ratio), d)

    length = grid[0] * grid[1]
    for stage, (cin, cout, k) in enumerate([(in_chans, dims[0], 4), (dims[0], dims[1], 2), (dims[1], dims[2], 2)], 1):
        conv(f"patch_embed{stage}.proj", cin, cout, k)
        layernorm(f"patch_embed{stage}.norm", cout)
    linear("patch_embed4", dims[2], dims[2])
    conv("stage1_output_decode", dims[0], dims[2], 4)
    conv("stage2_output_decode", dims[1], dims[2], 2)
    s["pos_embed"] = t(1, length, dims[2])
    for stage in (1, 2):
        d = dims[stage - 1]
        for i in range(depth[stage - 1]):
            b = f"blocks{stage}.{i}"
            layernorm(f"{b}.norm1", d)
            conv(f"{b}.conv1", d, d, 1)
            conv(f"{b}.attn", d, d, 5, groups=d)
            conv(f"{b}.conv2", d, d, 1)
            layernorm(f"{b}.norm2", d)
            conv(f"{b}.mlp.fc1", d, int(d * mlp[stage - 1]), 1)
            conv(f"{b}.mlp.fc2", int(d * mlp[stage - 1]), d, 1)
    for i in range(depth[2]):
        vit_block(f"blocks3.{i}", dims[2], mlp[2])
    layernorm("norm", dims[2])
    linear("decoder_embed", dims[2], dec)
    s["mask_token"] = t(1, 1, dec)
    s["decoder_pos_embed"] = t(1, length, dec)
    for i in range(dec_depth):
        vit_block(f"decoder_blocks.{i}", dec, 4)
    layernorm("decoder_norm", dec)
    linear("decoder_pred", dec, 16 * 16 * in_chans)
    return s


def test_official_checkpoint_layout_loads(tmp_path):
    state = official_convmae_state()
    path = tmp_path / "checkpoint-1599.pth"
    # an official training checkpoint, argparse Namespace included
    torch.save({"model": state, "epoch": 1599, "args": argparse.Namespace(model="convmae_convvit_base_patch16")}, path)
    loaded = load_official_convmae(path)
    m = tiny_convmae(32)
    m.load_state_dict(loaded, strict=True)
    for k, v in state.items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)
    assert torch.isfinite(m(torch.randn(1, 3, 32, 32)).loss)
    # and through the public entry point (openmae.interop reads official files)
    built = openmae.create_model("convmae_tiny_patch16", pretrained=str(path), **ENCODER, **DECODER)
    for k, v in state.items():
        torch.testing.assert_close(built.state_dict()[k], v, rtol=0, atol=0)
    # a bare state dict works too, and the encoder feeds the backbone
    torch.save(state, tmp_path / "bare.pth")
    assert load_official_convmae(tmp_path / "bare.pth").keys() == state.keys()
    missing, _ = tiny_convvit(32, num_classes=2).load_state_dict(loaded, strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_official_loader_rejects_other_files(tmp_path):
    torch.save({"model": {"w": [1, 2, 3]}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_official_convmae(tmp_path / "x.pth")


def test_save_and_load_pretrained_round_trip(tmp_path):
    m = tiny_convmae(48, norm_pix_loss=True, mask_type="block")
    openmae.save_pretrained(m, tmp_path / "m.safetensors")
    back = openmae.load_pretrained(tmp_path / "m.safetensors")
    assert isinstance(back, ConvMAE) and back.config == m.config and back.arch == m.arch
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(back.encode(x), m.encode(x))
    again = openmae.create_model("convmae_tiny_patch16", pretrained=str(tmp_path / "m.safetensors"), **m.config)
    torch.testing.assert_close(again.encode(x), m.encode(x))


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_convmae(40)
    with pytest.raises(ValueError, match="one value per stage"):
        tiny_convmae(32, embed_dim=(16, 32))
    m = tiny_convmae(32)
    with pytest.raises(ValueError, match="img_size=\\(64, 64\\)"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="global_blocks"):
        tiny_convvit(32, window_size=1, global_blocks=(5,))
