"""Feature pyramids: an encoder's multi-scale maps for dense heads (UperNet, FPN, Mask R-CNN).

Every pyramid wraps an encoder (kept as ``.encoder``, which the layer-wise lr decay reads) and maps
images (N, C, H, W) to an ordered dict of NCHW maps, fine to coarse. Levels are named by their
stride in input pixels: ``p{log2(stride)}``, so p2 is stride 4 ... p5 stride 32 (torchvision's and
Detectron's names). ``out_channels`` and ``strides`` are dicts in the same order. A level of stride
s covers ``ceil(H / s) x ceil(W / s)`` cells: the maps of an input that is not a multiple of the
stride are those of the input padded at the bottom/right, cropped to that size.

- :class:`ViTPyramid` (plain ViT): ViTDet's simple feature pyramid from the last block's patch-token
  map alone. With patch p the map has stride p; scale factors (4, 2, 1, 1/2) give strides p/4, p/2,
  p, 2p: 4, 8, 16, 32 (p2-p5) for patch 16 and 1, 2, 4, 8 (p0-p3) for the patch-4 CPU models. Any
  input size: the grid comes from the input, and the position table follows it (see
  :func:`openmae.patches.resample_pos_embed`). Optional ViTDet window attention.
- :class:`ConvViTPyramid`: ConvMAE's own stages E1-E3 (strides 4, 8, 16) and E4, a max-pool of E3.
- :class:`SwinPyramid`: the Swin stages (strides 4, 8, 16, 32 for the four-stage models; the two-stage
  micro Swin gives two levels, p2 and p3).

ConvViT and Swin compute their grids, position tables and attention masks for the image size they
were built with, so their pyramids zero-pad smaller inputs to that size (bottom/right) and crop the
maps; larger inputs are refused (build the encoder at the largest size: ``build_dense_encoder(...,
img_size=...)``). The ViT pyramid has no such limit.

Widths: the ViT pyramid leaves the common width to the neck by default (each level keeps ViTDet's
width before its convs: D/4, D/2, D, D), because both necks that read it, UperNet's laterals and
torchvision's FPN, open with a 1x1 and a 3x3 conv per level already; ``out_channels=`` adds ViTDet's
own 1x1 + 3x3 convs (with LayerNorm) to one width. Every level is normalised: the ViT's by the
encoder's final norm (before resampling), ConvViT's and Swin's by a LayerNorm per level (the last Swin
level by the pretrained final norm, so no encoder parameter is left unused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor

from openmae.models.convvit import ConvViT, default_global_blocks, window_attention_mask, window_merge, window_partition
from openmae.models.swin import SwinEncoder
from openmae.models.vit import ViTEncoder
from openmae.patches import is_sincos, resample_pos_embed, sincos_2d

VIT_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)  # ViTDet's, relative to the patch grid

# parameters an encoder may hold that no pyramid reads: a classifier's readout, a pretraining
# model's decoder and fusion layers
UNUSED_PREFIXES = (
    "head.",
    "fc_norm.",
    "decoder",
    "mask_token",
    "encoder_mask_token",
    "stage1_output_decode",
    "stage2_output_decode",
)


def level_name(stride: float) -> str:
    """``p{log2(stride)}``, rounded: p2 for stride 4, p0 for stride 1 (3.5 for patch 14 gives p2)."""
    return f"p{round(math.log2(stride))}"


def crop_levels(maps: dict[str, Tensor], strides: dict[str, float], size: tuple[int, int]) -> dict[str, Tensor]:
    """Each map cut to ``ceil(H / stride) x ceil(W / stride)`` for an input of ``size`` (H, W)."""
    h, w = size
    return {k: m[..., : math.ceil(h / strides[k]), : math.ceil(w / strides[k])] for k, m in maps.items()}


def pad_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad (N, C, h, w) images at the bottom/right to ``size`` (H, W); refuse larger ones."""
    h, w = images.shape[-2:]
    if h > size[0] or w > size[1]:
        raise ValueError(
            f"images of {h}x{w} are larger than the {size[0]}x{size[1]} the encoder was built for; build the "
            f"encoder at the largest input size: build_dense_encoder(..., img_size=({max(h, size[0])}, "
            f"{max(w, size[1])}))"
        )
    return F.pad(images, (0, size[1] - w, 0, size[0] - h))


