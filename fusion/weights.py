"""Load weights into a module and report exactly what matched."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoadReport:
    """What a load did: keys loaded, and every key that did not fit."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.mismatched)


def load_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = "",
    strict: bool = True,
) -> LoadReport:
    """Load the entries of `state_dict` under `prefix` into `module`.

    With `strict`, anything missing or shape-mismatched raises with the offending keys;
    a silent partial load is the bug this function exists to prevent.
    """
    source = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    target = module.state_dict()
    report = LoadReport()
    matched = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif target[key].shape != value.shape:
            report.mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}"
            )
        else:
            matched[key] = value
            report.loaded.append(key)
    report.missing = [k for k in target if k not in source]
    if strict and not report.complete:
        raise ValueError(
            f"loading {type(module).__name__} from prefix '{prefix}' is incomplete: "
            f"missing {report.missing[:5]}{'...' if len(report.missing) > 5 else ''}, "
            f"shape-mismatched {report.mismatched[:5]}"
        )
    module.load_state_dict(matched, strict=False)
    return report
