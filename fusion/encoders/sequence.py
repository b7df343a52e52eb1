"""Sequence encoders for pre-extracted feature sequences: [B, T, D] in, [B, H] or [B, T, H] out.

Public affect benchmarks (CMU-MOSI, CMU-MOSEI, UR-FUNNY, MUStARD as MultiBench packs them)
ship features, not raw signals: GloVe vectors per word, facial descriptors and acoustic
descriptors per step. A small GRU (MultiBench's baseline encoder) or transformer over the
steps is the encoder for them.

Sequences in a batch have different lengths: `collate` pads them at the end and gives a
[B, T] mask, True at real steps, which the model hands to `forward(x, mask)`. Padding has
no influence on any output whatever it holds (NaN included): padded steps are zeroed before
the network sees them, the GRU runs on packed sequences, the transformer masks them out of
attention, and pooling reads real steps only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusion import surgery
from fusion.checks import dropout_rate, positive_int
from fusion.encoders.base import Encoder, apply_freeze

KINDS = ("gru", "transformer")
POOLINGS = ("last", "mean", "none")
EXAMPLE_LENGTH = 8
"""Steps of the dry-run input when `max_length` does not fix the length."""


class GRUSequence(nn.Module):
    """A GRU over the real steps: [B, T, D] and a prefix mask [B, T] -> per-step outputs
    [B, T, H] and the final state [B, H] (H = hidden, doubled when bidirectional).

    Sequences are packed, so the recurrence stops at each one's last real step and the
    backward direction starts there; this needs the real steps first (right padding, as
    `collate` pads).
    """

    def __init__(
        self, input_dim: int, hidden: int, layers: int, bidirectional: bool, dropout: float
    ) -> None:
        super().__init__()
        self.rnn = nn.GRU(
            input_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(
                "a GRU sequence encoder needs the real steps of each sequence first and the "
                "padding after them (a mask that is True on a prefix of each row)"
            )
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # an empty row runs one step of zeros
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        steps, final = self.rnn(packed)
        tokens, _ = pad_packed_sequence(steps, batch_first=True, total_length=x.shape[1])
        directions = 2 if self.rnn.bidirectional else 1
        last = torch.cat(list(final[-directions:]), dim=-1)  # the top layer's directions
        return tokens, last


class TransformerSequence(nn.Module):
    """A pre-norm transformer encoder over the steps: [B, T, D] and a mask [B, T] ->
    per-step outputs [B, T, H] and the output at each sequence's last real step [B, H].

    Steps are projected to `hidden` and given fixed sinusoidal positions (Vaswani et al.,
    2017), so no sequence length is built in. Padded steps are masked out of attention.
    """

    def __init__(self, input_dim: int, hidden: int, layers: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.project = nn.Linear(input_dim, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)
        h = h + sinusoidal_positions(x.shape[1], h.shape[-1], h.device, h.dtype)
        # a row with no real step attends to its zeros: attending to nothing gives NaN
        attend = mask | ~mask.any(dim=1, keepdim=True)
        tokens = self.layers(h, src_key_padding_mask=~attend)
        steps = torch.arange(mask.shape[1], device=mask.device)
        last_step = (mask.long() * steps).argmax(dim=1)
        return tokens, tokens[torch.arange(len(tokens), device=tokens.device), last_step]


def sinusoidal_positions(
    length: int, dim: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[length, dim] fixed position codes: sines and cosines of geometrically spaced
    frequencies (Vaswani et al., 2017, section 3.5)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return codes.to(dtype)


class SequenceBackbone(nn.Module):
    """A sequence network and its pooling: [B, T, D] and [B, T] mask -> [B, H] or [B, T, H].

    `pooling`: "last" (the GRU's final state; the transformer's output at the last real
    step), "mean" (over real steps) or "none" (every step, zeros at padding). A sample with
    no real step gets zeros.
    """

    def __init__(self, network: nn.Module, pooling: str, dropout: float) -> None:
        super().__init__()
        self.network = network
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        tokens, last = self.network(x, mask)
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.pooling == "none":
            return self.dropout(tokens)
        if self.pooling == "mean":
            counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
            pooled = tokens.sum(dim=1) / counts
        else:
            pooled = last.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)
        return self.dropout(pooled)


class SequenceEncoder(Encoder):
    """An Encoder of feature sequences [B, T, D] with any T; `forward(x, mask)` takes the
    padding mask.

    `mask` is [B, T] bool, True at real steps (what `collate` gives for padded sequences),
    [B] (whole samples present or not), or None (every step real). With `max_length`,
    sequences are cut to their first `max_length` steps and padded up to it, so token
    output is always [B, max_length, H] (a fixed shape the feature cache can store); the
    builder requires it for token output.
    """

    takes_mask = True

    def __init__(
        self,
        backbone: SequenceBackbone,
        input_dim: int,
        max_length: int | None = None,
        post: nn.Module | None = None,
    ) -> None:
        self.input_dim = input_dim
        self.max_length = max_length
        self.pooling = backbone.pooling
        super().__init__(backbone, (max_length or EXAMPLE_LENGTH, input_dim), post=post)

    def check_input(self, x: Any, modality: str) -> None:
        """Any number of steps is fine; the feature size must be `input_dim`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"modality '{modality}': expected a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.input_dim:
            raise ValueError(
                f"modality '{modality}': expected a tensor of shape [batch, steps, "
                f"{self.input_dim}], got {list(x.shape)}"
            )

    def step_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The [B, T] bool mask of real steps, from a [B, T], [B] or absent mask."""
        batch, steps = x.shape[:2]
        if mask is None:
            return torch.ones(batch, steps, dtype=torch.bool, device=x.device)
        mask = mask.to(device=x.device, dtype=torch.bool)
        if mask.shape == (batch,):
            return mask.unsqueeze(1).expand(batch, steps)
        if mask.shape != (batch, steps):
            raise ValueError(
                f"a sequence mask must be [{batch}, {steps}] or [{batch}] for input "
                f"{list(x.shape)}, got {list(mask.shape)}"
            )
        return mask

    def fit_length(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut or pad input and mask to `max_length` steps (unchanged without it)."""
        if self.max_length is None:
            return x, mask
        x, mask = x[:, : self.max_length], mask[:, : self.max_length]
        missing = self.max_length - x.shape[1]
        if missing > 0:
            x = nn.functional.pad(x, (0, 0, 0, missing))
            mask = nn.functional.pad(mask, (0, missing), value=False)
        return x, mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.fit_length(x, self.step_mask(x, mask))
        out = self.post(self.backbone(self.pre(self.preprocess(x)), mask))
        if self.pooling == "none":  # `post` may have given padded steps values again
            return out.masked_fill(~mask.unsqueeze(-1), 0.0)
        return out

    def output_mask(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T'] (True at real steps) for token output; [B] (any real step) when pooled."""
        _, mask = self.fit_length(x, self.step_mask(x, present))
        return mask if self.pooling == "none" else mask.any(dim=1)


def build_sequence_encoder(
    input_dim: int,
    kind: str = "gru",
    hidden: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    heads: int = 4,
    dropout: float = 0.0,
    pooling: str = "last",
    max_length: int | None = None,
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
) -> SequenceEncoder:
    """A GRU or transformer encoder of [B, T, input_dim] feature sequences.

    `kind="gru"`: `layers` stacked GRU layers of `hidden` units (`bidirectional` doubles
    the output); `kind="transformer"`: `layers` pre-norm transformer layers of width
    `hidden` with `heads` attention heads. `pooling` picks [B, H] ("last", "mean") or
    [B, max_length, H] ("none") output; `dropout` applies between layers and to the
    output. `max_length` cuts longer sequences to their first steps and pads token output
    to it (required with pooling="none"). `post` and `freeze` are the surgery options
    every encoder builder shares ("backbone" freezes all but `post`).
    """
    input_dim = positive_int("input_dim", input_dim)
    hidden = positive_int("hidden", hidden)
    layers = positive_int("layers", layers)
    heads = positive_int("heads", heads)
    max_length = positive_int("max_length", max_length, allow_none=True)
    dropout = dropout_rate(dropout)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got '{pooling}'")
    if pooling == "none" and max_length is None:
        raise ValueError(
            "pooling='none' (token output) needs max_length: tokens are padded to it, so "
            "every batch has the shape [B, max_length, H] that out_shape and the feature "
            "cache rely on"
        )
    if kind == "gru":
        network: nn.Module = GRUSequence(input_dim, hidden, layers, bidirectional, dropout)
    elif bidirectional:
        raise ValueError("bidirectional applies to kind='gru'; a transformer sees both ways")
    else:
        network = TransformerSequence(input_dim, hidden, layers, heads, dropout)
    backbone = SequenceBackbone(network, pooling, dropout)
    encoder = SequenceEncoder(
        backbone, input_dim, max_length, post=surgery.build_layers(post, "post")
    )
    return apply_freeze(encoder, freeze)
