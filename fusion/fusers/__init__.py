"""Every fusion method behind one contract: `fuser(features, present) -> Tensor[B, out_dim]`."""

from fusion.fusers.base import Fuser
from fusion.fusers.simple import ConcatFuser, GatedFuser

__all__ = ["ConcatFuser", "Fuser", "GatedFuser"]
