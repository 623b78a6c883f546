"""ConvMAE (Gao et al., 2022): a masked autoencoder with a hybrid convolution-transformer encoder.

Encoder, three stages on an (H, W) image:

- stage 1 at H/4 and stage 2 at H/8: convolution blocks (a transformer block whose self-attention
  is 1x1 conv -> 5x5 depth-wise conv -> 1x1 conv, with a 1x1-conv MLP);
- stage 3 at H/16: transformer blocks over the *visible* stage-3 tokens only, with a fixed 2D
  sin-cos position embedding and no cls token.

Stride-conv patch embeddings (4, 2, 2) with LayerNorm sit between the stages, so one stage-3 token
covers a 16 x 16 pixel patch, the patch of the reconstruction loss. The mask is drawn on the stage-3
grid and upsampled x2 / x4 for stages 2 / 1 (block-wise masking), and the conv stages multiply their
features by the visible mask before every depth-wise conv (masked convolution), so nothing from a
removed patch reaches a visible one. Stage-1 and stage-2 features are brought to the stage-3 grid by
stride-4 / stride-2 convs and added to the stage-3 output before the final norm (multi-scale
fusion); MAE's decoder and loss follow.

Parameter names follow the official Alpha-VL/ConvMAE layout (``patch_embed1..4``, ``blocks1..3``,
``stage1_output_decode``, ``stage2_output_decode``, ``norm``, ``decoder_*``), so released
checkpoints load as they are (:func:`openmae.interop.convmae.load_official_convmae`). Every grid
size derives from the configured image size (any multiple of 16).

The encoder trunk (:class:`ConvViTEncoder`) is shared with :class:`openmae.models.convvit.ConvViT`,
the fine-tuning classifier and dense-prediction backbone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ConvMlp, DropPath, LayerNorm2d
from torch import Tensor

from openmae.masking import MASK_TYPES
from openmae.models.mae import MAEObjective, add_decoder
from openmae.models.vit import Block, check_image_shape, init_weights, model_config
from openmae.patches import sincos_2d, to_2tuple
from openmae.registry import register_variant

STAGE_STRIDES = (4, 2, 2)  # patch-embedding strides of stages 1, 2, 3
PATCH_SIZE = math.prod(STAGE_STRIDES)  # pixels per stage-3 token side: the loss's patch
# The official conv stages build their LayerNorms with PyTorch's default eps (the transformer stage
# uses 1e-6); keeping it makes released weights compute exactly what they were trained to.
CONV_NORM_EPS = 1e-5


def _triple(value: float | Sequence[float], name: str) -> tuple:
    """One value per stage: a scalar is repeated, a sequence must have three entries."""
    if isinstance(value, (int, float)):
        return (value, value, value)
    value = tuple(value)
    if len(value) != 3:
        raise ValueError(f"{name} needs one value per stage (3), got {list(value)}")
    return value


def visible_map(mask: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """Upsample a stage-3 mask to a finer stage, inverted to the multiplier masked convs need.

    Args:
        mask: (N, L) with 1/True = removed, L = gh * gw, row-major.
        grid: (gh, gw), the stage-3 grid.
        factor: upsampling factor (2 for stage 2, 4 for stage 1).
    Returns:
        (N, 1, gh * factor, gw * factor) float, 1 = visible, 0 = removed.
    """
    n = mask.shape[0]
    visible = 1.0 - mask.float().reshape(n, 1, grid[0], grid[1])
    return visible.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def grid_tokens(x: Tensor) -> Tensor:
    """(N, D, h, w) feature map -> (N, h * w, D) tokens in row-major order."""
    return x.flatten(2).transpose(1, 2)


# -- building blocks ------------------------------------------------------------------------------


class ConvPatchEmbed(nn.Module):
    """Stride-s s x s conv, then LayerNorm over channels and GELU: (N, C, H, W) -> (N, D, H/s, W/s)."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = LayerNorm2d(embed_dim, eps=CONV_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class ConvBlock(nn.Module):
    """A transformer block with self-attention replaced by 1x1 conv -> k x k depth-wise conv -> 1x1
    conv, and a 1x1-conv MLP. Works on (N, D, h, w) maps.

    The depth-wise conv keeps the official name ``attn`` (the slot it takes in the block), so
    released weights load.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, kernel_size: int = 5):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=CONV_NORM_EPS)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=CONV_NORM_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """x: (N, D, h, w); visible: optional (N, 1, h, w), 1 = visible (masked convolution)."""
        y = self.conv1(self.norm1(x))
        if visible is not None:
            # zero removed positions right before the only op that mixes positions, so a visible
            # output never sees a removed input; every other op here is per position
            y = y * visible.to(y.dtype)
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -- the shared encoder trunk ----------------------------------------------------------------------


class ConvViTEncoder(nn.Module):
    """What ConvMAE and its fine-tuning backbone share: the conv stages, the stage-3 embedding and
    the transformer blocks (``patch_embed1..4``, ``pos_embed``, ``blocks1..3``).

    Args:
        img_size: int or (H, W), both divisible by 16.
        in_chans: image channels.
        embed_dim: widths of stages 1, 2, 3 (ConvMAE-B: 256, 384, 768).
        depth: blocks in stages 1, 2, 3 (ConvMAE-B: 2, 2, 11).
        num_heads: attention heads of stage 3.
        mlp_ratio: MLP expansion, one value or one per stage.
        norm_eps: LayerNorm eps of stage 3 (the conv stages use :data:`CONV_NORM_EPS`).
        drop_path_rate: stochastic depth, rising linearly over all blocks of the three stages.
        attn_impl: ``auto``, ``explicit`` or ``sdpa`` (see :class:`openmae.models.vit.Attention`).
    """

    num_prefix_tokens = 0  # timm's name: no cls token, every method returns patch tokens only

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float | Sequence[float] = 4.0,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        img_size = to_2tuple(img_size)
        if img_size[0] % PATCH_SIZE or img_size[1] % PATCH_SIZE or min(img_size) < PATCH_SIZE:
            raise ValueError(
                f"img_size {img_size[0]}x{img_size[1]} is not a multiple of {PATCH_SIZE}: ConvMAE's stages "
                f"downsample by {' x '.join(map(str, STAGE_STRIDES))}; choose a size divisible by {PATCH_SIZE}"
            )
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        dims = tuple(int(d) for d in _triple(embed_dim, "embed_dim"))
        depths = tuple(int(d) for d in _triple(depth, "depth"))
        ratios = _triple(mlp_ratio, "mlp_ratio")
        if dims[2] % 4:
            raise ValueError(f"the stage-3 width must be divisible by 4 for the sin-cos embedding, got {dims[2]}")
        self.img_size = img_size
        self.patch_size = PATCH_SIZE
        self.in_chans = in_chans
        self.embed_dims = dims
        self.embed_dim = dims[2]  # width of the tokens every method returns
        self.grid_size = (img_size[0] // PATCH_SIZE, img_size[1] // PATCH_SIZE)  # the stage-3 grid
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        s1, s2, s3 = STAGE_STRIDES
        self.patch_embed1 = ConvPatchEmbed(in_chans, dims[0], s1)
        self.patch_embed2 = ConvPatchEmbed(dims[0], dims[1], s2)
        self.patch_embed3 = ConvPatchEmbed(dims[1], dims[2], s3)
        self.patch_embed4 = nn.Linear(dims[2], dims[2])
        # fixed, not learned; a frozen Parameter so the official state-dict key exists
        self.pos_embed = nn.Parameter(sincos_2d(dims[2], self.grid_size).unsqueeze(0), requires_grad=False)

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist() if sum(depths) else []
        r1, r2, r3 = rates[: depths[0]], rates[depths[0] : depths[0] + depths[1]], rates[depths[0] + depths[1] :]
        self.blocks1 = nn.ModuleList(ConvBlock(dims[0], ratios[0], r) for r in r1)
        self.blocks2 = nn.ModuleList(ConvBlock(dims[1], ratios[1], r) for r in r2)
        self.blocks3 = nn.ModuleList(
            Block(dims[2], num_heads, ratios[2], norm_eps=norm_eps, drop_path=r, attn_impl=attn_impl) for r in r3
        )

    def init_encoder_weights(self) -> None:
        """Official init on top of :func:`init_weights`: the stage-3 embedding conv as a linear map
        (the other convs keep PyTorch's default init, as in the reference)."""
        w = self.patch_embed3.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed3.proj.bias)

    def forward_conv_stages(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Stages 1-2 and the stage-3 embedding, on every position.

        Args:
            images: (N, C, H, W).
            mask: optional (N, L) on the stage-3 grid, 1 = removed; turns on masked convolution.
        Returns:
            e1 (N, D1, H/4, W/4), e2 (N, D2, H/8, W/8), and the stage-3 tokens with their position
            embedding (N, L, D3), row-major. With a mask, positions inside removed patches hold
            values that must be dropped; visible positions depend on visible pixels only.
        """
        check_image_shape(images, self.in_chans, self.img_size)
        vis1 = vis2 = None
        if mask is not None:
            vis1 = visible_map(mask, self.grid_size, STAGE_STRIDES[1] * STAGE_STRIDES[2])
            vis2 = visible_map(mask, self.grid_size, STAGE_STRIDES[2])
        x = self.patch_embed1(images)  # (N, D1, H/4, W/4)
        for blk in self.blocks1:
            x = blk(x, vis1)
        e1 = x
        x = self.patch_embed2(e1)  # (N, D2, H/8, W/8)
        for blk in self.blocks2:
            x = blk(x, vis2)
        e2 = x
        # the stride-2 embedding reads 2 x 2 cells that lie inside one stage-3 patch, so it mixes
        # nothing across patches
        tokens = self.patch_embed4(grid_tokens(self.patch_embed3(e2)))  # (N, L, D3)
        return e1, e2, tokens + self.pos_embed


# -- the masked autoencoder ------------------------------------------------------------------------


class ConvMAE(MAEObjective, ConvViTEncoder):
    """ConvMAE with MaskedAutoencoder's interface (``forward_encoder`` / ``forward_decoder`` /
    ``forward_loss`` / ``forward`` -> MAEOutput), so training, figures and evaluation use it unchanged.

    Differences from MAE a caller can see: no cls token anywhere (the latent is (N, len_keep, D3)
    and the decoder position table has no cls row), ``patch_size`` is always 16 (the product of the
    stage strides) and ``mask_token_in_encoder`` does not exist (the conv stages see every position
    and mask by multiplication instead).

    Args (beyond :class:`ConvViTEncoder`):
        decoder_embed_dim, decoder_depth, decoder_num_heads: MAE's light decoder (512, 8, 16).
        norm_pix_loss: regress per-patch normalised pixels.
        mask_type: sampler on the stage-3 grid when no ``noise``/``mask`` is given: random, block
            or grid.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float | Sequence[float] = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        norm_eps: float = 1e-6,
        mask_type: str = "random",
        attn_impl: str = "auto",
    ):
        config = model_config(locals())
        super().__init__(img_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps, 0.0, attn_impl)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
        if decoder_embed_dim % 4:
            raise ValueError(f"decoder_embed_dim must be divisible by 4, got {decoder_embed_dim}")
        self.config = config
        self.norm_pix_loss = norm_pix_loss
        self.mask_type = mask_type
        d1, d2, d3 = self.embed_dims
        s1, s2, s3 = STAGE_STRIDES

        # multi-scale fusion: stages 1 and 2 onto the stage-3 grid
        self.stage1_output_decode = nn.Conv2d(d1, d3, kernel_size=s2 * s3, stride=s2 * s3)
        self.stage2_output_decode = nn.Conv2d(d2, d3, kernel_size=s3, stride=s3)
        self.norm = nn.LayerNorm(d3, eps=norm_eps)

        # MAE's decoder (MLP ratio 4); no cls token, so no cls row in its position table
        add_decoder(
            self, d3, decoder_embed_dim, decoder_depth, decoder_num_heads, 4.0, norm_eps, attn_impl, cls_token=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        self.init_encoder_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def fusion(self, e1: Tensor, e2: Tensor) -> Tensor:
        """Stage-1 and stage-2 maps on the stage-3 grid, summed: (N, L, D3)."""
        return grid_tokens(self.stage1_output_decode(e1)) + grid_tokens(self.stage2_output_decode(e2))

    def forward_encoder(
        self,
        images: Tensor,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches.

        Args:
            images: (N, C, H, W).
            mask_ratio: fraction of stage-3 patches removed, in [0, 1).
            noise: optional (N, L); argsort ascending, the first ``int(L * (1 - mask_ratio))`` kept.
            mask: optional (N, L) bool/0-1, 1 = removed, same count per row; overrides sampling.
        Returns:
            latent (N, len_keep, D3) (no cls token), mask (N, L) with 1 = removed, ids_restore (N, L).
        """
        m = self.make_masking(images.shape[0], mask_ratio, noise, mask, device=images.device)
        e1, e2, x = self.forward_conv_stages(images, m.mask)
        keep = m.ids_shuffle[:, : m.len_keep]  # (N, len_keep)
        x = gather_tokens(x, keep)  # (N, len_keep, D3): only visible tokens enter stage 3
        for blk in self.blocks3:
            x = blk(x)
        latent = self.norm(x + gather_tokens(self.fusion(e1, e2), keep))
        return latent, m.mask, m.ids_restore

    def encode(self, images: Tensor) -> Tensor:
        """Deterministic, unmasked features: (N, C, H, W) -> (N, L, D3), the stage-3 tokens after
        multi-scale fusion and the final norm, row-major. There is no cls token (unlike
        ``MaskedAutoencoder.encode``, which returns (N, 1 + L, D)); pool the tokens instead."""
        e1, e2, x = self.forward_conv_stages(images)
        for blk in self.blocks3:
            x = blk(x)
        return self.norm(x + self.fusion(e1, e2))

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, len_keep, D3), ids_restore (N, L) -> pred (N, L, 16*16*C)."""
        x = self.decoder_embed(latent)  # (N, len_keep, Dd)
        n, t, dd = x.shape
        fill = self.mask_token.to(x.dtype).expand(n, ids_restore.shape[1] - t, -1)
        x = torch.cat([x, fill], dim=1)  # (N, L, Dd) in shuffled order
        x = gather_tokens(x, ids_restore)  # unshuffle
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token", "decoder_pos_embed"}


# -- registered variants ---------------------------------------------------------------------------

# Encoder sizes, shared with ConvViT (openmae.models.convvit). Base is the paper's (official
# models_convmae.py). Small follows Alpha-VL's FastConvMAE (fastconvmae_convvit_small_patch16); large
# follows ConvMAE-v2 (dconvmae_convvit_large_patch16), including its MLP ratio 8 in the conv stages.
# Tiny is for CPU runs on 32-px images.
ENCODER_SIZES = {
    "tiny": dict(img_size=32, embed_dim=(64, 128, 192), depth=(1, 1, 4), num_heads=3),
    "small": dict(embed_dim=(128, 256, 384), depth=(2, 2, 11), num_heads=6),
    "base": dict(embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12),
    "large": dict(embed_dim=(384, 768, 1024), depth=(2, 2, 23), num_heads=16, mlp_ratio=(8, 8, 4)),
}
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_TINY_DECODER = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)

for _size, _encoder in ENCODER_SIZES.items():
    _decoder = _TINY_DECODER if _size == "tiny" else _DECODER
    register_variant(ConvMAE, f"convmae_{_size}_patch16", **_encoder, **_decoder)
