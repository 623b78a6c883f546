"""``openmae reconstruct``: reconstruction figures (MAE paper, Figures 2-4) from a checkpoint."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from openmae.config import REQUIRED, ConfigError, check_choices, check_output_file, check_types, device_opt, opt
from openmae.masking import MASK_TYPES
from openmae.reconstruction import UNNORMALIZE_MODES

DESCRIPTION = (
    "Reconstruct images with a pretrained MAE: one figure row per image and mask ratio, columns original, masked "
    "input, reconstruction, reconstruction with the visible patches pasted back. The model runs in fp32."
)


@dataclass
class ReconstructSettings:
    """Settings of ``openmae reconstruct``."""

    image_or_folder: str = opt(REQUIRED, "an image file or a folder of images", positional=True)
    checkpoint: str = opt(REQUIRED, "anything openmae.load_pretrained reads (with the decoder)")
    out: str = opt(REQUIRED, "PNG file to write")
    mask_ratio: list[float] = opt([0.75], "one or more ratios, e.g. 0.75 0.85 0.95")
    mask_type: str = opt("random", "mask sampler (grid ignores the ratio)", alias="--mask", choices=MASK_TYPES)
    seed: int = opt(0, "seed of the masks: the same seed gives the same figure")
    unnormalize: str = opt(
        "auto", "norm-pix models: head (the model's pixel head, when pretrained with one), visible (un-normalise "
        "with visible-patch statistics), dataset (dataset statistics) or none (the normalised view); auto: head "
        "if the model has one, else visible", choices=UNNORMALIZE_MODES,
    )
    max_images: int = opt(8, "use at most this many images of a folder")
    mean: list[float] | None = opt(
        None, "per-channel normalisation mean (default: the checkpoint's, else ImageNet for RGB, Fashion-MNIST for "
        "grayscale)"
    )
    std: list[float] | None = opt(None, "per-channel normalisation std (see --mean)")
    bands: list[int] | None = opt(
        None, "the channels to show, 0-based: three as R G B (e.g. 3 2 1 for Sentinel-2's true colour) or one as "
        "gray; default all of 1- or 3-channel images, the first three bands of multi-band ones (each band "
        "stretched to its 2-98% range)"
    )
    norm_pix_loss: bool | None = opt(
        None, "whether the model was trained on per-patch normalised targets; only needed for files that do not "
        "record it (official MAE and Hugging Face checkpoints)"
    )
    device: str = device_opt()
    allow_partial: bool = opt(
        False, "use a checkpoint that lacks encoder tensors: they keep their initial values and a line names them "
        "(the decoder must be whole either way)"
    )

    def __post_init__(self) -> None:
        check_types(self, "")
        check_choices(self, "reconstruct")
        if self.max_images < 1:
            raise ConfigError("--max-images must be at least 1")
        if not self.mask_ratio or not all(0 <= r < 1 for r in self.mask_ratio):
            raise ConfigError(
                f"--mask-ratio takes ratios in [0, 1), got {self.mask_ratio}: at least one patch must stay visible"
            )
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give --mean and --std together")
        if self.std is not None and min(self.std, default=1) <= 0:
            raise ConfigError(f"--std must be positive (it divides the pixels), got {self.std}")
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 0):
            raise ConfigError(
                f"--bands takes 1 band (gray) or 3 (R G B), each a 0-based index, got {' '.join(map(str, self.bands))}"
            )


def run(s: ReconstructSettings) -> str:
    import torch

    from openmae.data import default_normalization, image_files
    from openmae.distributed import resolve_device
    from openmae.reconstruction import (
        checkpoint_normalization,
        display_bands,
        load_reconstruction_model,
        normalize,
        read_image,
        reconstruct,
    )
    from openmae.visualize import figure_size, save_figure

    check_output_file(s.out, "--out")
    if not Path(s.image_or_folder).exists():
        raise FileNotFoundError(f"no image or folder {s.image_or_folder}; give an image file or a folder of images")
    overrides = {} if s.norm_pix_loss is None else {"norm_pix_loss": s.norm_pix_loss}
    model = load_reconstruction_model(s.checkpoint, allow_partial=s.allow_partial, **overrides)
    if (partial := getattr(getattr(model, "load_report", None), "partial_line", lambda: None)()) is not None:
        print(f"note: {s.checkpoint}: {partial}", file=sys.stderr)
    report = getattr(model, "load_report", None)
    if s.norm_pix_loss is None and report is not None and getattr(report, "norm_pix_loss", True) is None:
        print(
            f"note: {s.checkpoint} does not record whether it was trained with norm-pix targets; "
            f"assuming norm_pix_loss={model.norm_pix_loss} (set --norm-pix-loss true|false)"
        )
    model = model.to(resolve_device(s.device))
    try:
        display_bands(model.in_chans, s.bands)
    except ValueError as e:
        raise ConfigError(f"--bands: {e}") from None

    if s.mean is not None:
        mean, std, source = s.mean, s.std, "--mean/--std"
    elif (found := checkpoint_normalization(s.checkpoint)) is not None:
        (mean, std), source = found, "the checkpoint"
    elif model.in_chans not in (1, 3):
        raise ConfigError(
            f"{s.checkpoint} records no normalisation for its {model.in_chans} bands; pass --mean and --std "
            f"({model.in_chans} values each: the run's config.yaml data.mean / data.std)"
        )
    else:
        (mean, std), source = default_normalization(model.in_chans), "the default for this channel count"

    out = Path(s.out).resolve()
    paths = [p for p in image_files(s.image_or_folder) if p.resolve() != out]  # a rerun into the same folder
    if not paths:
        raise ConfigError(f"no input images in {s.image_or_folder}")
    if len(paths) > s.max_images:
        print(f"using the first {s.max_images} of {len(paths)} images (--max-images)")
        paths = paths[: s.max_images]
    pixels = torch.stack([read_image(p, model.in_chans, model.img_size) for p in paths])  # (N, C, H, W)
    rec = reconstruct(
        model,
        normalize(pixels, mean, std),
        mask_ratios=s.mask_ratio,
        mask_type=s.mask_type,
        seed=s.seed,
        unnormalize=s.unnormalize,
        mean=mean,
        std=std,
    )
    if s.bands is not None or model.in_chans not in (1, 3):
        rec = rec.select_bands(s.bands)
    arch = getattr(model, "arch", type(model).__name__)
    heading = f"{arch} ({s.checkpoint}), {s.mask_type} masks, seed {s.seed}"
    written = save_figure(rec, s.out, titles=[p.name for p in paths], heading=heading)
    width, height = figure_size(rec.panels.shape[0] * rec.panels.shape[1])
    rows = f"{_count(len(paths), 'image')} x {_count(len(rec.mask_ratios), 'mask ratio')}"
    return f"wrote {written} ({width}x{height} px; {rows}; mode {rec.mode}; normalisation from {source})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
