"""The precision context, chosen once: autocast where it helps, a scaler only for fp16."""

from __future__ import annotations

import contextlib
import functools
import time
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


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul is than fp32 on this CPU (measured once, a few ms).

    CPUs with AVX512-BF16/AMX run bf16 autocast 2-3.5x faster than fp32 for ViT blocks; on
    AVX2-only CPUs (e.g. AMD Zen 3) oneDNN has no bf16 kernel and the same matmul is 30-100x
    slower. Flags do not tell the whole story (emulation paths differ), so measure.
    """
    a, b = torch.randn(128, 256), torch.randn(256, 256)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(4):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast where it helps: on GPUs that support it, and on CPUs whose bf16
    matmul is measurably faster than fp32 (:func:`cpu_bf16_speedup`); fp16 with a scaler on older
    GPUs; fp32 otherwise."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            spec = "bf16" if cpu_bf16_speedup() > 1.2 else "fp32"
        else:
            spec = "fp32"
    return Precision(spec, device)
