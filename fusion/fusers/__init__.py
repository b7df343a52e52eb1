"""Every fusion method behind one contract: `fuser(features, present) -> Tensor[B, out_dim]`.

| module | fusers |
|---|---|
| simple.py | ConcatFuser, SumFuser, MeanFuser, GatedFuser (GMU), AttentionFuser (weights per modality) |
| film.py | FiLMFuser (one modality modulates the others) |
| tensor.py | TensorFuser (TFN), LowRankFuser (LMF), BilinearFuser (multiplicative interactions) |
| pooling.py | MLBFuser, MFBFuser, MFHFuser, MutanFuser, BlockFuser (the bilinear-pooling family) |
| transformer.py | TransformerFuser (modality tokens + fusion token), CrossAttentionFuser |
| mult.py | MulTFuser (crossmodal transformers for every ordered pair of modalities) |
| bottleneck.py | BottleneckFuser (MBT: streams that meet only through bottleneck tokens) |
| late.py | LateFusion (one classifier per modality, predictions combined) |
"""

from fusion.fusers.base import Fuser
from fusion.fusers.bottleneck import BottleneckFuser
from fusion.fusers.film import FiLMFuser
from fusion.fusers.late import LateFusion
from fusion.fusers.mult import MulTFuser
from fusion.fusers.pooling import BlockFuser, MFBFuser, MFHFuser, MLBFuser, MutanFuser
from fusion.fusers.simple import AttentionFuser, ConcatFuser, GatedFuser, MeanFuser, SumFuser
from fusion.fusers.tensor import BilinearFuser, LowRankFuser, TensorFuser
from fusion.fusers.transformer import CrossAttentionFuser, TransformerFuser

__all__ = [
    "AttentionFuser",
    "BilinearFuser",
    "BlockFuser",
    "BottleneckFuser",
    "ConcatFuser",
    "CrossAttentionFuser",
    "FiLMFuser",
    "Fuser",
    "GatedFuser",
    "LateFusion",
    "LowRankFuser",
    "MFBFuser",
    "MFHFuser",
    "MLBFuser",
    "MeanFuser",
    "MulTFuser",
    "MutanFuser",
    "SumFuser",
    "TensorFuser",
    "TransformerFuser",
]
