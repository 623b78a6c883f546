"""``openmae convert SRC DST --to FORMAT``: rewrite a checkpoint in another format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from openmae.config import REQUIRED, ConfigError, check_choices, opt
from openmae.interop import FORMATS

DESCRIPTION = (
    "Read SRC in any supported format (detected) and write it to DST in the --to format. The load is strict: a "
    "SRC that lacks encoder tensors, or part of its decoder, is refused unless --allow-partial. DST is never "
    "replaced unless --overwrite, and never when it is (or is inside) SRC."
)


@dataclass
class ConvertSettings:
    """Settings of ``openmae convert``."""

    src: str = opt(REQUIRED, "checkpoint file or directory", positional=True)
    dst: str = opt(
        REQUIRED, "output file (.safetensors / .pth) or directory (hf, or a timm/openmae folder)", positional=True
    )
    to: str = opt(REQUIRED, "output format", choices=FORMATS)
    model: str | None = opt(None, "registered model to load into, for files that record no architecture")
    overrides: dict = opt(
        {}, "constructor override, e.g. --set num_heads=6 --set norm_pix_loss=true (repeatable)", alias="--set"
    )
    key_style: str = opt("v4", "hf key names: v4 (hub) or v5", choices=("v4", "v5"))
    overwrite: bool = opt(False, "replace DST's files if they exist (never SRC's own)")
    allow_partial: bool = opt(
        False,
        "convert a SRC that lacks encoder tensors (or part of its decoder): they are written at their "
        "initial values, and a report line names them",
    )

    def __post_init__(self) -> None:
        check_choices(self, "convert")


def written_paths(dst: str | os.PathLike, fmt: str) -> list[Path]:
    """The files ``export_pretrained(model, dst, fmt)`` writes: a file, or a folder's config.json and weights."""
    dst = Path(dst)
    if fmt == "official" or (fmt in ("openmae", "timm") and dst.suffix == ".safetensors"):
        return [dst]
    return [dst / "config.json", dst / "model.safetensors"]


def _source_files(src: Path) -> list[Path]:
    """What reading ``src`` may open: the file, or every file of the folder (weights, config, shards)."""
    if src.is_dir():
        return [p for p in src.iterdir() if p.is_file()] + [src]
    return [src]


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # hard links and symlinks too
    return a.resolve() == b.resolve()


def check_destination(s: ConvertSettings) -> None:
    """Refuse, before reading anything, a DST that would replace SRC or (without --overwrite) any file."""
    src, dst = Path(s.src), Path(s.dst)
    targets = written_paths(dst, s.to)
    folder = targets[0].parent if len(targets) > 1 else None
    sources = _source_files(src) if src.exists() else []
    for target in [*targets, *([folder] if folder is not None else [])]:
        if any(_same(target, source) for source in sources):
            raise ConfigError(
                f"convert would write {target}, which is {src} itself or part of it: converting never replaces its "
                "source; choose another DST"
            )
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConfigError(f"{dst} is a file, but --to {s.to} writes a folder there; choose another DST")
    for target in targets:
        if target.is_dir():
            raise ConfigError(f"{target} is a folder, where convert --to {s.to} writes a file; choose another DST")
    existing = [t for t in targets if t.exists()]
    if existing and not s.overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another DST")


def run(s: ConvertSettings) -> str:
    from openmae.interop import create_model, export_pretrained, load, load_weights_into

    check_destination(s)
    if s.model:
        try:
            model = create_model(s.model, **s.overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"cannot build --model {s.model} with --set {s.overrides}: {e}; correct or drop the --set"
            ) from None
        report = load_weights_into(model, s.src, allow_partial=s.allow_partial)
    else:
        model, report = load(s.src, allow_partial=s.allow_partial, **s.overrides)
    print(report.summary())
    options = {"key_style": s.key_style} if s.to == "hf" else {}
    written = export_pretrained(model, s.dst, format=s.to, **options)
    return f"wrote {s.to}: {written}"
