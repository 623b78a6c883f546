"""Swin Transformer (Liu et al., 2021) as a classifier, and SimMIM (Xie et al., 2022) to pretrain it.

The trunk is timm's ``SwinTransformer`` (patch embedding, windowed and shifted-window attention
stages with patch merging, final norm), so the parameter names are timm's (``patch_embed.*``,
``layers.N.*``, ``norm.*``, ``head.fc.*``) and a :class:`SwinClassifier`'s state dict loads into
``timm.create_model("swin_tiny_patch4_window7_224", ...)`` with the same shape arguments, and back.

SimMIM (:class:`SimMIMSwin`): patch-embed the whole image, replace the embeddings of masked patches
by one learned ``mask_token``, run every stage on the whole grid, then a one-layer head (a 1x1 conv
to stride^2 * C channels, then PixelShuffle(stride)) predicts the pixels; the loss is on masked
pixels only. Masks are drawn on a coarse grid whose cell is the encoder's total stride
(``patch_size * 2 ** (stages - 1)``: 32 px for the four-stage models), so the mask grid is the last
stage's grid and every cell covers whole patch-embedding patches. It shares MAE's calling
convention (:class:`openmae.models.mae.MAEObjective`), so the pretraining task and the
reconstruction figures work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor

from openmae.masking import MASK_TYPES
from openmae.models.mae import MAEObjective, MAEOutput
from openmae.models.vit import check_image_shape, check_patch_grid, model_config
from openmae.patches import to_2tuple
from openmae.registry import register_variant

PIXEL_LOSSES = ("l1", "l2")
SIMMIM_MASK_RATIO = 0.6  # the paper's default: 60% of the 32 x 32 cells

# Constructor arguments of SimMIMSwin with no place in SwinClassifier; its factories drop them, so
# that ``create_model("swin_tiny_patch4_window7", **simmim.config)`` builds the pretrained encoder.
SIMMIM_ONLY_ARGS = ("norm_pix_loss", "mask_type", "pixel_loss", "mask_ratio")


class SwinEncoder(SwinTransformer):
    """timm's Swin Transformer with openmae's trunk conventions, shared by the classifier and SimMIM.

    On top of timm: arguments are checked with messages that say how to fix them, images of the wrong
    shape are refused with a ValueError, ``embed_dim`` is the width of the features the model returns
    (timm keeps the stage-1 width under that name; the last stage's is ``2 ** (stages - 1)`` times
    it), and :meth:`encode` gives the final tokens.

    Args:
        img_size: int or (H, W), both divisible by ``patch_size``.
        patch_size: side of the patch-embedding patches (4 in the paper).
        in_chans: image channels (any count, e.g. 1 for grayscale).
        num_classes: outputs of timm's linear head; 0 for none.
        embed_dim: stage-1 width C; stage i is ``C * 2 ** i`` wide.
        depths: Swin blocks per stage; their count is the number of stages.
        num_heads: attention heads per stage.
        window_size: attention window side M (timm shrinks it to a stage's grid when the grid is smaller).
        mlp_ratio: MLP expansion.
        qkv_bias: bias on the query/key/value projection.
        drop_rate, proj_drop_rate, attn_drop_rate: dropout before the head, after projections, on attention.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this rate.
    """

    num_prefix_tokens = 0  # timm's name: no cls token; every token is a patch (for mean pooling)

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        img_size = to_2tuple(img_size)
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        _check_swin_args(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool="avg",
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size if isinstance(window_size, int) else tuple(window_size),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.img_size = img_size
        self.embed_dim = self.num_features  # the last stage's width: what forward_head / encode return

    def forward_features(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, h, w, D) NHWC map of the last stage after the final norm; h = H / s,
        w = W / s with the total stride s = patch_size * 2 ** (stages - 1) (rounded up: timm pads)."""
        check_image_shape(images, self.in_chans, self.img_size)
        return super().forward_features(images)

    def encode(self, images: Tensor) -> Tensor:
        """Deterministic, unmasked features: (N, C, H, W) -> (N, L, D), the last stage's tokens after
        the final norm, row-major. There is no cls token (``num_prefix_tokens = 0``): pool by the mean."""
        return self.forward_features(images).flatten(1, 2)


def _check_swin_args(
    img_size: tuple[int, int],
    patch_size: int,
    in_chans: int,
    num_classes: int,
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
) -> None:
    check_patch_grid(img_size, patch_size, in_chans)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if not depths or len(depths) != len(num_heads):
        raise ValueError(
            f"depths and num_heads need one entry per stage, got depths {list(depths)} and num_heads {list(num_heads)}"
        )
    for i, heads in enumerate(num_heads):
        width = embed_dim * 2**i
        if heads < 1 or width % heads:
            raise ValueError(
                f"stage {i} is {width} wide (embed_dim {embed_dim} * 2^{i}), not divisible by {heads} heads"
            )


# -- the classifier ---------------------------------------------------------------------------------


class SwinClassifier(SwinEncoder):
    """Swin Transformer classifier with openmae's readout interface (that of
    :class:`openmae.models.classifier.VisionTransformer` and ConvViT), for fine-tuning, linear
    probing and feature extraction.

    The readout is timm's: the mean of the last stage's tokens after the final ``norm``, then the
    head ``head.fc``. There is no cls token and no ``fc_norm`` (the final norm already normalises
    every token).

    Args (beyond :class:`SwinEncoder`):
        num_classes: classes of the linear head; 0 makes ``head.fc`` an identity (features out).
        global_pool: ``avg`` only: there is no cls token.
        fc_norm: None or False only: the final ``norm`` takes its place.
        head_norm: BatchNorm1d(affine=False, eps=1e-6) before the linear layer (linear probing):
            ``head.fc`` is then ``Sequential(BatchNorm1d, Linear)``, keys ``head.fc.0.*`` (running
            statistics) and ``head.fc.1.*`` (the linear layer); without it ``head.fc`` is timm's Linear.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        fc_norm: bool | None = None,
        head_norm: bool = False,
    ):
        config = model_config(locals())
        if global_pool != "avg":
            raise ValueError(
                f"Swin has no cls token, so global_pool must be 'avg' (pass --pool avg), got {global_pool!r}"
            )
        if fc_norm:
            raise ValueError(
                "Swin has no fc_norm: its final norm already normalises every token before pooling; "
                "pass fc_norm=None or False"
            )
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.config = config
        self.use_fc_norm = False
        self.head_norm = bool(head_norm) and num_classes > 0
        if self.head_norm:
            linear = nn.Linear(self.embed_dim, num_classes)
            self.head.fc = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), linear)
        self.reset_head()

    @property
    def head_linear(self) -> nn.Linear | None:
        """The head's linear layer (None without a head)."""
        fc = self.head.fc
        if isinstance(fc, nn.Sequential):
            return fc[-1]
        return fc if isinstance(fc, nn.Linear) else None

    def reset_head(self) -> None:
        """Re-initialise the linear head as openmae's ViT classifier does: trunc-normal weight (std
        2e-5, the MAE fine-tuning recipe; 0.01 with ``head_norm``, its linear probe), zero bias."""
        linear = self.head_linear
        if linear is None:
            return
        nn.init.trunc_normal_(linear.weight, std=0.01 if self.head_norm else 2e-5)
        nn.init.zeros_(linear.bias)

    def tunable_blocks(self) -> list[nn.Module]:
        """The blocks partial fine-tuning (``--tune-blocks K``) counts from the end: every Swin block of
        every stage, in order. The patch-merging layers between stages are not blocks: they train
        only when everything does."""
        return [block for stage in self.layers for block in stage.blocks]

    def readout_modules(self) -> list[nn.Module]:
        """What reads the blocks' output: the final norm (trained with any tuned block), the
        pooled-feature norm (none here: an identity) and the head (always trained)."""
        return [self.norm, nn.Identity(), self.head]


# -- SimMIM -----------------------------------------------------------------------------------------


class SimMIMSwin(MAEObjective, SwinEncoder):
    """SimMIM pretraining of a Swin Transformer (Xie et al., 2022), with MAE's calling convention.

    ``model(images, mask_ratio=0.6, noise=None, mask=None)`` returns an
    :class:`~openmae.models.mae.MAEOutput`. Masks, predictions and the loss live on the MASK grid,
    whose cell is the encoder's total stride (``patch_size * 2 ** (stages - 1)``: 32 px for four
    stages of 4 px patches, 8 px for two), so ``patch_size``, ``grid_size`` and ``num_patches`` here
    are those of the mask grid (the loss's patch), not of the patch embedding
    (``config["patch_size"]``, ``patch_embed.patch_size``). ``pred`` is (N, L, cell*cell*C) in
    ``patchify`` layout; ``mask`` is (N, L) with 1 = removed.

    Nothing of a masked cell reaches the prediction: every cell covers whole patch-embedding
    patches, and their embeddings are replaced by the mask token before anything mixes positions.

    The loss (``pixel_loss``): ``l1`` (SimMIM's default) is the mean absolute error over the masked
    pixels and channels, of raw pixels (as the data pipeline normalised them) or, with
    ``norm_pix_loss``, of each cell's pixels normalised by that cell's mean and variance; ``l2`` the
    mean squared error, likewise.

    State-dict names: the encoder's are :class:`SwinClassifier`'s (``patch_embed.*``, ``layers.*``,
    ``norm.*``); ``mask_token`` and the pixel head ``decoder_pred.*`` are pretraining-only.

    Args (beyond :class:`SwinEncoder`, built without a classification head):
        norm_pix_loss: regress per-cell normalised pixels.
        mask_type: default sampler on the mask grid when no ``noise``/``mask`` is given: random,
            block or grid.
        pixel_loss: ``l1`` (default) or ``l2``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_pix_loss: bool = False,
        mask_type: str = "random",
        pixel_loss: str = "l1",
    ):
        config = model_config(locals())
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {pixel_loss!r}")
        cell = patch_size * 2 ** (len(depths) - 1)
        size = to_2tuple(img_size)
        if size[0] % cell or size[1] % cell:
            raise ValueError(
                f"img_size {size[0]}x{size[1]} is not a multiple of SimMIM's mask cell, {cell} px (patch_size "
                f"{patch_size} * 2^{len(depths) - 1} merges); choose a size divisible by {cell}"
            )
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
        )
        self.config = config
        self.norm_pix_loss = norm_pix_loss
        self.mask_type = mask_type
        self.pixel_loss = pixel_loss
        # the mask grid is the last stage's grid: one prediction per last-stage token
        self.patch_size = cell
        self.grid_size = (size[0] // cell, size[1] // cell)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder_pred = nn.Conv2d(self.embed_dim, cell * cell * in_chans, kernel_size=1)

    def patch_mask(self, mask: Tensor) -> Tensor:
        """(N, L) mask on the mask grid -> (N, h, w, 1) bool on the patch-embedding grid, True = removed."""
        n = mask.shape[0]
        factor = self.patch_size // self.patch_embed.patch_size[0]  # 2 ** (stages - 1)
        removed = mask.bool().reshape(n, *self.grid_size)
        removed = removed.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        return removed.unsqueeze(-1)

    def forward_encoder(
        self,
        images: Tensor,
        mask_ratio: float = SIMMIM_MASK_RATIO,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the whole grid, masked patches replaced by the mask token.

        Args:
            images: (N, C, H, W).
            mask_ratio: fraction of mask-grid cells removed, in [0, 1).
            noise: optional (N, L); argsort ascending, the first ``int(L * (1 - mask_ratio))`` kept.
            mask: optional (N, L) bool/0-1, 1 = removed, same count per row; overrides sampling.
        Returns:
            latent (N, gh, gw, D) NHWC map of the last stage after the final norm (one token per
            mask cell), mask (N, L) with 1 = removed, ids_restore (N, L).
        """
        check_image_shape(images, self.in_chans, self.img_size)
        m = self.make_masking(images.shape[0], mask_ratio, noise, mask, device=images.device)
        x = self.patch_embed(images)  # (N, H/p, W/p, D1); per patch, nothing mixed yet
        # a select, not a blend: a removed patch's embedding (even inf / NaN) never reaches the output
        x = torch.where(self.patch_mask(m.mask), self.mask_token.to(x.dtype), x)
        latent = self.norm(self.layers(x))  # (N, gh, gw, D)
        return latent, m.mask, m.ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, gh, gw, D) -> pred (N, L, cell*cell*C): a 1x1 conv to cell^2 * C channels, then
        PixelShuffle(cell) back to image resolution, then patchified on the mask grid. SimMIM's head
        sees every token, so ``ids_restore`` is not needed (kept for MAE's signature)."""
        x = self.decoder_pred(latent.permute(0, 3, 1, 2))  # (N, cell^2 * C, gh, gw)
        images = F.pixel_shuffle(x, self.patch_size)  # (N, C, H, W)
        return self.patchify(images)

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over removed cells of the per-cell L1 (or L2) error, in fp32: with every cell of the
        same size, that is the mean over masked pixels and channels, SimMIM's loss.

        images: (N, C, H, W); pred: (N, L, cell*cell*C); mask: (N, L), 1 = removed.
        """
        error = pred.float() - self.target(images)
        error = error.abs() if self.pixel_loss == "l1" else error**2
        per_cell = error.mean(dim=-1)  # (N, L)
        mask = mask.float()
        return (per_cell * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        images: Tensor,
        mask_ratio: float = SIMMIM_MASK_RATIO,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> MAEOutput:
        """images (N, C, H, W) -> :class:`MAEOutput` (loss, pred, mask, ids_restore), as MAE's forward."""
        return super().forward(images, mask_ratio, noise, mask)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}


# -- registered variants ----------------------------------------------------------------------------

# The paper's sizes at 224 px (window 7, patches of 4 px, stage widths C, 2C, 4C, 8C).
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    # For CPU runs on the built-in Fashion-MNIST upsampled to 56 px: two stages on 14 x 14 and 7 x 7
    # grids (one 7 x 7 window in the last), so the mask cell is 8 px and the mask grid 7 x 7.
    "micro": dict(img_size=56, in_chans=1, embed_dim=48, depths=(2, 2), num_heads=(2, 4)),
}
for _size, _encoder in SWIN_SIZES.items():
    _classes = dict(num_classes=10) if _size == "micro" else {}
    register_variant(
        SwinClassifier, f"swin_{_size}_patch4_window7", ignore=SIMMIM_ONLY_ARGS, **_encoder, **_classes
    )
    register_variant(SimMIMSwin, f"simmim_swin_{_size}_patch4_window7", **_encoder)
