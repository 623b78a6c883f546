"""ConvViT: ConvMAE's encoder for fine-tuning, as a classifier and a multi-scale backbone for dense
prediction (``forward_features`` / ``forward_head`` / ``forward_pyramid``).

It shares ConvMAE's trunk (:class:`openmae.models.convmae.ConvViTEncoder`) and parameter names, so
a ConvMAE's encoder weights load into it. For detection at high resolution, stage 3 can attend
within (shifted) windows, as ViTDet / Swin: the token grid is padded to a multiple of the window,
optionally rolled, cut into windows that run as a batch through the shared transformer block with
an attention mask (:func:`window_attention_mask`), and put back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from openmae.models.convmae import ENCODER_SIZES, PATCH_SIZE, STAGE_STRIDES, ConvViTEncoder
from openmae.models.vit import init_weights, model_config
from openmae.registry import register_variant

# Constructor arguments of ConvMAE with no place in ConvViT; its factories drop them, so that
# ``create_model("convvit_base_patch16", **convmae.config)`` builds the pretrained model's backbone.
CONVMAE_ONLY_ARGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_type")


# -- (shifted-)window attention ---------------------------------------------------------------------


def padded_grid(grid: tuple[int, int], window: int) -> tuple[int, int]:
    """``grid`` rounded up to a multiple of ``window`` on each side."""
    return math.ceil(grid[0] / window) * window, math.ceil(grid[1] / window) * window


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's rule: the last block of each quarter of the stage keeps global attention."""
    return tuple(sorted({max(0, (i + 1) * depth // 4 - 1) for i in range(4)})) if depth else ()


def window_attention_mask(grid: tuple[int, int], window: int, shift: int) -> Tensor | None:
    """Which tokens of a window may attend to which, for windows on a padded, cyclically shifted grid.

    The grid is padded at the bottom/right to a multiple of ``window`` and rolled by ``-shift``
    (Swin). Two tokens of one window may attend to each other only if both are real (not padding)
    and they were neighbours before the roll (neither or both wrapped around, per axis).

    Returns:
        (num_windows, window**2, window**2) bool, True = may attend; windows in row-major order.
        None when every window is plain (no padding, no shift), so attention needs no mask.
    """
    gh, gw = grid
    hp, wp = padded_grid(grid, window)
    if shift == 0 and (hp, wp) == (gh, gw):
        return None

    def labels(size: int, padded: int) -> Tensor:  # 0 interior, 1 wraps around, 2 padding
        pos = torch.arange(padded)
        return torch.where(pos >= size, 2, (pos < shift).long())

    lab = labels(gh, hp).reshape(-1, 1) * 3 + labels(gw, wp).reshape(1, -1)  # (hp, wp)
    lab = torch.roll(lab, shifts=(-shift, -shift), dims=(0, 1))
    lab = lab.reshape(hp // window, window, wp // window, window).transpose(1, 2).reshape(-1, window * window)
    return lab.unsqueeze(2) == lab.unsqueeze(1)


def window_partition(x: Tensor, grid: tuple[int, int], window: int, shift: int) -> Tensor:
    """Cut tokens into windows: pad the grid at the bottom/right, roll it by ``-shift``, split.

    Args:
        x: (N, L, D) tokens, row-major on ``grid``.
    Returns:
        (N * nW, window**2, D): the windows of one image contiguous and in row-major order (the
        order of :func:`window_attention_mask`), the tokens of a window row-major.
    """
    n, _, d = x.shape
    gh, gw = grid
    hp, wp = padded_grid(grid, window)
    x = F.pad(x.reshape(n, gh, gw, d), (0, 0, 0, wp - gw, 0, hp - gh))  # (N, hp, wp, D)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    x = x.reshape(n, hp // window, window, wp // window, window, d).transpose(2, 3)  # (N, nh, nw, w, w, D)
    return x.reshape(-1, window * window, d)


def window_merge(windows: Tensor, grid: tuple[int, int], window: int, shift: int) -> Tensor:
    """Undo :func:`window_partition`: (N * nW, window**2, D) -> (N, L, D), padding dropped."""
    d = windows.shape[-1]
    gh, gw = grid
    hp, wp = padded_grid(grid, window)
    nh, nw = hp // window, wp // window
    x = windows.reshape(-1, nh, nw, window, window, d).transpose(2, 3).reshape(-1, hp, wp, d)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :gh, :gw].reshape(-1, gh * gw, d)


# -- the classifier / backbone ----------------------------------------------------------------------


class ConvViT(ConvViTEncoder):
    """ConvMAE's encoder for fine-tuning: a classifier and a multi-scale backbone.

    As in the official fine-tuning model, there is no multi-scale fusion and no final norm: the
    classifier averages the stage-3 tokens and applies ``fc_norm``. Its readout takes the same
    arguments as :class:`openmae.models.classifier.VisionTransformer`'s, so the evaluation
    protocols build either one. So ConvMAE weights load with
    ``load_state_dict(strict=False)``, reporting as unexpected only the pretraining-only keys
    (``decoder_*``, ``mask_token``, ``stage1_output_decode``, ``stage2_output_decode``, ``norm``)
    and as missing only ``fc_norm`` and ``head``.

    Args (beyond :class:`ConvViTEncoder`):
        num_classes: classes of the linear head; 0 makes ``head`` an identity.
        global_pool: ``avg`` only (the mean of the stage-3 tokens): there is no cls token.
        fc_norm: LayerNorm on the pooled feature; None: on (the official fine-tuning).
        head_norm: BatchNorm without affine before the linear head (linear probing; ``head.0`` /
            ``head.1``, the layout of the ViT classifier's probe).
        window_size: 0 for global attention everywhere; otherwise stage-3 blocks not listed in
            ``global_blocks`` attend within window_size x window_size windows (the grid is padded
            to a multiple), as ConvMAE does for detection at high resolution.
        global_blocks: stage-3 blocks that keep global attention; default ViTDet's (the last of
            each quarter). The official ConvMAE detector uses (0, 4, 8, 10) for depth 11.
        shifted_windows: shift every second windowed block by window_size // 2 (Swin).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float | Sequence[float] = 4.0,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        fc_norm: bool | None = None,
        head_norm: bool = False,
        window_size: int = 0,
        global_blocks: Sequence[int] | None = None,
        shifted_windows: bool = False,
        attn_impl: str = "auto",
    ):
        config = model_config(locals())
        super().__init__(
            img_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps, drop_path_rate, attn_impl
        )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool != "avg":
            raise ValueError(
                f"ConvViT has no cls token, so global_pool must be 'avg' (pass --pool avg), got {global_pool!r}"
            )
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention), got {window_size}")
        self.config = config
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.use_fc_norm = fc_norm is None or fc_norm
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=norm_eps) if self.use_fc_norm else nn.Identity()
        self.head = nn.Identity()
        if num_classes:
            linear = nn.Linear(self.embed_dim, num_classes)
            bn = nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6)
            self.head = nn.Sequential(bn, linear) if head_norm else linear

        # per stage-3 block: None for global attention, else the window shift
        depth3 = len(self.blocks3)
        self.window_size = window_size
        self.block_shifts: list[int | None] = [None] * depth3
        if window_size:
            keep_global = set(default_global_blocks(depth3) if global_blocks is None else global_blocks)
            if any(not 0 <= i < depth3 for i in keep_global):
                raise ValueError(f"global_blocks must index the {depth3} stage-3 blocks, got {sorted(keep_global)}")
            windowed = [i for i in range(depth3) if i not in keep_global]
            for k, i in enumerate(windowed):
                self.block_shifts[i] = window_size // 2 if shifted_windows and k % 2 else 0
        # non-persistent: derived from the grid, so checkpoints stay in the official layout
        for shift in {s for s in self.block_shifts if s is not None}:
            self.register_buffer(
                f"window_mask_{shift}", window_attention_mask(self.grid_size, window_size, shift), persistent=False
            )
        d1, d2, d3 = self.embed_dims
        self.pyramid_channels = {"E1": d1, "E2": d2, "E3": d3, "E4": d3}
        s1, s2, s3 = STAGE_STRIDES
        self.pyramid_strides = {"E1": s1, "E2": s1 * s2, "E3": PATCH_SIZE, "E4": 2 * PATCH_SIZE}
        self.apply(init_weights)
        self.init_encoder_weights()

    def forward_transformer(self, x: Tensor) -> Tensor:
        """Stage 3 on all tokens: (N, L, D3) -> (N, L, D3), global or windowed per block."""
        for blk, shift in zip(self.blocks3, self.block_shifts):
            if shift is None:
                x = blk(x)
                continue
            windows = window_partition(x, self.grid_size, self.window_size, shift)  # (N * nW, w*w, D3)
            mask = getattr(self, f"window_mask_{shift}")  # (nW, w*w, w*w) or None
            if mask is not None:
                mask = mask.repeat(x.shape[0], 1, 1).unsqueeze(1)  # (N * nW, 1, w*w, w*w)
            x = window_merge(blk(windows, attn_mask=mask), self.grid_size, self.window_size, shift)
        return x

    def tunable_blocks(self) -> list[nn.Module]:
        """The blocks partial fine-tuning (``--tune-blocks K``) counts from the end: stage 3's
        transformer blocks (the conv stages stay frozen unless everything is tuned)."""
        return list(self.blocks3)

    def readout_modules(self) -> list[nn.Module]:
        """What reads the blocks' output: the pooled-feature norm and the head (there is no final norm)."""
        return [self.fc_norm, self.head]

    def forward_features(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, D3) stage-3 tokens, row-major, before any norm."""
        x = self.forward_conv_stages(images)[2]
        return self.forward_transformer(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, L, D3) tokens -> (N, num_classes) logits (or the pooled, normalised (N, D3) features)."""
        x = self.fc_norm(x.mean(dim=1))  # global average pool: there is no cls token
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_pyramid(self, images: Tensor) -> dict[str, Tensor]:
        """Multi-scale maps for dense prediction (Mask R-CNN / UperNet necks).

        Returns:
            {"E1": (N, D1, H/4, W/4), "E2": (N, D2, H/8, W/8), "E3": (N, D3, H/16, W/16),
            "E4": (N, D3, ceil(H/32), ceil(W/32))}, E4 a 2 x 2 max-pool of E3.
        """
        e1, e2, x = self.forward_conv_stages(images)
        x = self.forward_transformer(x)
        n, _, d = x.shape
        e3 = x.transpose(1, 2).reshape(n, d, *self.grid_size)
        e4 = F.max_pool2d(e3, kernel_size=2, ceil_mode=True)  # ceil: odd grids keep their border
        return {"E1": e1, "E2": e2, "E3": e3, "E4": e4}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for timm's layer-wise lr decay, as the official ConvMAE fine-tuning: the patch
        embeddings, positions and both conv stages form layer 0, stage-3 block i is layer i + 1,
        ``fc_norm`` and ``head`` the top."""
        return {"stem": r"^pos_embed|^patch_embed|^blocks[12]\.", "blocks": [(r"^blocks3\.(\d+)", None)]}


# -- registered variants ----------------------------------------------------------------------------

for _size, _encoder in ENCODER_SIZES.items():
    register_variant(ConvViT, f"convvit_{_size}_patch16", ignore=CONVMAE_ONLY_ARGS, **_encoder)
