"""Masked autoencoder with a ViT encoder (He et al., 2021).

The method in named steps, as in the reference: ``forward_encoder`` (embed, mask, encode the visible
tokens), ``forward_decoder`` (mask tokens, unshuffle, light transformer, pixel head) and
``forward_loss`` (MSE on removed patches, optionally on per-patch normalised targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from openmae.masking import MASK_TYPES, Masking, masking_from_mask, masking_from_noise, num_kept, sample_mask
from openmae.models.vit import Block, ViTEncoder, init_weights, model_config
from openmae.patches import patchify, sincos_2d, unpatchify
from openmae.registry import register_variant


def add_decoder(
    model: nn.Module,
    encoder_dim: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    decoder_num_heads: int,
    mlp_ratio: float,
    norm_eps: float,
    attn_impl: str,
    cls_token: bool,
    mask_token: bool = True,
) -> None:
    """Give ``model`` MAE's light decoder under the official names (``decoder_embed``, ``mask_token``,
    ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``).

    Reads ``model.grid_size``, ``model.patch_size`` and ``model.in_chans``; ``cls_token`` adds the
    zero position row that a cls token takes (MAE has one, ConvMAE none).
    """
    model.decoder_embed = nn.Linear(encoder_dim, decoder_embed_dim)
    if mask_token:
        model.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    model.decoder_pos_embed = nn.Parameter(
        sincos_2d(decoder_embed_dim, model.grid_size, cls_token=cls_token).unsqueeze(0), requires_grad=False
    )
    model.decoder_blocks = nn.ModuleList(
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_eps=norm_eps, attn_impl=attn_impl)
        for _ in range(decoder_depth)
    )
    model.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
    model.decoder_pred = nn.Linear(decoder_embed_dim, model.patch_size * model.patch_size * model.in_chans)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over removed patches of the per-patch MSE, in fp32. pred, target: (N, L, P); mask: (N, L), 1 = removed."""
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L) per patch
    mask = mask.float()
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class MAEOutput:
    loss: Tensor  # () fp32, what training minimises (with a pixel head: target loss + pixel_loss)
    pred: Tensor  # (N, L, p*p*C) in patchify layout (normalised patches if norm_pix_loss)
    mask: Tensor  # (N, L), 1 = removed
    ids_restore: Tensor  # (N, L)
    pixel_pred: Tensor | None = None  # (N, L, p*p*C): the pixel head's readout, in the input's space
    pixel_loss: Tensor | None = None  # () fp32: its MSE on removed patches


class MAEObjective:
    """MAE's steps that do not depend on the encoder, shared by :class:`MaskedAutoencoder` and ConvMAE.

    The host defines ``forward_encoder(images, mask_ratio, noise, mask) -> (latent, mask,
    ids_restore)`` and ``forward_decoder(latent, ids_restore) -> pred``, and the attributes
    ``patch_size``, ``grid_size``, ``in_chans``, ``num_patches``, ``mask_type`` and ``norm_pix_loss``.
    """

    patch_size: int
    grid_size: tuple[int, int]
    in_chans: int
    num_patches: int
    mask_type: str
    norm_pix_loss: bool

    def patchify(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, p*p*C)."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_chans)

    def make_masking(
        self,
        batch: int,
        mask_ratio: float,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        device: torch.device | None = None,
    ) -> Masking:
        """Which patches to remove: an explicit ``mask`` wins, then ``noise``, then the sampler."""
        length = self.num_patches
        if mask is not None:
            if tuple(mask.shape) != (batch, length):
                raise ValueError(f"mask must have shape ({batch}, {length}), got {tuple(mask.shape)}")
            return masking_from_mask(mask.to(device))
        if noise is not None:
            if tuple(noise.shape) != (batch, length):
                raise ValueError(f"noise must have shape ({batch}, {length}), got {tuple(noise.shape)}")
            return masking_from_noise(noise.to(device), num_kept(length, mask_ratio))
        if self.mask_type == "random":
            noise = torch.rand(batch, length, device=device)
            return masking_from_noise(noise, num_kept(length, mask_ratio))
        return masking_from_mask(sample_mask(self.mask_type, batch, self.grid_size, mask_ratio).to(device))

    def target(self, images: Tensor) -> Tensor:
        """The regression target: (N, L, p*p*C) patches, per-patch normalised with ``norm_pix_loss``."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over removed patches of the per-patch MSE, in fp32.

        images: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
        """
        return masked_mse(pred, self.target(images), mask)

    def forward(
        self,
        images: Tensor,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> MAEOutput:
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise, mask)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)


