"""The trainer and FLOP benchmarks run end to end on tiny settings and write their JSON.

Only the shape of the results is checked: tests never assert on wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import bench_flops, bench_trainer


def test_bench_trainer_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    bench_trainer.main(["--steps", "2", "--repeats", "1", "--batch-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["seconds_per_step"]) == {"ours", "plain"}
    assert all(s > 0 for s in result["seconds_per_step"].values())
    assert isinstance(result["overhead_percent"], float)
    parity = result["parity"]
    assert parity["same"] and parity["dtype"] == "float32"
    assert parity["tolerance"] == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    # on CPU both loops do the same arithmetic in the same order: bitwise the same weights
    assert parity["relative_diff"] == parity["run_to_run_diff"] == 0.0
    assert parity["tensor"] is None
    assert parity["nondeterministic_ops"] == [] and parity["cublas_deterministic"]
    assert {"torch", "threads", "cpu"} <= set(result["machine"])


def test_parity_is_relative_per_tensor_and_names_the_tensor() -> None:
    a, b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    b.running_var.fill_(1000.0)
    a.running_var.copy_(torch.tensor([1013.0, 1000.0]))  # 13 off, on a variance of 1000
    a.weight.data.fill_(1.0005)
    diff, tensor = bench_trainer.relative_diff(a, b)
    assert (tensor, diff) == ("running_var", pytest.approx(0.013))
    a.running_var.fill_(1000.0)
    assert bench_trainer.relative_diff(a, b) == (pytest.approx(5e-4, rel=1e-3), "weight")


def test_deterministic_kernels_are_asked_for_and_restored() -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with bench_trainer.deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_parity_line_says_a_difference_in_capitals() -> None:
    check = {
        "same": False, "relative_diff": 0.5, "tensor": "head.weight", "run_to_run_diff": 0.0,
        "tolerance": 3.4e-4, "dtype": "float32", "nondeterministic_ops": ["op_backward_cuda"],
        "cublas_deterministic": False,
    }  # fmt: skip
    assert bench_trainer.parity_line(check) == (
        "DIFFERENT WEIGHTS: relative difference 5.0e-01 (largest in head.weight), run-to-run "
        "0.0e+00, tolerance 3.4e-04 (float32); without a deterministic kernel: "
        "op_backward_cuda; CUDA started before CUBLAS_WORKSPACE_CONFIG was set"
    )


def test_bench_flops_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "flops.json"
    argv = ["--steps", "1", "--batch-size", "4", "--sizes", "64", "--out", str(out)]
    bench_flops.main([*argv, "--precisions", "32", "bf16"])
    result = json.loads(out.read_text())
    assert set(result["peak_gflops"]) == {"32", "bf16"}
    assert min(result["peak_gflops"].values()) > 0
    assert len(result["encoders"]) == 2
    for by_precision in result["encoders"].values():
        assert set(by_precision) == {"32", "bf16"}
        for r in by_precision.values():
            assert r["gflop_per_step"] > 0 and r["seconds_per_step"] > 0
            assert r["gflops"] > 0 and r["fraction_of_peak"] > 0
    assert {"torch", "threads", "cpu"} <= set(result["machine"])
    with pytest.raises(SystemExit):
        bench_flops.main([*argv, "--precisions", "fp16"])  # GPU only
