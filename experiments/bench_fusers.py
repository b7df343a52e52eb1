"""Benchmark tensor fusion (TFN) against low-rank fusion (LMF) as the feature size grows.

    python -m experiments.bench_fusers [--dims 16 32 64 128 256] [--modalities 2 3] [--batch 64]
        [--rank 4] [--out-dim 64] [--repeats 10] [--warmup 2] [--out PATH]

Both fusers see the raw features, every modality of size d: TFN runs with
`dim_per_modality=None`, so its outer product has (d + 1)^M entries, which is the growth LMF
exists to avoid (a TFN with a projection to a fixed size would hide it). For each (M, d) and
fuser it reports the parameter count, the median time of forward + `.sum().backward()`, and a
memory figure:

- `est_mib` (always): parameter bytes + the bytes of the largest intermediate tensor, computed
  analytically for float32 (TFN: the [batch, (d + 1)^M] outer product; LMF: the
  [batch, rank, out_dim] product of the per-modality terms). An estimate, not a measurement.
- `cuda_peak_mib` (on CUDA only): torch.cuda.max_memory_allocated over one forward + backward.

A TFN whose tensor is over the fuser's size limit is recorded as "too large", not run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarking import (
    default_device,
    machine_info,
    markdown_table,
    median_ms,
    write_json,
)
from fusion.fusers import Fuser, LowRankFuser, TensorFuser

FLOAT_BYTES = 4
MIB = 2**20


def build(name: str, in_dims: dict[str, int], args: argparse.Namespace) -> Fuser:
    if name == "TFN":
        return TensorFuser(in_dims, dim_per_modality=None, out_dim=args.out_dim)
    return LowRankFuser(in_dims, out_dim=args.out_dim, rank=args.rank)


def largest_intermediate(name: str, in_dims: dict[str, int], args: argparse.Namespace) -> int:
    """Entries of the biggest tensor the forward builds, which dominates activation memory."""
    if name == "TFN":
        return args.batch * math.prod(d + 1 for d in in_dims.values())
    return args.batch * max(args.rank * args.out_dim, *(d + 1 for d in in_dims.values()))


def fwd_bwd(fuser: Fuser, features: dict[str, torch.Tensor]) -> None:
    fuser(features).sum().backward()
    fuser.zero_grad(set_to_none=True)


def cuda_peak_mib(fuser: Fuser, features: dict[str, torch.Tensor], device: torch.device) -> float:
    torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd(fuser, features)
    return torch.cuda.max_memory_allocated(device) / MIB


def bench_one(
    name: str, modalities: int, dim: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One row; a TFN over its size limit becomes a "too large" row instead of a crash."""
    in_dims = {f"m{i}": dim for i in range(modalities)}
    row: dict[str, Any] = {"modalities": modalities, "dim": dim, "fuser": name}
    try:
        fuser = build(name, in_dims, args).to(device)
    except ValueError as error:
        return row | {"status": "too large", "error": str(error)}
    features = {m: torch.randn(args.batch, d, device=device) for m, d in in_dims.items()}
    params = sum(p.numel() for p in fuser.parameters())
    row |= {
        "status": "ok",
        "params": params,
        "fwd_bwd_ms": median_ms(
            partial(fwd_bwd, fuser, features), args.repeats, args.warmup, device
        ),
        "est_mib": (params + largest_intermediate(name, in_dims, args)) * FLOAT_BYTES / MIB,
    }
    if device.type == "cuda":
        row["cuda_peak_mib"] = cuda_peak_mib(fuser, features, device)
    return row


def table_row(row: dict[str, Any]) -> list[object]:
    key = [row["modalities"], row["dim"], row["fuser"]]
    if row["status"] != "ok":
        return [*key, "-", row["status"], "-", "-"]
    peak = f"{row['cuda_peak_mib']:.1f}" if "cuda_peak_mib" in row else "-"
    return [*key, f"{row['params']:,}", f"{row['fwd_bwd_ms']:.3f}", f"{row['est_mib']:.1f}", peak]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--modalities", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/fusers.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = default_device()
    rows = [
        bench_one(name, modalities, dim, args, device)
        for modalities in args.modalities
        for dim in args.dims
        for name in ("TFN", "LMF")
    ]
    headers = ["M", "d", "fuser", "params", "fwd+bwd ms", "est MiB", "CUDA peak MiB"]
    print(markdown_table(headers, [table_row(row) for row in rows]))
    print("est MiB = parameters + largest intermediate tensor, float32, computed analytically")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, {"machine": machine_info(device), "config": config, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
