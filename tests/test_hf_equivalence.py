"""openmae's MaskedAutoencoder against transformers' ViTMAEForPreTraining.

Same weights and the same noise must give the same loss, prediction, mask and encoder features
(fp32, 1e-5 relative), for both key namings (transformers 4 on the hub, 5 in memory), both
LayerNorm eps values (HF's 1e-12, the official 1e-6), with and without norm_pix_loss. Models are
built from small random configs; nothing is downloaded.

transformers 5 leaves position embeddings at zero when it builds a model from a config, so the
tests set them deliberately: random (to test the mapping) or openmae's sin-cos tables.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

import openmae
from openmae.interop import hf
from openmae.patches import sincos_2d

transformers = pytest.importorskip("transformers")
ViTMAEConfig, ViTMAEForPreTraining = transformers.ViTMAEConfig, transformers.ViTMAEForPreTraining

IMG, PATCH, CHANS = 16, 4, 3
GRID = IMG // PATCH


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread is fastest, and unaffected by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(eps: float = 1e-12, norm_pix: bool = False, mask_ratio: float = 0.75, **kw) -> ViTMAEConfig:
    args = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=IMG,
        patch_size=PATCH,
        num_channels=CHANS,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=96,
        layer_norm_eps=eps,
        norm_pix_loss=norm_pix,
        mask_ratio=mask_ratio,
    )
    return ViTMAEConfig(**{**args, **kw})


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Every floating tensor (LayerNorms, biases, tokens, position tables) to seeded random values."""
    g = torch.Generator().manual_seed(seed)
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def v4_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 names -> the transformers-4 names of the files on the hub (written out here,
    independently of openmae's converter)."""
    subs = [
        (r"^vit\.layers\.", "vit.encoder.layer."),
        (r"attention\.q_proj", "attention.attention.query"),
        (r"attention\.k_proj", "attention.attention.key"),
        (r"attention\.v_proj", "attention.attention.value"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in subs:
            key = re.sub(pattern, repl, key)
        out[key] = value.contiguous()
    return out


def write_hf_dir(model: ViTMAEForPreTraining, folder, style: str) -> None:
    """``v5``: the in-memory names; ``v4``: hub names; ``saved``: transformers' own save_pretrained."""
    if style == "saved":
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(v4_names(state) if style == "v4" else state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(scale))


def inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, CHANS, IMG, IMG, generator=g), torch.rand(2, GRID * GRID, generator=g)


def compare(om: torch.nn.Module, ref: ViTMAEForPreTraining, mask_ratio: float) -> None:
    x, noise = inputs()
    with torch.no_grad():
        expected = ref(pixel_values=x, noise=noise)
        features = ref.vit(pixel_values=x, noise=noise).last_hidden_state
        got = om(x, mask_ratio=mask_ratio, noise=noise)
        latent, _, _ = om.forward_encoder(x, mask_ratio=mask_ratio, noise=noise)
    assert torch.equal(got.mask, expected.mask)
    assert torch.equal(got.ids_restore, expected.ids_restore)
    assert_rel_close(latent, features)
    assert_rel_close(got.pred, expected.logits)
    assert_rel_close(got.loss, expected.loss)


# every key naming meets both eps values and both targets (pairwise, to keep the suite fast)
CASES = [
    ("v4", 1e-12, False),
    ("v4", 1e-6, True),
    ("v5", 1e-12, True),
    ("v5", 1e-6, False),
    ("saved", 1e-12, False),
    ("saved", 1e-6, True),
]


@pytest.mark.parametrize("style,eps,norm_pix", CASES)
def test_hf_directory_loads_with_same_numerics(tmp_path, style, eps, norm_pix):
    ref = ViTMAEForPreTraining(hf_config(eps, norm_pix)).eval()
    randomise(ref)
    write_hf_dir(ref, tmp_path, style)
    model = openmae.load_pretrained(tmp_path).eval()
    assert model.config["norm_eps"] == eps
    assert model.norm_pix_loss is norm_pix
    assert model.load_report.format == "hf" and model.load_report.missing == []
    compare(model, ref, mask_ratio=0.75)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("key_style", ["v4", "v5"])
def test_openmae_model_matches_transformers(tmp_path, norm_pix, key_style):
    """The foundation test: an openmae model, its weights handed to transformers two ways
    (in memory, and through an exported directory), gives the same loss and prediction."""
    model = openmae.create_model(
        "mae_vit_tiny_patch4",
        img_size=IMG,
        in_chans=CHANS,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=24,
        decoder_depth=2,
        decoder_num_heads=3,
        norm_pix_loss=norm_pix,
    ).eval()
    randomise(model)
    with torch.no_grad():  # position tables back to the fixed sin-cos ones, as trained models have
        model.pos_embed.copy_(sincos_2d(32, (GRID, GRID), cls_token=True).unsqueeze(0))
        model.decoder_pos_embed.copy_(sincos_2d(24, (GRID, GRID), cls_token=True).unsqueeze(0))

    in_memory = ViTMAEForPreTraining(hf_config(1e-6, norm_pix)).eval()
    assert not in_memory.vit.embeddings.position_embeddings.any()  # the trap: zeros, not sin-cos
    state = {k: v.clone() for k, v in model.state_dict().items()}
    v5 = hf.state_to_hf(state, "v5")
    assert set(v5) == set(in_memory.state_dict())
    in_memory.load_state_dict(v5)  # copies the sin-cos tables deliberately
    compare(model, in_memory, mask_ratio=0.75)

    openmae.export_pretrained(model, tmp_path / "hf", format="hf", key_style=key_style)
    loaded = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.layer_norm_eps == 1e-6 and loaded.config.norm_pix_loss is norm_pix
    torch.testing.assert_close(loaded.vit.embeddings.position_embeddings, model.pos_embed)
    torch.testing.assert_close(loaded.decoder.decoder_pos_embed, model.decoder_pos_embed)
    compare(model, loaded, mask_ratio=0.75)


def test_zero_position_embeddings_are_replaced_by_sincos(tmp_path):
    ref = ViTMAEForPreTraining(hf_config(1e-6)).eval()  # built from a config: positions are zeros
    write_hf_dir(ref, tmp_path, "v5")
    model = openmae.load_pretrained(tmp_path)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, (GRID, GRID), cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d(24, (GRID, GRID), cls_token=True))
    assert any("all zeros" in n for n in model.load_report.notes)
    # with the tables set deliberately on the transformers side, the two agree
    with torch.no_grad():
        ref.vit.embeddings.position_embeddings.copy_(model.pos_embed)
        ref.decoder.decoder_pos_embed.copy_(model.decoder_pos_embed)
    compare(model.eval(), ref, mask_ratio=0.75)


def test_sincos_layout_matches_transformers():
    """openmae's table is the one transformers builds for pretrained weights ([sin_w|cos_w|sin_h|cos_h])."""
    mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    build = getattr(mae, "build_2d_sinusoidal_position_embedding", None)
    if build is None:
        pytest.skip("this transformers version has no build_2d_sinusoidal_position_embedding")
    table = build(3, 5, embed_dim=16, cls_token=True)  # [sin_h|cos_h|sin_w|cos_w] before its rotation
    rotated = torch.cat([table[:, 8:], table[:, :8]], dim=1)
    torch.testing.assert_close(sincos_2d(16, (3, 5), cls_token=True), rotated.float())


def test_config_is_honoured(tmp_path):
    """Image size, patch size, channels, widths, MLP sizes, eps, norm-pix and mask ratio."""
    cfg = hf_config(1e-6, True, mask_ratio=0.5, image_size=24, patch_size=6, num_channels=1)
    ref = ViTMAEForPreTraining(cfg).eval()
    randomise(ref)
    write_hf_dir(ref, tmp_path, "v4")
    model = openmae.load_pretrained(tmp_path).eval()
    c = model.config
    assert (c["img_size"], c["patch_size"], c["in_chans"]) == (24, 6, 1)
    assert (c["embed_dim"], c["depth"], c["num_heads"], c["mlp_ratio"]) == (32, 2, 2, 4.0)
    assert (c["decoder_embed_dim"], c["decoder_depth"], c["decoder_num_heads"]) == (24, 2, 3)
    assert c["norm_eps"] == 1e-6 and model.norm_pix_loss
    assert model.load_report.mask_ratio == 0.5
    g = torch.Generator().manual_seed(3)
    x, noise = torch.randn(2, 1, 24, 24, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        expected = ref(pixel_values=x, noise=noise)
        got = model(x, mask_ratio=model.load_report.mask_ratio, noise=noise)
    assert_rel_close(got.loss, expected.loss)
    assert_rel_close(got.pred, expected.logits)


def test_qkv_without_bias_loads_as_zero_biases(tmp_path):
    ref = ViTMAEForPreTraining(hf_config(1e-12, qkv_bias=False)).eval()
    randomise(ref)
    write_hf_dir(ref, tmp_path, "v5")
    model = openmae.load_pretrained(tmp_path).eval()
    assert not model.blocks[0].attn.qkv.bias.any()
    compare(model, ref, mask_ratio=0.75)


def test_mlp_ratio_mismatch_between_encoder_and_decoder_is_refused(tmp_path):
    ref = ViTMAEForPreTraining(hf_config(decoder_intermediate_size=48))
    write_hf_dir(ref, tmp_path, "v5")
    with pytest.raises(ValueError, match="one mlp_ratio"):
        openmae.load_pretrained(tmp_path)


def test_encoder_only_export_is_a_vitmae_model(tmp_path):
    """A model whose decoder was never loaded is exported as transformers' ViTMAEModel (encoder only)."""
    ref = ViTMAEForPreTraining(hf_config(1e-6)).eval()
    randomise(ref)
    ref.vit.save_pretrained(tmp_path / "encoder")  # ViTMAEModel: no decoder, no "vit." prefix
    model = openmae.load_pretrained(tmp_path / "encoder").eval()
    assert not model.load_report.has_decoder
    assert any("no decoder" in n for n in model.load_report.notes)
    openmae.export_pretrained(model, tmp_path / "out", format="hf")
    encoder = transformers.ViTMAEModel.from_pretrained(tmp_path / "out").eval()
    x, noise = inputs()
    with torch.no_grad():
        expected = encoder(pixel_values=x, noise=noise).last_hidden_state
        latent, _, _ = model.forward_encoder(x, mask_ratio=0.75, noise=noise)
    assert_rel_close(latent, expected)
    assert_rel_close(latent, ref.vit(pixel_values=x, noise=noise).last_hidden_state.detach())
