"""The precision context, chosen once: autocast where it helps, a scaler only for fp16."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str  # "bf16", "fp16" or "fp32"
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        # a no-op unless fp16: bf16 has fp32's exponent range and needs no loss scaling
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast on CPU (2-3.5x faster than fp32 for ViT blocks, see
    benchmarks/pretrain_speed.py) and on GPUs that support bf16; fp16 with a scaler on older GPUs."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            spec = "bf16"
        else:
            spec = "fp32"
    return Precision(spec, device)
