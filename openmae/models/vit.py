"""Vision Transformer encoder pieces, with the official MAE / timm parameter names.

``ViTEncoder`` holds what MAE and its downstream classifier share (``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks``, ``norm``), so its state dict is a timm ViT state dict and the MAE
encoder loads into the classifier unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor

from openmae.patches import sincos_2d, to_2tuple

ATTN_IMPLS = ("auto", "explicit", "sdpa")


def check_image_shape(images: Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    """Refuse images a model was not built for, saying how to fix it."""
    n, c, h, w = images.shape
    if c != in_chans or (h, w) != img_size:
        raise ValueError(
            f"expected images of shape (N, {in_chans}, {img_size[0]}, {img_size[1]}), "
            f"got {tuple(images.shape)}; resize the input or build the model with "
            f"img_size=({h}, {w}), in_chans={c}"
        )


def check_patch_grid(img_size: tuple[int, int], patch_size: int, in_chans: int) -> None:
    """Refuse a patch size that does not tile the image, or no channels, saying how to fix it."""
    if patch_size < 1 or img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(
            f"img_size {img_size[0]}x{img_size[1]} is not divisible by patch_size {patch_size}; "
            f"choose an image size that is a multiple of {patch_size}"
        )
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")


class PatchEmbed(nn.Module):
    """p x p stride-p conv: (N, C, H, W) -> (N, L, D) in row-major token order."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        check_image_shape(x, self.in_chans, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D).

        attn_mask: optional bool, True = may attend, broadcastable to (B, nh, T, T); every query
        must be allowed at least one key (a fully masked row is NaN).
        """
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, T, hs)
        # On CPU the explicit product beats scaled_dot_product_attention: a whole fp32 training step
        # of mae_vit_tiny_patch16 (224 px, batch 8) ran 2.3x faster on 2 cores with it
        # (benchmarks/pretrain_speed.py --compare openmae openmae_sdpa); fused kernels win on GPUs.
        if self.attn_impl == "sdpa" or (self.attn_impl == "auto" and x.is_cuda):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, T, T)
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, t, d)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D); attn_mask as :meth:`Attention.forward`."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform linears (bias 0), LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """The ViT trunk: patch embedding, cls token, fixed sin-cos positions, blocks, final norm.

    Args:
        img_size: int or (H, W); both divisible by ``patch_size``.
        patch_size: patch side p in pixels.
        in_chans: image channels (any count, e.g. 1 for grayscale).
        embed_dim, depth, num_heads, mlp_ratio: transformer width, depth, heads, MLP expansion.
        norm_eps: LayerNorm epsilon (official MAE: 1e-6).
        drop_path_rate: stochastic depth, linearly increasing over blocks (fine-tuning).
        attn_impl: ``auto`` (explicit on CPU, SDPA on GPU), ``explicit`` or ``sdpa``.
    """

    num_prefix_tokens = 1  # timm's name: the cls token leads every token sequence

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        img_size = to_2tuple(img_size)
        check_patch_grid(img_size, patch_size, in_chans)
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 for the 2D sin-cos embedding, got {embed_dim}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed, not learned; a Parameter (frozen) so the official state-dict key exists
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.grid_size, cls_token=True).unsqueeze(0), requires_grad=False
        )
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps, drop_path=r, attn_impl=attn_impl)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def init_encoder_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map over a flattened patch
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, D) patch tokens with their position embedding (no cls)."""
        return self.patch_embed(images) + self.pos_embed[:, 1:, :]

    def with_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def encode(self, images: Tensor) -> Tensor:
        """Deterministic, unmasked features: (N, C, H, W) -> (N, 1 + L, D), cls first, then
        the patch tokens in row-major order."""
        return self.forward_blocks(self.with_cls(self.embed_patches(images)))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


def model_config(locals_: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a model, to save next to its weights; tuples become lists, so
    the config survives a JSON round trip unchanged."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in locals_.items() if k not in ("self", "__class__")
    }
