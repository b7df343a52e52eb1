"""Time every configured fuser's training step, against the same math in plain PyTorch.

    python -m experiments.bench_fusers [--configs concat gated ...] [--modalities 2 3]
        [--dims 32 512] [--batches 32 256] [--tokens 8] [--variants bilinear:rank=null]
        [--rounds 15] [--budget-s 1.5] [--threads 1] [--clock cpu] [--full | --quick]
        [--out PATH]
    python -m experiments.bench_fusers --scaling [--dims 16 32 64 128 256] [--modalities 2 3]
        [--batch 64] [--rank 4] [--out-dim 64] [--repeats 10] [--warmup 2] [--out PATH]

**Every fuser** (the default). Every config in configs/model/fusion/*.yaml, with its settings
as they are and in training mode (dropout on), plus the `--variants` (a config with settings
changed, e.g. the full-rank bilinear tensor), is built for M modalities of d features each
and timed over one training step: forward, backward from a fixed output gradient, gradients
cleared. Vectors [B, d] for every fuser; token sequences [B, T, d] too for the attention
fusers, whose plain reference takes them. Per setting (M, d, batch, T) four steps are timed
side by side, interleaved round by round (`interleaved_ms`), so that a shared machine's slow
spells fall on all four alike:

- `ours`: `fuser(features)`, no masks (every modality present);
- `all_true`: `fuser(features, present)` with masks that are all True, what a loader that
  always sends masks gives for complete data;
- `present`: masks where a quarter of the samples miss each modality (and, for tokens,
  sequences end in padding): the masked path;
- `plain`: the same computation as the minimal PyTorch a peer would write (TorchMultimodal's
  concatenation, MultiBench's TFN and LMF, the papers' equations), without checks or masks,
  on the fuser's own layers (`PLAIN`), so the two run the same arithmetic on the same
  weights: it is checked, in eval mode, to give the same output up to rounding.

Reported per setting: medians in ms per step, and ratios of samples taken side by side
(the median of per-round ratios): ours/plain (our overhead over a peer), present/absent
(the cost of masking) and all_true/absent (the cost of looking at masks). The summary gives,
per fuser and input kind, the medians of those over M and d at each batch size. The goals
(issue 14): ours/plain <= 1.05 at batch 256 and <= 1.2 at batch 32, present/absent <= 1.10.

Times are this thread's CPU time (`--clock cpu`, with `--threads 1` on the CPU: autograd
runs CPU backward on the calling thread), which other jobs on a shared machine do not
inflate; wall time otherwise. A sample times enough steps to last `--min-sample-s`; a
setting gets `--rounds` rounds, fewer (at least 3) when they would take over `--budget-s`.

`--quick` runs every config on tiny sizes with one round, in seconds: a check that the
script works, not a measurement. `--full` runs a larger grid with more rounds. Each mode
writes its own file under `outputs/benchmarks/` (`fusers.json`, `fusers_quick.json`,
`fusers_full.json`, `fusers_scaling.json`) unless `--out` says otherwise.

**TFN against LMF as the feature size grows** (`--scaling`). Both see the raw features,
every modality of size d: TFN runs with `dim_per_modality=None`, so its outer product has
(d + 1)^M entries, which is the growth LMF exists to avoid. For each (M, d) and fuser it
reports the parameter count, the median time of forward + `.sum().backward()`, and a
memory figure: `est_mib`, parameter bytes + the bytes of the largest intermediate tensor,
computed analytically for float32 (TFN: the [batch, (d + 1)^M] outer product; LMF: the
[batch, rank, out_dim] product), and on CUDA `cuda_peak_mib`. A TFN over the fuser's size
limit is recorded as "too large", not run.
"""

from __future__ import annotations

import argparse
import functools
import math
import operator
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

