import math

import pytest
import torch

from openmae.patches import patchify, sincos_2d, unpatchify


@pytest.mark.parametrize("c,h,w,p", [(3, 32, 32, 8), (1, 28, 28, 4), (4, 16, 48, 8), (2, 30, 20, 10)])
def test_patchify_round_trip(c, h, w, p):
    x = torch.randn(2, c, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), c), x)


def test_patch_layout_row_col_channel():
    # patch (h, w) holds pixels [hp:(h+1)p, wp:(w+1)p] flattened as (row, col, channel)
    p, c = 4, 3
    x = torch.randn(1, c, 8, 12)
    patches = patchify(x, p)
    gh, gw = 1, 2
    expected = x[0, :, gh * p : (gh + 1) * p, gw * p : (gw + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, gh * 3 + gw], expected)


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 16)


def test_sincos_official_layout():
    dim, gh, gw = 16, 3, 5
    emb = sincos_2d(dim, (gh, gw), cls_token=True)
    assert emb.shape == (1 + gh * gw, dim)
    assert torch.all(emb[0] == 0)
    r, c = 2, 4
    row = emb[1 + r * gw + c]
    q = dim // 4
    omega = [1 / 10000 ** (i / q) for i in range(q)]
    expect = [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
    expect += [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
    assert torch.allclose(row, torch.tensor(expect), atol=1e-6)
