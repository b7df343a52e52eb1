"""Every fusion method behind one contract: `fuser(features, present) -> Tensor[B, out_dim]`.

| module | fusers |
|---|---|
| simple.py | ConcatFuser, SumFuser, MeanFuser, GatedFuser (GMU), AttentionFuser (weights per modality) |
| film.py | FiLMFuser (one modality modulates the others) |
| tensor.py | TensorFuser (TFN), LowRankFuser (LMF), BilinearFuser (multiplicative interactions) |
| transformer.py | TransformerFuser (modality tokens + fusion token), CrossAttentionFuser |
| late.py | LateFusion (one classifier per modality, predictions combined) |
"""

from fusion.fusers.base import Fuser
from fusion.fusers.film import FiLMFuser
from fusion.fusers.late import LateFusion
from fusion.fusers.simple import AttentionFuser, ConcatFuser, GatedFuser, MeanFuser, SumFuser
from fusion.fusers.tensor import BilinearFuser, LowRankFuser, TensorFuser
from fusion.fusers.transformer import CrossAttentionFuser, TransformerFuser

__all__ = [
    "AttentionFuser",
    "BilinearFuser",
    "ConcatFuser",
    "CrossAttentionFuser",
    "FiLMFuser",
    "Fuser",
    "GatedFuser",
    "LateFusion",
    "LowRankFuser",
    "MeanFuser",
    "SumFuser",
    "TensorFuser",
    "TransformerFuser",
]
