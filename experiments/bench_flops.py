"""How close encoder training comes to this machine's matmul peak, per precision.

    python -m experiments.bench_flops [--batch-size 64] [--steps 10] [--sizes 1024 2048]
        [--precisions 32 bf16] [--device cpu] [--out outputs/benchmarks/flops.json]

The peak is the best median GFLOP/s of `torch.mm` over square sizes (2 n^3 FLOPs each), in
float32 or, for bf16, on bfloat16 matrices. Training steps run under the trainer's
`Precision` (bf16: autocast), as `trainer.precision` would.
Each encoder of the built-in example (ResNet-18 on 8x8 grey scans; log-mel ResNet-18 on 1 s of 8 kHz
audio), with a linear head, trains for `--steps` timed steps (forward, backward, AdamW
step) after a warm-up. `FlopCounterMode` counts one step's forward and backward FLOPs
(matmuls and convolutions; the STFT and the elementwise optimizer step are not counted),
and achieved GFLOP/s = counted FLOPs / median step time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench_trainer import LR, NUM_CLASSES, image_model
from experiments.benchmarking import machine_info, synchronize, write_json
from fusion.encoders import build_spectrogram_encoder
from fusion.fusers import ConcatFuser
from fusion.heads import ClassificationHead
from fusion.model import MultimodalModel
from fusion.training.precision import FLOAT32, PRECISIONS, Precision

MATMUL_REPEATS = 5
DTYPE_NAMES = {"32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` after one untimed call (allocations, kernel selection)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(
    sizes: list[int], device: torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """GFLOP/s of `torch.mm` per size: the ceiling a training step's matmuls can reach."""
    gflops = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = median_seconds(lambda a=a, b=b: torch.mm(a, b), MATMUL_REPEATS, device)
        gflops[str(n)] = 2 * n**3 / seconds / 1e9
    return gflops


def audio_model(seed: int = 0) -> MultimodalModel:
    """The default data's audio model as stage 1 trains it (configs/model/encoder/audio/logmel_resnet18)."""
    torch.manual_seed(seed)
    encoder = build_spectrogram_encoder(
        sample_rate=8000, clip_samples=8000, n_fft=256, hop_length=160, n_mels=32
    )
    return MultimodalModel.build(
        {"audio": encoder}, fuser=ConcatFuser, head=ClassificationHead, num_classes=NUM_CLASSES
    )


def training_step(
    model: MultimodalModel, batch_size: int, device: torch.device, precision: Precision
) -> Callable[[], None]:
    """One AdamW step on a fixed random batch; FLOPs do not depend on the values."""
    model.to(device).train()
    inputs = model.example_inputs(batch_size)
    inputs = {m: torch.rand_like(x) for m, x in inputs.items()}
    labels = torch.randint(NUM_CLASSES, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad()
        with precision.autocast():
            loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()

    return step


def step_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def encoder_throughput(
    model: MultimodalModel,
    batch_size: int,
    steps: int,
    device: torch.device,
    precision: Precision = FLOAT32,
) -> dict[str, float]:
    step = training_step(model, batch_size, device, precision)
    flops = step_flops(step)
    seconds = median_seconds(step, steps, device)
    return {
        "gflop_per_step": flops / 1e9,
        "seconds_per_step": seconds,
        "gflops": flops / seconds / 1e9,
    }


def table(result: dict[str, object]) -> str:
    lines = []
    for precision, gflops in result["matmul_gflops"].items():
        sizes = ", ".join(f"n={n}: {g:.1f}" for n, g in gflops.items())
        peak = result["peak_gflops"][precision]
        lines.append(f"{DTYPE_NAMES[precision]} matmul peak: {peak:.1f} GFLOP/s ({sizes})")
    lines += [
        "",
        "| encoder | precision | GFLOP/step | median s/step | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_precision in result["encoders"].items():
        for precision, r in by_precision.items():
            lines.append(
                f"| {name} | {precision} | {r['gflop_per_step']:.2f} | "
                f"{r['seconds_per_step']:.4f} | {r['gflops']:.1f} | "
                f"{100 * r['fraction_of_peak']:.1f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per encoder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--precisions", nargs="+", default=["32"], choices=PRECISIONS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/flops.json"))
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, *args.sizes) < 1:
        parser.error("--batch-size, --steps and --sizes must be >= 1")
    try:
        args.precisions = {p: Precision(p, torch.device(args.device).type) for p in args.precisions}
    except ValueError as err:
        parser.error(f"--precisions: {err}")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device = torch.device(args.device)
    precisions = args.precisions
    matmul = {name: matmul_peak(args.sizes, device, p.dtype) for name, p in precisions.items()}
    peak = {name: max(gflops.values()) for name, gflops in matmul.items()}
    encoders: dict[str, dict[str, dict[str, float]]] = {}
    for name, build in {
        "image resnet18 8x8": image_model,
        "audio logmel resnet18": audio_model,
    }.items():
        for precision_name, precision in precisions.items():
            r = encoder_throughput(build(), args.batch_size, args.steps, device, precision)
            encoders.setdefault(name, {})[precision_name] = {
                **r,
                "fraction_of_peak": r["gflops"] / peak[precision_name],
            }
    result = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "matmul_gflops": matmul,
        "peak_gflops": peak,
        "encoders": encoders,
        "machine": machine_info(device),
    }
    print(table(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
