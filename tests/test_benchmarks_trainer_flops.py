"""The trainer and FLOP benchmarks run end to end on tiny settings and write their JSON.

Only the shape of the results is checked: tests never assert on wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import bench_flops, bench_trainer


def test_bench_trainer_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    bench_trainer.main(["--steps", "2", "--repeats", "1", "--batch-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["seconds_per_step"]) == {"ours", "plain"}
    assert all(s > 0 for s in result["seconds_per_step"].values())
    assert isinstance(result["overhead_percent"], float)
    assert result["max_weight_diff"] < 1e-4  # both loops did the same work
    assert {"torch", "threads", "cpu"} <= set(result["machine"])


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