class MaskedAutoencoder(MAEObjective, ViTEncoder):
    """MAE with a ViT encoder. Parameter names follow the official layout.

    Args (beyond :class:`ViTEncoder`):
        decoder_embed_dim, decoder_depth, decoder_num_heads: the light decoder (paper: 512, 8, 16).
        norm_pix_loss: regress per-patch normalised pixels (the recipe's target).
        mask_token_in_encoder: the paper's Table 1c variant; mask tokens replace removed patches
            inside the encoder, which then sees all L tokens (about 3x the encoder FLOPs).
        mask_type: default sampler when no ``noise``/``mask`` is given: random, block or grid.
        pixel_head: a second linear head on the decoder's output that reads out raw (un-normalised)
            pixels, trained on removed patches from *detached* decoder features: it shapes nothing
            else, so the encoder learns exactly what it would without it, and a norm-pix model can
            show its predictions as images (``openmae reconstruct`` uses it). Costs one linear layer.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        norm_eps: float = 1e-6,
        mask_token_in_encoder: bool = False,
        mask_type: str = "random",
        attn_impl: str = "auto",
        pixel_head: bool = False,
    ):
        config = model_config(locals())
        super().__init__(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps, 0.0, attn_impl
        )
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
        if decoder_embed_dim % 4:
            raise ValueError(f"decoder_embed_dim must be divisible by 4, got {decoder_embed_dim}")
        self.config = config
        self.norm_pix_loss = norm_pix_loss
        self.mask_token_in_encoder = mask_token_in_encoder
        self.mask_type = mask_type
        if mask_token_in_encoder:  # the decoder then gets all L tokens and needs no mask token
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        add_decoder(
            self, embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_eps, attn_impl,
            cls_token=True, mask_token=not mask_token_in_encoder,
        )
        self.pixel_head = pixel_head
        if pixel_head:
            self.decoder_pred_pixel = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        self.init_encoder_weights()
        token = self.encoder_mask_token if self.mask_token_in_encoder else self.mask_token
        nn.init.normal_(token, std=0.02)

    # -- the steps that depend on the encoder ---------------------------------------------------

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
            mask_ratio: fraction of patches removed, in [0, 1).
            noise: optional (N, L); argsort ascending, the first ``int(L * (1 - mask_ratio))`` kept.
            mask: optional (N, L) bool/0-1, 1 = removed, same count per row; overrides sampling.
        Returns:
            latent (N, 1 + len_keep, D) (or (N, 1 + L, D) with ``mask_token_in_encoder``),
            mask (N, L) with 1 = removed, ids_restore (N, L).
        """
        x = self.embed_patches(images)  # (N, L, D), positions added before masking
        n, length, d = x.shape
        m = self.make_masking(n, mask_ratio, noise, mask, device=x.device)
        if self.mask_token_in_encoder:
            removed = m.mask.unsqueeze(-1).to(x.dtype)  # (N, L, 1)
            tokens = self.encoder_mask_token + self.pos_embed[:, 1:, :]
            x = x * (1 - removed) + tokens * removed
        else:
            keep = m.ids_shuffle[:, : m.len_keep]
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, d))  # (N, len_keep, D)
        latent = self.forward_blocks(self.with_cls(x))
        return latent, m.mask, m.ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, 1 + len_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C)."""
        return self.decoder_pred(self.decoder_features(latent, ids_restore))

    def decoder_features(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, 1 + len_keep, D), ids_restore (N, L) -> the decoder's normed output (N, L, Dd),
        cls dropped: what the prediction heads read."""
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        if not self.mask_token_in_encoder:
            n, t, dd = x.shape
            length = ids_restore.shape[1]
            fill = self.mask_token.to(x.dtype).expand(n, length + 1 - t, -1)
            x_ = torch.cat([x[:, 1:, :], fill], dim=1)  # (N, L, Dd) in shuffled order
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x[:, 1:, :])  # drop cls (the norm and heads act per token)

    def forward(
        self,
        images: Tensor,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> MAEOutput:
        if not self.pixel_head:
            return super().forward(images, mask_ratio, noise, mask)
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise, mask)
        features = self.decoder_features(latent, ids_restore)  # (N, L, Dd)
        pred = self.decoder_pred(features)
        # detached: the readout learns from the decoder, never the other way round
        pixel_pred = self.decoder_pred_pixel(features.detach())
        loss = self.forward_loss(images, pred, mask)
        pixel_loss = masked_mse(pixel_pred, self.patchify(images.float()), mask)
        return MAEOutput(loss + pixel_loss, pred, mask, ids_restore, pixel_pred=pixel_pred, pixel_loss=pixel_loss)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "encoder_mask_token", "decoder_pos_embed"}


_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_DECODER = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
_GRAY_28PX = dict(img_size=28, patch_size=4, in_chans=1)

_VARIANTS = {
    "mae_vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3, **_DECODER),
    "mae_vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, **_DECODER),
    "mae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "mae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
    # Small-image variants for CPU runs and the built-in datasets (28 px Fashion-MNIST, 32 px images).
    "mae_vit_tiny_patch4": dict(**_GRAY_28PX, embed_dim=192, depth=6, num_heads=3, **_SMALL_DECODER),
    # The built-in CPU default: a few minutes on 2 cores reach a useful encoder on Fashion-MNIST.
    "mae_vit_micro_patch4": dict(**_GRAY_28PX, embed_dim=128, depth=4, num_heads=4, **_SMALL_DECODER),
}
for _name, _defaults in _VARIANTS.items():
    register_variant(MaskedAutoencoder, _name, **_defaults)