from experiments.benchmarking import (
    default_device,
    interleaved_ms,
    machine_info,
    markdown_table,
    median_ms,
    paired_ratio,
    write_json,
)
from fusion.fusers import (
    AttentionFuser,
    BilinearFuser,
    BlockFuser,
    BottleneckFuser,
    ConcatFuser,
    CrossAttentionFuser,
    FiLMFuser,
    Fuser,
    GatedFuser,
    LateFusion,
    LowRankFuser,
    MeanFuser,
    MFBFuser,
    MFHFuser,
    MLBFuser,
    MulTFuser,
    MutanFuser,
    SumFuser,
    TensorFuser,
    TransformerFuser,
)
from fusion.fusers.mult import sinusoidal_positions

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model" / "fusion"
GOALS = {32: 1.2, 256: 1.05}
"""ours/plain goals by batch size (issue 14); masks present: at most PRESENT_GOAL more."""
PRESENT_GOAL = 1.10
NUM_CLASSES = 10
"""For the fusers that classify (late fusion): the model passes its head's class count."""
FLOAT_BYTES = 4
MIB = 2**20

# --- plain references: the same math as a peer would write it -----------------------------

Plain = Callable[[list[torch.Tensor]], torch.Tensor]


def product(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.mul, tensors)


def total(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, tensors)


def peer_power_l2(z: torch.Tensor) -> torch.Tensor:
    """MFB's and BLOCK's normalization as their authors' code writes it."""
    return F.normalize(torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z)), dim=-1)