def check_headless(encoder: nn.Module) -> None:
    """Refuse an encoder that holds parameters a pyramid would never use (a classification head, a
    decoder): they would get no gradient, which DDP refuses and which wastes the optimizer's memory."""
    unused = sorted({n.split(".")[0] for n, _ in encoder.named_parameters() if n.startswith(UNUSED_PREFIXES)})
    if unused:
        raise ValueError(
            f"the encoder holds parameters no pyramid uses ({', '.join(unused)}); pass the encoder alone: "
            "build_dense_encoder(name_or_checkpoint) builds it without head or decoder"
        )


class Pyramid(nn.Module):
    """What every pyramid exposes: ``encoder``, ``out_channels`` and ``strides`` (ordered dicts by
    level name, fine to coarse), and ``forward(images) -> {name: (N, C, h, w)}``."""

    encoder: nn.Module
    out_channels: dict[str, int]
    strides: dict[str, float]


# -- plain ViT: ViTDet's simple feature pyramid --------------------------------------------------------


def _rescale(dim: int, scale: float) -> tuple[nn.Module, int]:
    """ViTDet's resampling of the last map by ``scale`` (a power of 2): log2(scale) 2x2 stride-2
    deconvolutions halving the width (LayerNorm + GELU between two), the identity, or 2x2 max-pools
    (ceil mode: odd grids keep their border, as ConvViT's E4). Returns (module, output width)."""
    k = round(math.log2(scale))
    if k <= 0:
        pools = [nn.MaxPool2d(2, ceil_mode=True) for _ in range(-k)]
        return (nn.Sequential(*pools) if pools else nn.Identity()), dim
    if dim % 2**k:
        raise ValueError(
            f"scale factor {scale} halves the width {k} times, but embed_dim {dim} is not divisible by {2**k}"
        )
    layers: list[nn.Module] = []
    width = dim
    for i in range(k):
        if i:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
        width //= 2
    return nn.Sequential(*layers), width


