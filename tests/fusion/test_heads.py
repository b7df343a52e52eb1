import pytest
import torch

from fusion.heads import ClassificationHead


@pytest.mark.parametrize("hidden", [(), (16,), (16, 8)])
def test_head_shapes_and_gradients(hidden):
    head = ClassificationHead(12, 10, hidden=hidden, dropout=0.1)
    out = head(torch.randn(4, 12))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation must be one of"):
        ClassificationHead(4, 2, hidden=(3,), activation="swishy")