def plain_concat(f: ConcatFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    return f.proj(torch.cat(xs, dim=1))


def plain_sum(f: SumFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    return f.dropout(total([f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)]))


def plain_mean(f: MeanFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    projected = [f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)]
    return f.dropout(total(projected) / len(xs))


def plain_gated(f: GatedFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    hidden = torch.stack(
        [torch.tanh(f.proj[m](x)) for m, x in zip(f.modalities, xs, strict=True)], dim=1
    )
    gate = torch.softmax(f.gate(torch.cat(xs, dim=1)).view(-1, len(xs), f.dim), dim=1)
    return f.dropout((gate * hidden).sum(dim=1))


def plain_attention(f: AttentionFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    hidden = torch.stack([f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)], dim=1)
    weights = torch.softmax(f.scorer(hidden).squeeze(-1), dim=1)
    return f.dropout((weights[:, :, None] * hidden).sum(dim=1))


def plain_film(f: FiLMFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    by_name = dict(zip(f.modalities, xs, strict=True))
    out = []
    for m in f.modulated:
        gamma, beta = f.film[m](by_name[f.conditioner]).chunk(2, dim=-1)
        out.append((1 + gamma) * f.proj[m](by_name[m]) + beta)
    return torch.cat(out, dim=1)


def plain_late(f: LateFusion, xs: list[torch.Tensor]) -> torch.Tensor:
    logits = torch.stack(
        [f.classifiers[m](x) for m, x in zip(f.modalities, xs, strict=True)], dim=1
    )
    if f.combine == "logits":
        return logits.mean(dim=1)
    if f.combine == "learned":
        weights = torch.softmax(f.modality_scores, dim=0)
        return (weights[:, None] * logits).sum(dim=1)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=1) - math.log(len(xs))


def plain_tfn(f: TensorFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    """MultiBench's TensorFusion: [x, 1] per modality, outer products by bmm."""
    if f.proj is not None:
        xs = [f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)]
    fused = None
    for x in xs:
        x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        fused = x if fused is None else torch.bmm(fused[:, :, None], x[:, None, :]).flatten(1)
    fused = f.dropout(fused)
    return f.out(fused) if f.out is not None else fused


def plain_lmf(f: LowRankFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    """MultiBench's LowRankTensorFusion: [x, 1] @ factor per modality ([rank, B, out])."""
    fused = product(
        [
            torch.matmul(torch.cat([x, x.new_ones(len(x), 1)], dim=1), factor)
            for x, factor in zip(xs, f.factors, strict=True)
        ]
    )
    return torch.matmul(f.fusion_weights, fused.permute(1, 0, 2)) + f.bias


def plain_bilinear(f: BilinearFuser) -> tuple[Plain, list[nn.Parameter]]:
    """The low-rank form as three matrix products; the full tensor as MultiBench's
    multiplicative interactions store it, [d_x, d_y, out] (its own copy of the weight), so
    that x @ W needs no copy."""
    if f.rank is not None:

        def low_rank(xs: list[torch.Tensor]) -> torch.Tensor:
            x, y = xs[0], torch.cat(xs[1:], dim=1)
            hidden = (x @ f.context_factor.t()) * (y @ f.rest_factor.t())
            return hidden @ f.out_factor + f.context_linear(x) + f.rest_linear(y)

        return low_rank, []
    weight = nn.Parameter(f.weight.detach().permute(1, 2, 0).contiguous())
    context_dim, rest_dim, out_dim = weight.shape

    def full(xs: list[torch.Tensor]) -> torch.Tensor:
        x, y = xs[0], torch.cat(xs[1:], dim=1)
        wx = (x @ weight.view(context_dim, rest_dim * out_dim)).view(-1, rest_dim, out_dim)
        bilinear = (y[:, None, :] @ wx).squeeze(1)
        return bilinear + f.context_linear(x) + f.rest_linear(y)

    return full, [weight]


def plain_mlb(f: MLBFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    joint = f.dropout(
        product([torch.tanh(f.proj[m](x)) for m, x in zip(f.modalities, xs, strict=True)])
    )
    return f.out(joint) if f.out is not None else joint


def plain_mfb(f: MFBFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    joint = f.dropout(product([f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)]))
    z = peer_power_l2(joint.view(len(joint), -1, f.factor).sum(dim=-1))
    return f.out(z) if f.out is not None else z


def plain_mfh(f: MFHFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    expanded, pooled = None, []
    for block in f.blocks:
        joint = product([block[m](x) for m, x in zip(f.modalities, xs, strict=True)])
        expanded = f.dropout(joint if expanded is None else expanded * joint)
        pooled.append(peer_power_l2(expanded.view(len(joint), -1, f.factor).sum(dim=-1)))
    z = torch.cat(pooled, dim=-1)
    return f.out(z) if f.out is not None else z


def plain_mutan(f: MutanFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    factors = [
        f.core[m](f.dropout(torch.tanh(f.proj[m](x)))).view(len(x), f.rank, -1)
        for m, x in zip(f.modalities, xs, strict=True)
    ]
    return f.out(product(factors).sum(dim=1))


def plain_block(f: BlockFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    pieces = [
        f.dropout(f.proj[m](x)).split(f.sizes, dim=-1)
        for m, x in zip(f.modalities, xs, strict=True)
    ]
    blocks = []
    for c in range(len(f.sizes)):
        factors = [
            f.cores[m][c](chunks[c]).view(len(chunks[c]), f.rank, -1)
            for m, chunks in zip(f.modalities, pieces, strict=True)
        ]
        blocks.append(peer_power_l2(product(factors).sum(dim=1)))
    return f.out(torch.cat(blocks, dim=-1))


def plain_transformer(f: TransformerFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    sequence = [f.fusion_token.expand(len(xs[0]), -1, -1)]
    for i, (m, x) in enumerate(zip(f.modalities, xs, strict=True)):
        count = x.shape[1]
        sequence.append(f.proj[m](x) + f.modality_embedding[i] + f.position_embedding[:count])
    return f.encoder(torch.cat(sequence, dim=1))[:, 0]


def plain_cross_attention(f: CrossAttentionFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    tokens = {m: f.proj[m](x) for m, x in zip(f.modalities, xs, strict=True)}
    context = torch.cat([tokens[m] for m in f.context], dim=1)
    keys = torch.cat([f.null_context.expand(len(context), -1, -1), context], dim=1)
    query = tokens[f.query]
    for block in f.blocks:
        query = block(query, keys, None)
    return torch.cat([f.norm(query).mean(dim=1), context.mean(dim=1)], dim=-1)


def plain_mult(f: MulTFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    """The authors' MulT: crossmodal attention over the source's tokens (no null key, which
    ours masks whenever the source is present)."""
    embedded = {}
    for m, x in zip(f.modalities, xs, strict=True):
        z = f.proj[m](x)
        embedded[m] = f.embedding_dropout(
            z + sinusoidal_positions(z.shape[1], f.dim, z.device, z.dtype)
        )
    readouts = []
    for target, pairs in f.crossmodal.items():
        crossed = []
        for source, cm in pairs.items():
            stream = embedded[target]
            for block in cm.blocks:
                stream = block(stream, embedded[source], None)
            crossed.append(cm.norm(stream))
        hidden = f.self_attention[target](torch.cat(crossed, dim=-1))
        readouts.append(hidden[:, -1] if f.readout == "last" else hidden.mean(dim=1))
    fused = torch.cat(readouts, dim=-1)
    return fused if f.project is None else f.project(fused)


def plain_mbt(f: BottleneckFuser, xs: list[torch.Tensor]) -> torch.Tensor:
    batch = len(xs[0])
    streams = {}
    for i, (m, x) in enumerate(zip(f.modalities, xs, strict=True)):
        tokens = f.proj[m](x) + f.position_embedding[i, : x.shape[1]]
        streams[m] = torch.cat([f.cls_tokens[i].expand(batch, 1, -1), tokens], dim=1)
    bottleneck = f.bottleneck.expand(batch, -1, -1)
    for index in range(f.num_layers):
        if index < f.first_fusion_layer:
            streams = {m: f.layers[m][index](s) for m, s in streams.items()}
            continue
        copies = []
        for m, s in streams.items():
            out = f.layers[m][index](torch.cat([s, bottleneck], dim=1))
            streams[m], copy = out[:, : s.shape[1]], out[:, s.shape[1] :]
            copies.append(copy)
        bottleneck = torch.stack(copies, dim=1).mean(dim=1)
    return torch.stack([f.norm[m](s[:, 0]) for m, s in streams.items()], dim=1).mean(dim=1)


SEQUENCE_FUSERS = (TransformerFuser, CrossAttentionFuser, MulTFuser, BottleneckFuser)
"""Fusers that attend over tokens: timed on token sequences as well as vectors."""

PLAIN: dict[type, Callable[..., Any]] = {
    ConcatFuser: plain_concat,
    SumFuser: plain_sum,
    MeanFuser: plain_mean,
    GatedFuser: plain_gated,
    AttentionFuser: plain_attention,
    FiLMFuser: plain_film,
    LateFusion: plain_late,
    TensorFuser: plain_tfn,
    LowRankFuser: plain_lmf,
    MLBFuser: plain_mlb,
    MFBFuser: plain_mfb,
    MFHFuser: plain_mfh,
    MutanFuser: plain_mutan,
    BlockFuser: plain_block,
    TransformerFuser: plain_transformer,
    CrossAttentionFuser: plain_cross_attention,
    MulTFuser: plain_mult,
    BottleneckFuser: plain_mbt,
}
FACTORIES: dict[type, Callable[[Any], tuple[Plain, list[nn.Parameter]]]] = {
    BilinearFuser: plain_bilinear,
}
"""References that need their own parameters (a peer's weight layout)."""


def plain_reference(fuser: Fuser) -> tuple[Plain, list[nn.Parameter]] | None:
    """The plain forward for this fuser (taking vectors or, for sequence fusers, tokens in
    modality order) and the parameters it has of its own; None for a fuser without one."""
    if type(fuser) in FACTORIES:
        return FACTORIES[type(fuser)](fuser)
    if type(fuser) in PLAIN:
        return partial(PLAIN[type(fuser)], fuser), []
    return None


# --- configs -----------------------------------------------------------------------------


def fuser_configs(names: Sequence[str] | None, variants: Sequence[str]) -> dict[str, Any]:
    """Every config in configs/model/fusion (or those named), then the variants: name ->
    OmegaConf config. A variant is `config:key=value,key=value` (values in YAML: null)."""
    found = {path.stem: OmegaConf.load(path) for path in sorted(CONFIG_DIR.glob("*.yaml"))}
    if names:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise SystemExit(
                f"--configs: no config {unknown} in {CONFIG_DIR}; there are {list(found)}"
            )
        found = {name: found[name] for name in names}
    for variant in variants:
        base, _, settings = variant.partition(":")
        if base not in found:
            continue
        overrides = OmegaConf.from_dotlist(settings.split(",")) if settings else {}
        found[f"{base}[{settings}]"] = OmegaConf.merge(found[base], overrides)
    return found


def build_fuser(config: Any, in_dims: dict[str, int]) -> Fuser:
    needs = {}
    if getattr(get_class(config._target_), "produces_logits", False):
        needs["num_classes"] = NUM_CLASSES
    return instantiate(config)(in_dims, **needs)


# --- one setting -------------------------------------------------------------------------


def inputs(
    modalities: int, dim: int, batch: int, tokens: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features (requiring grad, as from encoders that train), all-True masks, and masks with
    absent samples: modality i misses every sample b with b % 4 == i % 4 (so no sample misses
    every modality of 2 or 3); token masks also end a third of the sequences early."""
    shape = (batch,) if tokens == 0 else (batch, tokens)
    names = [f"m{i}" for i in range(modalities)]
    features = {m: torch.randn(*shape, dim, device=device, requires_grad=True) for m in names}
    all_true = {m: torch.ones(shape, dtype=torch.bool, device=device) for m in names}
    present = {}
    samples = torch.arange(batch, device=device)
    for i, m in enumerate(names):
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        mask[samples % 4 == i % 4] = False
        if tokens > 1:
            mask[samples % 3 == 1, tokens // 2 :] = False
        present[m] = mask
    return features, all_true, present


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_setting(
    name: str,
    config: Any,
    modalities: int,
    dim: int,
    batch: int,
    tokens: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any] | None:
    """One row: the four steps of this setting timed side by side; None when the fuser does
    not take this input kind."""
    in_dims = {f"m{i}": dim for i in range(modalities)}
    torch.manual_seed(args.seed)
    fuser = build_fuser(config, in_dims).to(device)
    if tokens and not isinstance(fuser, SEQUENCE_FUSERS):
        return None
    features, all_true, present = inputs(modalities, dim, batch, tokens, device)
    xs = [features[m] for m in fuser.modalities]
    token_xs = [x.unsqueeze(1) if x.dim() == 2 else x for x in xs]
    reference = plain_reference(fuser)
    row: dict[str, Any] = {
        "config": name,
        "fuser": type(fuser).__name__,
        "modalities": modalities,
        "dim": dim,
        "batch": batch,
        "tokens": tokens,
        "params": sum(p.numel() for p in fuser.parameters()),
    }
    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "ours": partial(fuser, features),
        "all_true": partial(fuser, features, all_true),
        "present": partial(fuser, features, present),
    }
    extra: list[nn.Parameter] = []
    if reference is not None:
        plain, extra = reference
        plain_xs = token_xs if isinstance(fuser, SEQUENCE_FUSERS) else xs
        forwards["plain"] = partial(plain, plain_xs)
    fuser.eval()
    with torch.no_grad():
        ours = forwards["ours"]()
        row["all_true_rel_diff"] = relative_difference(forwards["all_true"](), ours)
        if "plain" in forwards:
            row["plain_rel_diff"] = relative_difference(forwards["plain"](), ours)
    fuser.train()
    upstream = torch.randn_like(ours)
    steps = {
        variant: partial(training_step, forward, fuser, extra, xs, upstream)
        for variant, forward in forwards.items()
    }
    samples = interleaved_ms(
        steps,
        args.rounds,
        args.warmup,
        device,
        min_sample_s=args.min_sample_s,
        budget_s=args.budget_s,
        clock=args.timer,
    )
    for variant, times in samples.items():
        row[f"{variant}_ms"] = statistics.median(times)
    row["rounds"] = len(samples["ours"])
    row["present_over_absent"] = paired_ratio(samples["present"], samples["ours"])
    row["all_true_over_absent"] = paired_ratio(samples["all_true"], samples["ours"])
    if "plain" in samples:
        row["ours_over_plain"] = paired_ratio(samples["ours"], samples["plain"])
    return row


def training_step(
    forward: Callable[[], torch.Tensor],
    fuser: nn.Module,
    extra: list[nn.Parameter],
    xs: list[torch.Tensor],
    upstream: torch.Tensor,
) -> None:
    """Forward, backward from `upstream`, and every gradient cleared (set to None) first."""
    fuser.zero_grad(set_to_none=True)
    for tensor in (*extra, *xs):
        tensor.grad = None
    forward().backward(upstream)


# --- summary -----------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], batches: Sequence[int]) -> list[dict[str, Any]]:
    """Per config and input kind: the medians over M and d of each batch size's step time and
    ratios, and which goals those medians miss."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["config"], "tokens" if row["tokens"] else "vectors"), []).append(row)
    summary = []
    for (config, kind), group in groups.items():
        entry: dict[str, Any] = {"config": config, "fuser": group[0]["fuser"], "input": kind}
        missed = []
        for batch in batches:
            at = [row for row in group if row["batch"] == batch]
            if not at:
                continue
            entry[f"ms_{batch}"] = statistics.median(row["ours_ms"] for row in at)
            entry[f"present_over_absent_{batch}"] = statistics.median(
                row["present_over_absent"] for row in at
            )
            ratios = [row["ours_over_plain"] for row in at if "ours_over_plain" in row]
            entry[f"ours_over_plain_{batch}"] = statistics.median(ratios) if ratios else None
            if ratios and batch in GOALS and entry[f"ours_over_plain_{batch}"] > GOALS[batch]:
                missed.append(f"ours/plain at {batch}")
            if entry[f"present_over_absent_{batch}"] > PRESENT_GOAL:
                missed.append(f"present at {batch}")
        entry["missed_goals"] = missed
        summary.append(entry)
    return summary


def ratio(value: float | None, goal: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + ("*" if goal is not None and value > goal else "")


def row_cells(row: dict[str, Any]) -> list[object]:
    return [
        row["config"],
        row["modalities"],
        row["dim"],
        row["batch"],
        row["tokens"] or "-",
        f"{row['ours_ms']:.3f}",
        f"{row['plain_ms']:.3f}" if "plain_ms" in row else "-",
        ratio(row.get("ours_over_plain"), GOALS.get(row["batch"])),
        f"{row['present_ms']:.3f}",
        ratio(row["present_over_absent"], PRESENT_GOAL),
        ratio(row["all_true_over_absent"]),
    ]


def summary_cells(entry: dict[str, Any], batches: Sequence[int]) -> list[object]:
    cells: list[object] = [entry["config"], entry["input"]]
    cells += [f"{entry[f'ms_{b}']:.3f}" if f"ms_{b}" in entry else "-" for b in batches]
    cells += [ratio(entry.get(f"ours_over_plain_{b}"), GOALS.get(b)) for b in batches]
    cells += [ratio(entry.get(f"present_over_absent_{b}"), PRESENT_GOAL) for b in batches]
    return cells


def run_fusers(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    configs = fuser_configs(args.configs, args.variants)
    rows = []
    for name, config in configs.items():
        for tokens in (0, *args.tokens):
            for modalities in args.modalities:
                for dim in args.dims:
                    for batch in args.batches:
                        row = bench_setting(
                            name, config, modalities, dim, batch, tokens, args, device
                        )
                        if row is not None:
                            rows.append(row)
                            if args.verbose:
                                print(
                                    markdown_table(ROW_HEADERS, [row_cells(row)]).splitlines()[-1]
                                )
    summary = summarize(rows, args.batches)
    print(markdown_table(ROW_HEADERS, [row_cells(row) for row in rows]))
    print()
    headers = ["config", "input"]
    headers += [f"ms @{b}" for b in args.batches]
    headers += [f"ours/plain @{b}" for b in args.batches]
    headers += [f"present/absent @{b}" for b in args.batches]
    print(markdown_table(headers, [summary_cells(entry, args.batches) for entry in summary]))
    print(
        "medians over M and d; ours/plain and present/absent are medians of ratios of steps "
        f"timed side by side; * misses the goal (ours/plain <= {GOALS} by batch, present/absent "
        f"<= {PRESENT_GOAL})"
    )
    worst = max((row.get("plain_rel_diff", 0.0) for row in rows), default=0.0)
    print(f"largest relative difference, plain against ours (eval mode): {worst:.1e}")
    return {"rows": rows, "summary": summary}


ROW_HEADERS = [
    "config",
    "M",
    "d",
    "batch",
    "T",
    "ours ms",
    "plain ms",
    "ours/plain",
    "present ms",
    "present/absent",
    "all-True/absent",
]

# --- TFN against LMF (--scaling) ---------------------------------------------------------


def build_scaling(name: str, in_dims: dict[str, int], args: argparse.Namespace) -> Fuser:
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


def bench_scaling(
    name: str, modalities: int, dim: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One row; a TFN over its size limit becomes a "too large" row instead of a crash."""
    in_dims = {f"m{i}": dim for i in range(modalities)}
    row: dict[str, Any] = {"modalities": modalities, "dim": dim, "fuser": name}
    try:
        fuser = build_scaling(name, in_dims, args).to(device)
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


def scaling_cells(row: dict[str, Any]) -> list[object]:
    key = [row["modalities"], row["dim"], row["fuser"]]
    if row["status"] != "ok":
        return [*key, "-", row["status"], "-", "-"]
    peak = f"{row['cuda_peak_mib']:.1f}" if "cuda_peak_mib" in row else "-"
    return [*key, f"{row['params']:,}", f"{row['fwd_bwd_ms']:.3f}", f"{row['est_mib']:.1f}", peak]


def run_scaling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rows = [
        bench_scaling(name, modalities, dim, args, device)
        for modalities in args.modalities
        for dim in args.dims
        for name in ("TFN", "LMF")
    ]
    headers = ["M", "d", "fuser", "params", "fwd+bwd ms", "est MiB", "CUDA peak MiB"]
    print(markdown_table(headers, [scaling_cells(row) for row in rows]))
    print("est MiB = parameters + largest intermediate tensor, float32, computed analytically")
    return {"rows": rows}


# --- entry point -------------------------------------------------------------------------

BASE = {"modalities": [2, 3], "warmup": 1, "min_sample_s": 0.004, "budget_s": 1.5, "threads": 1}
GRIDS = {
    "default": {"dims": [32, 512], "batches": [32, 256], "tokens": [8], "rounds": 15},
    "full": {
        "dims": [16, 32, 64, 128, 256, 512],
        "batches": [32, 64, 256],
        "tokens": [8, 32],
        "rounds": 25,
        "budget_s": 10.0,
    },
    "quick": {
        "dims": [8],
        "batches": [4],
        "tokens": [3],
        "rounds": 1,
        "modalities": [2],
        "warmup": 0,
        "min_sample_s": 0.0,
    },
    "scaling": {"dims": [16, 32, 64, 128, 256], "warmup": 2, "threads": 0},
}
"""Settings of each grid; an option given on the command line wins."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the larger grid, more rounds")
    grid.add_argument("--quick", action="store_true", help="tiny sizes, one round: seconds")
    grid.add_argument("--scaling", action="store_true", help="TFN against LMF as d grows")
    parser.add_argument("--configs", nargs="+", help="config names (default: all)")
    parser.add_argument("--variants", nargs="*", default=["bilinear:rank=null"])
    parser.add_argument("--modalities", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (attention fusers)")
    parser.add_argument("--rounds", type=int, help="interleaved samples per step and setting")
    parser.add_argument("--min-sample-s", type=float, help="shortest timed sample, seconds")
    parser.add_argument(
        "--budget-s", type=float, help="seconds a setting's rounds may take (at least 3 rounds)"
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (with --threads 1 on CPU; other jobs do not "
        "inflate it), else wall time",
    )
    parser.add_argument("--threads", type=int, help="torch threads (0: torch's; default 1)")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is done")
    parser.add_argument("--batch", type=int, default=64, help="--scaling: the batch size")
    parser.add_argument("--rank", type=int, default=4, help="--scaling: LMF's rank")
    parser.add_argument("--out-dim", type=int, default=64, help="--scaling: output size")
    parser.add_argument("--repeats", type=int, default=10, help="--scaling: timed runs")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.mode = next(
        (mode for mode in ("full", "quick", "scaling") if getattr(args, mode)), "default"
    )
    for key, value in (BASE | GRIDS[args.mode]).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        suffix = "" if args.mode == "default" else f"_{args.mode}"
        args.out = Path("outputs/benchmarks") / f"fusers{suffix}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = default_device()
    # All of a step's work runs on this thread only on the CPU with one thread (autograd
    # runs CPU backward on the calling thread); elsewhere the CPU time would miss some.
    if args.clock == "cpu" and not (device.type == "cpu" and torch.get_num_threads() == 1):
        args.clock = "wall"
    args.timer = time.thread_time if args.clock == "cpu" else time.perf_counter
    result = run_scaling(args, device) if args.scaling else run_fusers(args, device)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("out")
    config.pop("timer")
    write_json(args.out, {"machine": machine_info(device), "config": config, **result})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
