"""Tabular encoder: numeric columns plus embedded category codes, in one float tensor."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusion.encoders.tabular import build_tabular_encoder, default_embedding_dim

CONFIG = Path(__file__).resolve().parents[2] / "configs/model/encoder/tabular/mlp.yaml"


def table(batch: int, num_numeric: int, cardinalities: list[int]) -> torch.Tensor:
    numeric = torch.randn(batch, num_numeric) * 100 + 5  # unscaled on purpose
    codes = [torch.randint(0, c, (batch, 1)).float() for c in cardinalities]
    return torch.cat([numeric, *codes], dim=1)


def test_shapes_and_default_embedding_sizes():
    enc = build_tabular_encoder(3, [2, 7, 200], hidden=[32, 16])
    assert enc.input_shape == (6,) and enc.out_dim == 16
    assert [e.embedding_dim for e in enc.backbone.columns.embeddings] == [1, 4, 50]
    assert enc(table(5, 3, [2, 7, 200])).shape == (5, 16)
    assert default_embedding_dim(10) == 5


def test_every_parameter_gets_a_gradient():
    enc = build_tabular_encoder(3, [4, 5], embedding_dim=3, hidden=[8, 8], dropout=0.1)
    enc(table(6, 3, [4, 5])).pow(2).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"


def test_changing_a_category_changes_the_output():
    enc = build_tabular_encoder(2, [3, 4]).eval()
    x = table(1, 2, [3, 4])
    x[0, 3] = 0
    y = x.clone()
    y[0, 3] = 2
    assert not torch.allclose(enc(x), enc(y))


def test_out_of_range_code_names_column_code_and_cardinality():
    enc = build_tabular_encoder(2, [3, 4])
    x = table(4, 2, [3, 4])
    x[2, 3] = 4
    with pytest.raises(
        ValueError, match=r"column 3 \(categorical column 1\) holds code 4 in row 2"
    ):
        enc(x)
    x[2, 3] = 0
    x[1, 2] = -1
    with pytest.raises(ValueError, match=r"code -1 .*\[0, 3\) for its cardinality 3"):
        enc(x)
    x[1, 2] = 1.5
    with pytest.raises(ValueError, match=r"code 1\.5 "):
        enc(x)


def test_wrong_width_is_named():
    enc = build_tabular_encoder(2, [3])
    with pytest.raises(ValueError, match=r"\[batch, 3\] \(2 numeric \+ 1 categorical"):
        enc(torch.zeros(4, 4))


@pytest.mark.parametrize(("num_numeric", "cards"), [(0, [3, 5]), (4, []), (1, [1])])
def test_only_numeric_or_only_categorical_columns(num_numeric, cards):
    enc = build_tabular_encoder(num_numeric, cards, hidden=[8])
    out = enc(table(4, num_numeric, cards))
    assert out.shape == (4, 8)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_no_hidden_layers_returns_the_columns():
    enc = build_tabular_encoder(2, [10], embedding_dim=3, hidden=(), normalize_numeric=False)
    assert enc.out_dim == 5
    x = table(2, 2, [10])
    assert torch.equal(enc(x)[:, :2], x[:, :2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_numeric": 0}, "at least one numeric or categorical column"),
        ({"num_numeric": 1, "categorical_cardinalities": [0]}, "cardinalities must be >= 1"),
        ({"num_numeric": 1, "activation": "swish"}, r"activation must be one of \["),
        ({"num_numeric": 1, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"num_numeric": 1, "hidden": [0]}, "hidden sizes must be >= 1"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tabular_encoder(**kwargs)


def test_config_instantiates_once_the_data_sets_the_columns():
    cfg = OmegaConf.load(CONFIG)
    assert OmegaConf.is_missing(cfg, "num_numeric")
    cfg.num_numeric, cfg.categorical_cardinalities = 3, [4]
    enc = instantiate(cfg)
    assert enc.input_shape == (4,) and enc(table(2, 3, [4])).shape == (2, 64)
