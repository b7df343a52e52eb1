"""MultimodalModel: each modality through its own encoder, then a fuser, then a head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fusion.encoders.base import Encoder
from fusion.fusers import Fuser
from fusion.summary import summarize

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

    def example_inputs(self, batch_size: int = 2) -> dict[str, Any]:
        """A batch every encoder accepts, on the model's device, for dry runs."""
        device = next(self.parameters()).device
        return {
            m: x.to(device) if isinstance(x, torch.Tensor) else x
            for m, enc in self.encoders.items()
            for x in [enc.example_input(batch_size)]
        }

    def summary(self, max_depth: int = 4) -> str:
        """Keras-style table: each module's type, output shape, parameters, trainable."""
        inputs = self.example_inputs()
        return summarize(self, lambda: self(inputs), max_depth=max_depth)
