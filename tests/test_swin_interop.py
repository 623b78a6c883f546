"""Swin weights in and out: the official Swin and SimMIM layouts read into openmae's (timm's) names,
the architecture read from shapes, and what cannot be inferred said."""

import re

import torch

import openmae
from openmae.interop import inspect_checkpoint

SHRINK = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def official_swin(state: dict) -> dict:
    """timm's names -> microsoft/Swin-Transformer's: merging at the end of the previous stage, head.*,
    and the buffers the official code saves."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    return out


def test_official_swin_classifier_loads_with_its_shapes(tmp_path):
    model = randomise(openmae.create_model("swin_micro_patch4_window7", **SHRINK, in_chans=3, num_classes=5))
    torch.save({"model": official_swin(model.state_dict())}, tmp_path / "swin.pth")
    info = inspect_checkpoint(tmp_path / "swin.pth")
    assert info["arch"] == "swin_micro_patch4_window7" and info["num_classes"] == 5
    loaded = openmae.load_pretrained(tmp_path / "swin.pth").eval()
    assert loaded.config["depths"] == [2, 2] and loaded.config["num_heads"] == [1, 2]
    assert loaded.config["window_size"] == 4 and loaded.num_classes == 5
    assert loaded.load_report.missing == []
    assert any("img_size" in n for n in loaded.load_report.notes)  # 4 x 4 x 2 = 32 assumed, and said
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_official_simmim_loads_as_the_pretraining_model(tmp_path):
    model = randomise(openmae.create_model("simmim_swin_micro_patch4_window7", **SHRINK, in_chans=3))
    state = {}
    for k, v in model.state_dict().items():  # SimMIM nests the encoder and names its head decoder.0
        state[k.replace("decoder_pred.", "decoder.0.") if k.startswith("decoder_pred.") else "encoder." + k] = v
    torch.save({"model": state, "epoch": 99}, tmp_path / "simmim.pth")
    loaded = openmae.load_pretrained(tmp_path / "simmim.pth").eval()
    assert loaded.arch == "simmim_swin_micro_patch4_window7" and loaded.load_report.missing == []
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, loaded.num_patches, dtype=torch.bool)
    mask[:, ::2] = True
    torch.testing.assert_close(loaded(x, mask=mask).pred, model(x, mask=mask).pred, rtol=0, atol=0)
    # its encoder is a Swin classifier's: the protocols build one from the same file
    clf = openmae.create_model("swin_micro_patch4_window7", pretrained=str(tmp_path / "simmim.pth"), **SHRINK,
                               in_chans=3, num_classes=0)
    assert set(clf.load_report.missing) == set()
