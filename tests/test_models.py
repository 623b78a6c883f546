import pytest
import torch

import openmae
from openmae.models.mae import MaskedAutoencoder
from openmae.models.vit import Block
from tests.conftest import tiny_overrides

MAE_MODELS = openmae.list_models("mae_vit")


def test_registry_lists_paper_variants():
    for name in ["mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]:
        assert name in openmae.list_models()
    with pytest.raises(ValueError, match="did you mean"):
        openmae.create_model("mae_vit_bse_patch16")


def test_paper_defaults():
    m = openmae.create_model("mae_vit_base_patch16")
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (768, 12, 12)
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16
    assert m.blocks[0].norm1.eps == 1e-6
    n = sum(p.numel() for k, p in m.named_parameters() if not k.startswith(("decoder", "mask_token")))
    assert 85_000_000 < n < 87_000_000  # ViT-B encoder: 86M


@pytest.mark.parametrize("name", MAE_MODELS)
@pytest.mark.parametrize("variant", ["plain", "norm_pix", "mask_token_in_encoder"])
def test_forward_backward_every_model(name, variant):
    kw = tiny_overrides(name)
    kw.update(in_chans=3)
    if variant == "norm_pix":
        kw["norm_pix_loss"] = True
    if variant == "mask_token_in_encoder":
        kw["mask_token_in_encoder"] = True
    model = openmae.create_model(name, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    out = model(x, mask_ratio=0.75)
    p = model.patch_size
    assert out.pred.shape == (2, model.num_patches, p * p * 3)
    assert out.mask.shape == (2, model.num_patches)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [q.grad for q in model.parameters() if q.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None  # fixed sin-cos table


def test_official_parameter_names():
    m = openmae.create_model("mae_vit_tiny_patch16", **tiny_overrides("mae_vit_tiny_patch16"))
    keys = set(m.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.bias", "blocks.1.mlp.fc2.weight", "norm.weight", "decoder_embed.weight", "mask_token",
              "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight", "decoder_norm.bias", "decoder_pred.weight"]:
        assert k in keys


def test_encoder_is_timm_vit_state_dict():
    timm = pytest.importorskip("timm")
    m = openmae.create_model("mae_vit_tiny_patch16", **tiny_overrides("mae_vit_tiny_patch16"))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    enc = {k: v for k, v in m.state_dict().items() if k in vit.state_dict()}
    assert set(enc) == set(vit.state_dict())
    vit.load_state_dict(enc)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.forward_features(x), m.encode(x), atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_block_attention_mask(attn_impl):
    blk = Block(32, 4, attn_impl=attn_impl).eval()
    x = torch.randn(2, 6, 32)
    groups = torch.tensor([0, 1, 0, 0, 1, 1])
    allowed = groups.unsqueeze(1) == groups.unsqueeze(0)  # (T, T): attend within the own group only
    with torch.no_grad():
        masked = blk(x, attn_mask=allowed)
        for g in (0, 1):  # the same as running each group as a sequence of its own
            torch.testing.assert_close(masked[:, groups == g], blk(x[:, groups == g]))
        # a mask that allows everything changes nothing; per-image masks broadcast over heads
        torch.testing.assert_close(blk(x, attn_mask=torch.ones(6, 6, dtype=torch.bool)), blk(x))
        per_image = torch.stack([allowed, torch.ones_like(allowed)]).unsqueeze(1)  # (B, 1, T, T)
        both = blk(x, attn_mask=per_image)
        torch.testing.assert_close(both[0], masked[0])
        torch.testing.assert_close(both[1], blk(x)[1])


def test_noise_convention_and_explicit_mask():
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=16)  # 16 patches
    x = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, 16)
    a = m(x, mask_ratio=0.75, noise=noise)
    b = m(x, mask_ratio=0.75, noise=noise)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
    kept = noise.argsort(1)[:, :4]
    assert torch.all(torch.gather(a.mask, 1, kept) == 0)
    # an explicit mask gives the same result as the noise that keeps the same patches
    c = m(x, mask=a.mask.bool())
    assert torch.allclose(c.loss, a.loss, atol=1e-6)
    # mask_ratio is per call
    d = m(x, mask_ratio=0.5)
    assert torch.all(d.mask.sum(1) == 8)


def test_encode_is_deterministic_and_ordered():
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=16).eval()
    x = torch.randn(3, 1, 16, 16)
    f1, f2 = m.encode(x), m.encode(x)
    assert f1.shape == (3, 17, 192) and torch.equal(f1, f2)
    # with nothing masked, the encoder's visible tokens are the ordered patch tokens
    latent, _, _ = m.forward_encoder(x, mask=torch.zeros(3, 16, dtype=torch.bool))
    assert torch.allclose(latent, f1, atol=1e-6)


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        openmae.create_model("mae_vit_base_patch16", img_size=100)
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=16)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 16, 16\)"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected images of shape"):
        m(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.randn(1, 1, 16, 16), mask_ratio=1.0)


@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_model_mask_types(mask_type):
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=32, mask_type=mask_type)
    out = m(torch.randn(2, 1, 32, 32), mask_ratio=0.75)
    assert torch.all(out.mask.sum(1) == 48)


def test_non_square_and_many_channels():
    m = MaskedAutoencoder(img_size=(16, 32), patch_size=8, in_chans=5, embed_dim=32, depth=1, num_heads=2,
                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(2, 5, 16, 32)
    out = m(x)
    assert out.pred.shape == (2, 8, 8 * 8 * 5)
    assert m.unpatchify(m.patchify(x)).shape == x.shape


def test_mask_token_in_encoder_sees_all_tokens():
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=16, mask_token_in_encoder=True)
    latent, mask, _ = m.forward_encoder(torch.randn(2, 1, 16, 16))
    assert latent.shape == (2, 17, 192)
    plain = openmae.create_model("mae_vit_tiny_patch4", img_size=16)
    latent, _, _ = plain.forward_encoder(torch.randn(2, 1, 16, 16))
    assert latent.shape == (2, 5, 192)


def test_save_and_load_pretrained(tmp_path):
    m = openmae.create_model("mae_vit_tiny_patch4", img_size=16, norm_pix_loss=True)
    for path in [tmp_path / "m.safetensors", tmp_path / "dir"]:
        openmae.save_pretrained(m, path)
        m2 = openmae.load_pretrained(path)
        assert m2.norm_pix_loss and m2.img_size == (16, 16)
        for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(a, b), k
    # another image size is fine (the position tables follow the grid); another width is not
    bigger = openmae.create_model("mae_vit_tiny_patch4", img_size=32, pretrained=str(tmp_path / "m.safetensors"))
    assert any(n.startswith("pos_embed resampled from 4x4 to 8x8") for n in bigger.load_report.notes)
    with pytest.raises(ValueError, match="shape mismatch"):
        openmae.create_model("mae_vit_tiny_patch4", embed_dim=96, pretrained=str(tmp_path / "m.safetensors"))
