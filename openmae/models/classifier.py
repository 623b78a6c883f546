"""ViT classifier for fine-tuning, linear probing and feature extraction, timm-style.

Its trunk is :class:`ViTEncoder`, so an MAE's encoder weights load into it unchanged. The readout
follows timm's ``VisionTransformer`` (and the official MAE fine-tuning code):

- ``global_pool="avg"`` (the paper's fine-tuning): the mean of the patch tokens goes through a
  fresh LayerNorm ``fc_norm``; the trunk's final ``norm`` is then an identity, so fine-tuned
  checkpoints have the official / timm layout (``fc_norm.*``, no ``norm.*``).
- ``global_pool="token"`` (the paper's linear probing): the cls token after the final ``norm``.
- ``head_norm=True`` (linear probing): ``head`` is ``BatchNorm1d(affine=False, eps=1e-6)`` then the
  linear layer (``head.0`` / ``head.1``, the official linear-probe layout).
- ``num_classes=0``: ``head`` is an identity and the model returns its pooled features.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn
from torch import Tensor

from openmae.models.vit import ViTEncoder, init_weights, model_config
from openmae.registry import list_models, model_factory, register_variant

GLOBAL_POOLS = ("avg", "token")  # mean of the patch tokens, or the cls token

# Constructor arguments of a pretraining model with no place in a classifier; the factories drop
# them so that ``create_model("vit_base_patch16", **mae.config)`` builds the MAE's classifier.
MAE_ONLY_ARGS = (
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "norm_pix_loss",
    "mask_token_in_encoder",
    "pixel_head",
    "mask_type",
    "mask_ratio",
)


class VisionTransformer(ViTEncoder):
    """ViT with a classification head.

    Args (beyond :class:`ViTEncoder`):
        num_classes: outputs of ``head``; 0 gives no head (features out).
        global_pool: ``avg`` (mean of patch tokens) or ``token`` (cls token).
        fc_norm: LayerNorm after pooling instead of the trunk's final norm; default: with ``avg``.
        head_norm: BatchNorm without affine before the linear head (linear probing).
        drop_path_rate: stochastic depth, linearly increasing to this rate over the blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: str = "avg",
        fc_norm: bool | None = None,
        head_norm: bool = False,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "auto",
    ):
        config = model_config(locals())
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        super().__init__(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps, drop_path_rate, attn_impl
        )
        self.config = config
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        if self.use_fc_norm:
            # fc_norm takes the final norm's place (timm, official MAE): no unused norm parameters
            # under DDP, and fine-tuned checkpoints carry the layout other tools expect.
            self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if self.use_fc_norm else nn.Identity()
        self.head = self._build_head(num_classes, head_norm)
        self.reset_parameters()

    def _build_head(self, num_classes: int, head_norm: bool) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        linear = nn.Linear(self.embed_dim, num_classes)
        if head_norm:
            return nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), linear)
        return linear

    @property
    def head_linear(self) -> nn.Linear | None:
        """The head's linear layer (None without a head)."""
        if isinstance(self.head, nn.Sequential):
            return self.head[-1]
        return self.head if isinstance(self.head, nn.Linear) else None

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        self.init_encoder_weights()
        self.reset_head()

    def reset_head(self) -> None:
        """Re-initialise the head: trunc-normal weight (std 2e-5 as the MAE fine-tuning recipe,
        0.01 with ``head_norm`` as its linear probe), zero bias."""
        linear = self.head_linear
        if linear is None:
            return
        std = 0.01 if isinstance(self.head, nn.Sequential) else 2e-5
        nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)

    # -- timm-style interface --------------------------------------------------------------------

    def tunable_blocks(self) -> list[nn.Module]:
        """The blocks partial fine-tuning (``--tune-blocks K``) counts from the end, in order."""
        return list(self.blocks)

    def readout_modules(self) -> list[nn.Module]:
        """What reads the blocks' output: the final norm (trained with any tuned block), then the
        pooled-feature norm and the head (always trained)."""
        return [self.norm, self.fc_norm, self.head]

    def forward_features(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 1 + L, D) tokens, cls first (after ``norm``, an identity with fc_norm)."""
        return self.encode(images)

    def pool(self, tokens: Tensor) -> Tensor:
        """(N, 1 + L, D) -> (N, D)."""
        if self.global_pool == "avg":
            return tokens[:, 1:].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, 1 + L, D) -> logits (N, num_classes), or the (N, D) features the head sees."""
        x = self.fc_norm(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's layer-wise lr decay: the stem, one per block, then the head."""
        return {
            "stem": r"^cls_token|pos_embed|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }


_FASHION_MNIST = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10)  # 28 px grayscale, 10 classes

_VARIANTS = {
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # The encoder of mae_vit_tiny_patch4.
    "vit_tiny_patch4": dict(**_FASHION_MNIST, embed_dim=192, depth=6, num_heads=3),
    # The encoder of mae_vit_micro_patch4, the built-in CPU default.
    "vit_micro_patch4": dict(**_FASHION_MNIST, embed_dim=128, depth=4, num_heads=4),
}
for _name, _defaults in _VARIANTS.items():
    register_variant(VisionTransformer, _name, ignore=MAE_ONLY_ARGS, **_defaults)


# Pretraining-model prefix -> the prefix of its classifier (the encoder with a head).
CLASSIFIER_FAMILIES = {"mae_vit_": "vit_", "convmae_": "convvit_", "simmim_swin_": "swin_"}


def classifier_name(arch: str) -> str | None:
    """The registered classifier for a pretraining architecture (``mae_vit_base_patch16`` ->
    ``vit_base_patch16``, ``convmae_base_patch16`` -> ``convvit_base_patch16``,
    ``simmim_swin_tiny_patch4_window7`` -> ``swin_tiny_patch4_window7``), the name itself
    for a classifier, None when there is none."""
    names = set(list_models())
    candidates = [arch] + [c + arch.removeprefix(p) for p, c in CLASSIFIER_FAMILIES.items() if arch.startswith(p)]
    for candidate in candidates:
        if candidate in names and candidate.startswith(tuple(CLASSIFIER_FAMILIES.values())):
            return candidate
    return None


def classifier_args(name: str | None = None) -> dict[str, Any]:
    """The constructor arguments of a registered classifier's class (default: :class:`VisionTransformer`)
    and their defaults."""
    cls = model_factory(name).cls if name is not None else VisionTransformer
    params = inspect.signature(cls.__init__).parameters
    return {arg: p.default for arg, p in params.items() if arg not in ("self", "args", "kwargs")}


def classifier_defaults(name: str) -> dict[str, Any]:
    """The constructor arguments a registered classifier is built with, without building it."""
    return {**classifier_args(name), **model_factory(name).defaults}


__all__ = [
    "CLASSIFIER_FAMILIES",
    "GLOBAL_POOLS",
    "VisionTransformer",
    "classifier_args",
    "classifier_defaults",
    "classifier_name",
]
