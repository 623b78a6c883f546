"""Every registered model, shrunk: forward, backward, a safetensors round trip, the classifier its
pretraining config names, and the masking contract of every masked-image model. Plus the registry's
own API (register_variant, arch_of) and the models' place in the dependency order."""

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openmae import registry
from openmae.models import (
    ConvMAE,
    ConvViT,
    MaskedAutoencoder,
    SimMIMSwin,
    SwinClassifier,
    VisionTransformer,
    arch_of,
    create_model,
    list_models,
    model_factory,
)
from openmae.models.classifier import classifier_name
from openmae.models.mae import MAEObjective
from tests.conftest import tiny_overrides

ALL_MODELS = list_models()
# ConvMAE / ConvViT shrunk as tests/test_convmae.py does: 32 px, a 2 x 2 stage-3 grid
CONV_SHRINK = dict(img_size=32, embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=2)
DECODER_SHRINK = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
# Swin / SimMIM shrunk to two stages at 32 px: 8 x 8 and 4 x 4 grids, 4 x 4 windows (the first stage's
# second block shifted), a 4 x 4 mask grid of 8 px cells
SWIN_SHRINK = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
# keys of a pretraining model that its classifier has no place for (the ViT classifier's fc_norm
# replaces the final norm; ConvViT has neither the fusion nor the final norm)
PRETRAINING_ONLY = ("decoder_", "mask_token", "norm.", "stage1_output_decode.", "stage2_output_decode.")


def shrink(name: str) -> dict:
    """Overrides that shrink a registered model, keeping its family and patch size. Classifiers
    take their pretraining model's overrides: their factories drop the decoder's arguments."""
    if name.startswith("conv"):
        return {**CONV_SHRINK, **DECODER_SHRINK}
    if name.startswith(("swin_", "simmim_swin_")):
        return dict(SWIN_SHRINK)
    return tiny_overrides(name)


def build(name: str, **extra) -> torch.nn.Module:
    return create_model(name, **shrink(name), **extra)


def is_masked_image(name: str) -> bool:
    return issubclass(type(build(name)), MAEObjective)


MASKED_IMAGE_MODELS = [n for n in ALL_MODELS if is_masked_image(n)]
# every masked-image model, and MAE's Table 1c variant (mask tokens in the encoder)
MASKED_IMAGE_CASES = [pytest.param(n, {}, id=n) for n in MASKED_IMAGE_MODELS] + [
    pytest.param(n, {"mask_token_in_encoder": True}, id=f"{n}-mask_token_in_encoder")
    for n in MASKED_IMAGE_MODELS
    if n.startswith("mae_")
]


def images_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *model.img_size)