def _vitdet_convs(width: int, out_channels: int) -> nn.Sequential:
    """ViTDet's per-level 1x1 then 3x3 conv to a common width, each followed by a LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class ViTPyramid(Pyramid):
    """ViTDet's simple feature pyramid (Li et al., 2022) on a plain ViT.

    The encoder runs on the patch grid of the actual input (padded at the bottom/right to a multiple
    of the patch), with the cls token as in pretraining; the last block's patch tokens, after the
    encoder's final norm, form one (N, D, gh, gw) map of stride p, resampled to every scale.

    Position embedding: when the input grid is not the one the encoder was built for, a fixed
    sin-cos table (openmae's ViT) is recomputed for the grid (cached per grid) and a learned one is
    resampled bicubically at every forward (so it keeps its gradient).

    Window attention (ViTDet): with ``window_size`` > 0, the blocks not in ``global_blocks`` attend
    within non-overlapping window_size x window_size windows of the token grid (the grid is padded
    to a multiple of the window and the padding masked out); the cls token skips those blocks and
    takes part in the global ones. No relative position bias: openmae's attention takes a boolean
    mask, not an additive bias.

    Args:
        encoder: a headless :class:`~openmae.models.vit.ViTEncoder` (``build_dense_encoder``).
        scale_factors: powers of 2 relative to the patch grid, each a level of stride p / scale.
        window_size: window side in tokens; 0 for global attention in every block.
        global_blocks: block indices that keep global attention; default ViTDet's rule (the last
            block of each quarter: 2, 5, 8, 11 of 12).
        out_channels: add ViTDet's 1x1 + 3x3 convs to this common width; None leaves each level's
            width (D / scale for scale > 1, else D) to the neck.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        scale_factors: Sequence[float] = VIT_SCALE_FACTORS,
        window_size: int = 0,
        global_blocks: Sequence[int] | None = None,
        out_channels: int | None = None,
    ):
        super().__init__()
        check_headless(encoder)
        scales = sorted({float(s) for s in scale_factors}, reverse=True)  # fine to coarse
        if not scales or len(scales) != len(scale_factors) or any(s <= 0 or math.log2(s) % 1 for s in scales):
            raise ValueError(
                f"scale_factors must be distinct powers of 2 (e.g. 4, 2, 1, 0.5), got {list(scale_factors)}"
            )
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention everywhere), got {window_size}")
        self.encoder = encoder
        self.window_size = window_size
        depth = len(encoder.blocks)
        keep_global = set(default_global_blocks(depth) if global_blocks is None else global_blocks)
        if any(not 0 <= i < depth for i in keep_global):
            raise ValueError(f"global_blocks must index the encoder's {depth} blocks, got {sorted(keep_global)}")
        self.windowed = [bool(window_size) and i not in keep_global for i in range(depth)]

        patch, dim = encoder.patch_size, encoder.embed_dim
        self.levels = nn.ModuleDict()
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, float] = {}
        for scale in scales:
            name = level_name(patch / scale)
            stage, width = _rescale(dim, scale)
            if out_channels is not None:
                stage, width = nn.Sequential(stage, _vitdet_convs(width, out_channels)), out_channels
            self.levels[name] = stage
            self.out_channels[name] = width
            self.strides[name] = patch / scale
        self._sincos_cache: dict[tuple, Tensor] = {}

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, gh * gw, D): the encoder's patch position table, for ``grid``."""
        table = self.encoder.pos_embed[:, 1:]  # (1, L, D), the cls row dropped
        src = tuple(self.encoder.grid_size)
        if grid == src:
            return table
        if is_sincos(table, src):
            key = (grid, table.device, table.dtype)
            if key not in self._sincos_cache:
                self._sincos_cache[key] = sincos_2d(table.shape[-1], grid).unsqueeze(0).to(table)
            return self._sincos_cache[key]
        return resample_pos_embed(table, src, grid, prefix=0)

    def forward_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images (N, C, H, W) -> (patch tokens after the final norm (N, gh * gw, D), grid (gh, gw))."""
        enc = self.encoder
        p = enc.patch_size
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
        # the patch conv itself: PatchEmbed.forward accepts only the built image size
        x = enc.patch_embed.proj(images)  # (N, D, gh, gw)
        n, _, gh, gw = x.shape
        grid = (gh, gw)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding(grid).to(x.dtype)  # (N, L, D)
        x = enc.with_cls(x)  # (N, 1 + L, D)
        mask = None
        if any(self.windowed):
            mask = window_attention_mask(grid, self.window_size, 0)  # (nW, w*w, w*w) or None
            if mask is not None:
                mask = mask.to(x.device).repeat(n, 1, 1).unsqueeze(1)  # (N * nW, 1, w*w, w*w)
        for blk, windowed in zip(enc.blocks, self.windowed):
            if not windowed:
                x = blk(x)
                continue
            windows = window_partition(x[:, 1:], grid, self.window_size, 0)  # (N * nW, w*w, D)
            tokens = window_merge(blk(windows, attn_mask=mask), grid, self.window_size, 0)  # (N, L, D)
            x = torch.cat([x[:, :1], tokens], dim=1)
        return enc.norm(x[:, 1:]), grid

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(N, C, H, W) -> {name: (N, out_channels[name], ceil(H / s), ceil(W / s))}, fine to coarse."""
        tokens, grid = self.forward_tokens(images)
        n, _, d = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(n, d, *grid)  # (N, D, gh, gw), stride p
        maps = {name: stage(fmap) for name, stage in self.levels.items()}
        return crop_levels(maps, self.strides, images.shape[-2:])


# -- ConvViT: ConvMAE's stages ---------------------------------------------------------------------


