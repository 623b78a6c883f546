"""Where and how a run computes: the device, the process group and the precision, decided once.

Training, evaluation, kNN and feature extraction all take a :class:`Runtime` instead of setting
these up again. :meth:`Runtime.create` is the one place that joins a torchrun process group, so
building a trainer or a model never does it as a side effect.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from openmae.distributed import DistInfo, init_distributed, resolve_device
from openmae.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    precision: Precision = field(default_factory=lambda: Precision("fp32", torch.device("cpu")))

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """Resolve ``device`` (auto: this rank's GPU, else CPU), join the process group when launched by
        torchrun, and pick the precision (auto: see :func:`openmae.precision.resolve_precision`)."""
        dev = resolve_device(device)
        return cls(dev, init_distributed(dev), resolve_precision(precision, dev))

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()
