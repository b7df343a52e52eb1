"""MultimodalModel: each modality through its own encoder, then a fuser, then a head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fusion.encoders.base import Encoder
from fusion.fusers import Fuser
from fusion.surgery import count_parameters

FuserFactory = Callable[..., Fuser]
HeadFactory = Callable[..., nn.Module]


class MultimodalModel(nn.Module):
    """Routes `inputs[modality]` through `encoders[modality]`, fuses, and applies the head.

    The forward pass is written out in full, so what happens to each modality is visible
    in one place. Inputs are checked against each encoder's `input_shape` so that a wrong
    tensor fails with the modality's name rather than deep inside a convolution.
    """

    def __init__(self, encoders: Mapping[str, Encoder], fuser: Fuser, head: nn.Module) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("MultimodalModel needs at least one encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fuser = fuser
        self.head = head
        if list(fuser.in_dims) != list(self.encoders):
            raise ValueError(
                f"fuser was built for modalities {list(fuser.in_dims)}, "
                f"encoders are {list(self.encoders)}"
            )

    @classmethod
    def build(
        cls,
        encoders: Mapping[str, Encoder],
        fuser: FuserFactory,
        head: HeadFactory,
        num_classes: int,
    ) -> MultimodalModel:
        """Wire factories together, feeding each one the sizes of the part before it."""
        fuser_module = fuser(in_dims={m: enc.out_dim for m, enc in encoders.items()})
        head_module = head(in_dim=fuser_module.out_dim, num_classes=num_classes)
        return cls(encoders, fuser_module, head_module)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        for modality, encoder in self.encoders.items():
            if modality not in inputs:
                raise KeyError(
                    f"the model needs modality '{modality}', but the batch only has "
                    f"{sorted(inputs)}"
                )
            encoder.check_input(inputs[modality], modality)

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        return {m: encoder(inputs[m]) for m, encoder in self.encoders.items()}

    def forward(
        self,
        inputs: Mapping[str, Any],
        present: Mapping[str, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features = self.encode(inputs)
        fused = self.fuser(features, present)
        return self.head(fused, condition)

    def summary(self) -> str:
        """One line per part with its parameter counts (total / trainable)."""
        rows = [(f"encoders.{m}", enc) for m, enc in self.encoders.items()]
        rows += [("fuser", self.fuser), ("head", self.head)]
        lines = [f"{'part':<18}{'type':<22}{'params':>12}{'trainable':>12}"]
        for name, module in [*rows, ("total", self)]:
            lines.append(
                f"{name:<18}{type(module).__name__:<22}"
                f"{count_parameters(module):>12,}{count_parameters(module, True):>12,}"
            )
        return "\n".join(lines)