def fixed_mask(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    """(N, L) bool, True = removed: half the patches of each row, a different half per row."""
    g = torch.Generator().manual_seed(3)
    length = model.num_patches
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(length, generator=g)[: length // 2]] = True
    return mask


def outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a model computes from ``images``, deterministically (a fixed mask for masked-image models)."""
    if isinstance(model, MAEObjective):
        out = model(images, mask=fixed_mask(model, images.shape[0]))
        return {"pred": out.pred, "loss": out.loss}
    return {"logits": model(images)}


# -- every registered model -------------------------------------------------------------------------


def test_every_family_is_covered():
    families = {type(build(n)) for n in ALL_MODELS}
    assert families == {MaskedAutoencoder, ConvMAE, ConvViT, VisionTransformer, SimMIMSwin, SwinClassifier}
    pretraining = ("mae_vit_", "convmae_", "simmim_swin_")
    assert len(MASKED_IMAGE_MODELS) == sum(len(list_models(prefix)) for prefix in pretraining)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_finite(name):
    model = build(name).train()
    assert model.arch == name and arch_of(model) == name
    out = outputs(model, images_for(model))
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    loss = out["loss"] if "loss" in out else out["logits"].logsumexp(1).mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:  # every trainable parameter takes part (DDP needs no unused ones)
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ALL_MODELS)
def test_safetensors_round_trip_is_exact(name, tmp_path):
    model = build(name).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    back = create_model(arch_of(model), **model.config).eval()
    back.load_state_dict(load_file(str(path)), strict=True)
    assert type(back) is type(model) and back.config == model.config
    images = images_for(model)
    with torch.no_grad():
        expected, got = outputs(model, images), outputs(back, images)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("name", MASKED_IMAGE_MODELS)
def test_pretraining_config_builds_its_classifier(name):
    model = build(name)
    clf_name = classifier_name(name)
    assert clf_name is not None and clf_name != name
    clf = create_model(clf_name, **model.config)  # the decoder's arguments are dropped
    assert clf.arch == clf_name and tuple(clf.img_size) == tuple(model.img_size)
    missing, unexpected = clf.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith(("fc_norm.", "head.")) for k in missing), missing
    assert unexpected and all(k.startswith(PRETRAINING_ONLY) for k in unexpected), unexpected
    # every encoder weight arrived
    encoder = {k for k in model.state_dict() if not k.startswith(PRETRAINING_ONLY)}
    assert encoder and encoder <= set(clf.state_dict())
    for k in encoder:
        assert torch.equal(clf.state_dict()[k], model.state_dict()[k]), k
    with torch.no_grad():
        assert torch.isfinite(clf.eval()(images_for(clf))).all()


# -- the masking contract ---------------------------------------------------------------------------


def pixel_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, H, W) bool, True inside removed patches."""
    p = model.patch_size
    return mask.reshape(-1, 1, *model.grid_size).repeat_interleave(p, 2).repeat_interleave(p, 3)


@pytest.mark.parametrize("name, extra", MASKED_IMAGE_CASES)
def test_prediction_sees_visible_pixels_only(name, extra):
    # norm_pix_loss: the loss's target reads the removed pixels, the prediction must not
    model = build(name, norm_pix_loss=True, **extra).eval()
    images = images_for(model)
    mask = fixed_mask(model)
    removed = pixel_mask(model, mask)
    changed_removed = torch.where(removed, 10 * torch.randn_like(images), images)
    first_visible = int((~mask[0]).nonzero()[0])
    visible_patch = pixel_mask(model, torch.arange(model.num_patches).eq(first_visible).expand_as(mask))
    changed_visible = torch.where(visible_patch, torch.randn_like(images), images)
    with torch.no_grad():
        out = model(images, mask=mask)
        out_removed = model(changed_removed, mask=mask)
        out_visible = model(changed_visible, mask=mask)
    torch.testing.assert_close(out_removed.pred, out.pred, rtol=0, atol=1e-6)
    assert out_removed.loss != out.loss  # control: the target did change
    assert (out_visible.pred[0] - out.pred[0]).abs().amax() > 1e-3


# -- the registry's API -----------------------------------------------------------------------------


def _rebuilt_outputs_match(model: torch.nn.Module) -> torch.nn.Module:
    rebuilt = create_model(arch_of(model), **model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = images_for(model.eval())
    with torch.no_grad():
        expected, got = outputs(model, images), outputs(rebuilt, images)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    return rebuilt


def test_class_built_models_have_an_arch():
    mae = MaskedAutoencoder(
        img_size=(16, 24), patch_size=4, in_chans=2, embed_dim=32, depth=2, num_heads=2, **DECODER_SHRINK,
        norm_pix_loss=True,
    )
    assert not hasattr(mae, "arch") and arch_of(mae) in list_models("mae_vit_")
    rebuilt = _rebuilt_outputs_match(mae)
    assert isinstance(rebuilt, MaskedAutoencoder) and rebuilt.config == mae.config

    vit = ConvViT(**CONV_SHRINK, num_classes=3, window_size=1, shifted_windows=True, head_norm=True)
    assert arch_of(vit) in list_models("convvit_")
    rebuilt = _rebuilt_outputs_match(vit)
    assert isinstance(rebuilt, ConvViT) and rebuilt.block_shifts == vit.block_shifts


def test_arch_of_prefers_the_name_a_model_was_built_under():
    model = build("mae_vit_base_patch16")  # not the first MaskedAutoencoder registered
    assert model.arch == arch_of(model) == "mae_vit_base_patch16"


def test_arch_of_refuses_unregistered_classes():
    class Unregistered(MaskedAutoencoder):
        pass

    with pytest.raises(ValueError, match="Unregistered is not a registered model class"):
        arch_of(Unregistered(**tiny_overrides("mae_vit_tiny_patch16")))
    with pytest.raises(ValueError, match="not a registered model class"):
        arch_of(torch.nn.Linear(2, 2))


def test_register_variant_factories():
    factory = model_factory("vit_base_patch16")
    assert factory.defaults == dict(embed_dim=768, depth=12, num_heads=12)
    assert factory.__doc__.startswith("VisionTransformer vit_base_patch16: embed_dim=768")
    # the classifier's factory drops an MAE's decoder arguments
    clf = create_model("vit_tiny_patch4", img_size=16, decoder_depth=3, norm_pix_loss=True)
    assert "decoder_depth" not in clf.config
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_variant(MaskedAutoencoder, "mae_vit_base_patch16")
    with pytest.raises(ValueError, match="did you mean"):
        create_model("mae_vit_bse_patch16")


def _openmae_imports(path: Path) -> set[str]:
    """Every openmae module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] if node.module != "openmae" else [f"openmae.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        found |= {m for m in modules if m == "openmae" or m.startswith("openmae.")}
    return found


def test_registry_is_a_leaf_and_models_import_only_leaves():
    package = Path(registry.__file__).parent
    assert _openmae_imports(package / "registry.py") == set()
    allowed = ("openmae.registry", "openmae.patches", "openmae.masking", "openmae.models")
    for path in sorted((package / "models").glob("*.py")):
        above = {m for m in _openmae_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not above, (path.name, above)
