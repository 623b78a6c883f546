import os

import pytest
import torch

# two cores: keep intra-op threads bounded and results reproducible
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# shrunk sizes so every registered architecture runs in milliseconds
TINY = dict(
    img_size=32,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def tiny_overrides(name: str) -> dict:
    """Overrides that shrink a registered model while keeping its family and patch size."""

    kw = dict(TINY)
    if "patch14" in name:
        kw["img_size"] = 28
    if "patch4" in name:
        kw["img_size"] = 16
    return kw