class ConvViTPyramid(Pyramid):
    """ConvMAE's E1 (stride 4), E2 (8), E3 (16) and E4 (32, a 2x2 max-pool of E3) from
    :meth:`ConvViT.forward_pyramid`, each through a LayerNorm of its own, as p2-p5.

    Window attention in stage 3 is a ConvViT constructor option (``window_size``, ``global_blocks``,
    ``shifted_windows``): pass them to ``build_dense_encoder``. Inputs smaller than the encoder's
    ``img_size`` are zero-padded to it, larger ones refused.
    """

    def __init__(self, encoder: ConvViT):
        super().__init__()
        check_headless(encoder)
        self.encoder = encoder
        self.stage_names = {level_name(s): stage for stage, s in encoder.pyramid_strides.items()}
        self.strides = {name: float(encoder.pyramid_strides[stage]) for name, stage in self.stage_names.items()}
        self.out_channels = {name: encoder.pyramid_channels[stage] for name, stage in self.stage_names.items()}
        self.norms = nn.ModuleDict({name: LayerNorm2d(c) for name, c in self.out_channels.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(N, C, H, W), H, W <= the encoder's img_size -> {p2..p5: (N, C_i, ceil(H / s), ceil(W / s))}."""
        maps = self.encoder.forward_pyramid(pad_to(images, self.encoder.img_size))
        maps = {name: self.norms[name](maps[stage]) for name, stage in self.stage_names.items()}
        return crop_levels(maps, self.strides, images.shape[-2:])


# -- Swin: its stages ------------------------------------------------------------------------------


class SwinPyramid(Pyramid):
    """The output of every Swin stage (timm's ``forward_intermediates``, NHWC turned NCHW): strides
    patch * 2^i, widths C * 2^i. Earlier stages get a LayerNorm each (as Swin's detection and
    segmentation backbones); the last takes the encoder's own pretrained final norm. Inputs smaller
    than the encoder's ``img_size`` are zero-padded to it, larger ones refused.
    """

    def __init__(self, encoder: SwinEncoder):
        super().__init__()
        check_headless(encoder)
        self.encoder = encoder
        info = encoder.feature_info  # timm: one {num_chs, reduction, module} per stage
        self.strides = {level_name(f["reduction"]): float(f["reduction"]) for f in info}
        self.out_channels = {level_name(f["reduction"]): int(f["num_chs"]) for f in info}
        names = list(self.strides)
        self.norms = nn.ModuleDict({name: LayerNorm2d(self.out_channels[name], eps=1e-5) for name in names[:-1]})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(N, C, H, W), H, W <= the encoder's img_size -> {name: (N, C_i, ceil(H / s), ceil(W / s))}."""
        stages = self.encoder.forward_intermediates(
            pad_to(images, self.encoder.img_size), norm=True, intermediates_only=True
        )  # [(N, C_i, h_i, w_i)], the last after the final norm
        maps = {name: self.norms[name](x) if name in self.norms else x for name, x in zip(self.strides, stages)}
        return crop_levels(maps, self.strides, images.shape[-2:])


# -- dispatch --------------------------------------------------------------------------------------


def build_pyramid(
    encoder: nn.Module,
    scale_factors: Sequence[float] = VIT_SCALE_FACTORS,
    window_size: int = 0,
    global_blocks: Sequence[int] | None = None,
    out_channels: int | None = None,
) -> Pyramid:
    """The pyramid for an encoder: :class:`ViTPyramid`, :class:`ConvViTPyramid` or :class:`SwinPyramid`.

    Args:
        encoder: a headless ViT, ConvViT or Swin (``build_dense_encoder``).
        scale_factors, window_size, global_blocks, out_channels: the ViT pyramid's options (see
            :class:`ViTPyramid`); ConvViT takes its windows as constructor arguments, Swin has its own.
    Returns:
        A module mapping (N, C, H, W) images to an ordered dict of NCHW maps, with ``out_channels``,
        ``strides`` and ``encoder``.
    """
    if isinstance(encoder, ViTEncoder):
        return ViTPyramid(encoder, scale_factors, window_size, global_blocks, out_channels)
    vit_options = {
        "window_size": window_size != 0,
        "global_blocks": global_blocks is not None,
        "out_channels": out_channels is not None,
        "scale_factors": tuple(scale_factors) != VIT_SCALE_FACTORS,
    }
    given = [k for k, v in vit_options.items() if v]
    kind = type(encoder).__name__
    if given:
        hint = "pass window_size / global_blocks to build_dense_encoder" if isinstance(encoder, ConvViT) else ""
        raise ValueError(f"{', '.join(given)} apply to the ViT pyramid only, not to a {kind}; {hint or 'drop them'}")
    if isinstance(encoder, ConvViT):
        return ConvViTPyramid(encoder)
    if isinstance(encoder, SwinEncoder):
        return SwinPyramid(encoder)
    raise ValueError(
        f"no pyramid for a {kind}: pass a ViT, ConvViT or Swin encoder (build_dense_encoder builds one from a "
        "registered name or a checkpoint)"
    )


__all__ = [
    "VIT_SCALE_FACTORS",
    "ConvViTPyramid",
    "Pyramid",
    "SwinPyramid",
    "ViTPyramid",
    "build_pyramid",
    "crop_levels",
    "level_name",
    "pad_to",
    "resample_pos_embed",
]
