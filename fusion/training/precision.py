"""Numeric precision of training: float32, or mixed precision with autocast."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("32", "bf16", "fp16")
_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How forward passes compute on one device type.

    `"bf16"` autocasts matrix products and convolutions to bfloat16 (CPU or GPU): float32's
    range, so no loss scaling. `"fp16"` autocasts to float16 on a GPU, with a gradient
    scaler so that small gradients do not underflow. `"32"` is plain float32.
    """

    name: str = "32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.name}'")
        if self.name == "fp16" and self.device_type != "cuda":
            raise ValueError(
                f"precision 'fp16' needs a CUDA device (its gradient scaler and fast kernels "
                f"are GPU-only), this run is on '{self.device_type}'; use 'bf16' there"
            )

    @classmethod
    def on(cls, name: str, device: torch.device) -> Precision:
        return cls(str(name), device.type)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that only acts for fp16; for the others its calls pass straight through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


FLOAT32 = Precision()
