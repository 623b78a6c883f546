"""Swin Transformer weights: timm's names (openmae's own), official Swin and SimMIM checkpoints.

openmae's Swin models keep timm's parameter names (``patch_embed.*``, ``layers.S.blocks.B.*``,
``layers.S.downsample.*``, ``norm.*``, ``head.fc.*``); SimMIM adds ``mask_token`` and the pixel
head ``decoder_pred``. Two other layouts carry the same tensors:

- official Swin (microsoft/Swin-Transformer) puts each stage's patch merging at the *end* of the
  stage (``layers.0.downsample`` exists; timm starts stage 1 with it), names the classifier
  ``head.*`` and saves the ``relative_position_index`` / ``attn_mask`` buffers;
- official SimMIM nests the encoder under ``encoder.`` and names its 1x1-conv head ``decoder.0``.

:func:`to_openmae_names` maps both to timm's names; :func:`infer_swin_config` reads the
architecture from tensor shapes (a Swin file records no image size: it is taken as the smallest
that fills every stage's window, ``patch x window x 2^(stages-1)``, 224 for the paper's models).
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
BUFFERS = ("relative_position_index", "attn_mask")  # recomputed from the shapes, never trained


def is_swin_state(keys: Any) -> bool:
    """Swin tensor names, in any of the three layouts."""
    return any(_BLOCK.match(k.removeprefix("encoder.")) for k in keys)


def to_openmae_names(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(the tensors under timm's / openmae's Swin names, notes on what was renamed)."""
    notes = []
    if any(k.startswith("encoder.") for k in state):  # official SimMIM
        state = {
            ("decoder_pred." + k[len("decoder.0.") :] if k.startswith("decoder.0.") else k.removeprefix("encoder.")): v
            for k, v in state.items()
        }
        notes.append("official SimMIM layout (encoder.*, decoder.0.*) read under openmae's names")
    state = {k: v for k, v in state.items() if not k.endswith(BUFFERS)}
    if "layers.0.downsample.reduction.weight" in state:  # official Swin: merging at the end of a stage
        shifted = {}
        for k, v in state.items():
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            shifted["head.fc." + k[len("head.") :] if k.startswith("head.") else k] = v
        state = shifted
        notes.append("official Swin layout (patch merging at the end of each stage) read under timm's names")
    return state, notes


def _shape(state: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    t = state.get(key)
    if t is None:
        raise ValueError(f"Swin weights without {key}: not a Swin checkpoint openmae reads")
    if t.dim() != ndim or 0 in t.shape:
        raise ValueError(f"{key} has shape {tuple(t.shape)}, where a {ndim}-D tensor with no empty dimension belongs")
    return tuple(int(n) for n in t.shape)


def infer_swin_config(state: dict[str, Tensor]) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments implied by the shapes of a Swin state dict in timm's names."""
    dim, chans, patch, _ = _shape(state, "patch_embed.proj.weight", 4)  # (D, C, p, p)
    depths: dict[int, int] = {}
    for k in state:
        if m := _BLOCK.match(k):
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    stages = max(depths) + 1
    heads, window = [], 7
    for s in range(stages):
        key = f"layers.{s}.blocks.0.attn.relative_position_bias_table"  # ((2w-1)^2, heads)
        if key not in state:
            raise ValueError(f"Swin stage {s} has no relative_position_bias_table: not a Swin checkpoint openmae reads")
        rows, n_heads = _shape(state, key, 2)
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise ValueError(f"{key} has {rows} rows, not (2 x window - 1)^2 for any window")
        heads.append(n_heads)
        window = (side + 1) // 2
    cfg: dict[str, Any] = {
        "patch_size": patch,
        "in_chans": chans,
        "embed_dim": dim,
        "depths": [depths.get(s, 0) for s in range(stages)],
        "num_heads": heads,
        "window_size": window,
        "img_size": patch * window * 2 ** (stages - 1),
    }
    fc1 = state.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.dim() == 2:
        cfg["mlp_ratio"] = fc1.shape[0] / dim
    notes = [f"img_size is not recorded in Swin weights; assumed {cfg['img_size']} (override with img_size=...)"]
    return cfg, notes
