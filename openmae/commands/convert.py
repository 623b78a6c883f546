"""``openmae convert SRC DST --to FORMAT``: rewrite a checkpoint in another format."""

from __future__ import annotations

from dataclasses import dataclass

from openmae.config import REQUIRED, check_choices, opt
from openmae.interop import FORMATS

DESCRIPTION = "Read SRC in any supported format (detected) and write it to DST in the --to format."


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

    def __post_init__(self) -> None:
        check_choices(self, "convert")


def run(s: ConvertSettings) -> str:
    from openmae.interop import create_model, export_pretrained, load, load_weights_into

    if s.model:
        model = create_model(s.model, **s.overrides)
        report = load_weights_into(model, s.src)
    else:
        model, report = load(s.src, **s.overrides)
    print(report.summary())
    options = {"key_style": s.key_style} if s.to == "hf" else {}
    written = export_pretrained(model, s.dst, format=s.to, **options)
    return f"wrote {s.to}: {written}"
