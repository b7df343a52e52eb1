"""The Encoder contract: raw modality tensor in, feature vector out, sizes known up front."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusion.surgery import set_trainable


class Encoder(nn.Module):
    """Preprocessing + backbone for one modality, with its input and output sizes known.

    `input_shape` is the per-sample shape the encoder accepts (no batch dimension), so a
    model can reject a wrong tensor with a message that names the modality. `out_dim` is
    found by a dry run through the backbone, never computed by hand.
    """

    def __init__(
        self,
        backbone: nn.Module,
        input_shape: Sequence[int],
        preprocess: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.backbone = backbone
        self.input_shape = tuple(int(d) for d in input_shape)
        self.frozen = False
        self.out_dim = self._infer_out_dim()

    @torch.no_grad()
    def _infer_out_dim(self) -> int:
        was_training = self.training
        self.eval()
        probe = torch.zeros(2, *self.input_shape)
        out = self.forward(probe)
        self.train(was_training)
        if out.dim() != 2:
            raise ValueError(
                f"{type(self.backbone).__name__} produced features of shape {tuple(out.shape)}; "
                "an Encoder must produce [batch, features]"
            )
        return int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))

    def freeze(self) -> Encoder:
        """Stop training this encoder: no gradients, and eval mode even under `model.train()`.

        Eval mode matters as much as `requires_grad`: a frozen encoder must not update its
        batch-norm statistics or apply dropout, or its "frozen" features would still drift.
        """
        set_trainable(self, False)
        self.frozen = True
        return self.train(self.training)

    def unfreeze(self) -> Encoder:
        set_trainable(self, True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self.frozen)
