"""experiments.bench_cache's phase table, on hand-made job timings."""

import pytest

from experiments.bench_cache import phase_medians


def test_phase_medians_split_jobs_into_epochs_and_fixed_cost():
    timings = [
        {"seconds": {"data": 0.2, "stage 2 epochs": 2.0, "checkpoint": 0.1}, "total": 2.3},
        {"seconds": {"data": 0.4, "stage 2 epochs": 3.0, "checkpoint": 0.3}, "total": 3.7},
        {"seconds": {"data": 0.3, "stage 2 epochs": 1.0}, "total": 1.3},  # no checkpoint phase
    ]
    medians = phase_medians(10.0, timings)
    assert list(medians) == [
        "data", "stage 2 epochs", "checkpoint", "job total", "fixed cost per job",
        "outside the jobs (sweep)",
    ]  # fmt: skip
    assert medians["data"] == pytest.approx(0.3)
    assert medians["checkpoint"] == pytest.approx(0.1)  # 0.1, 0.3 and a job without: 0
    assert medians["job total"] == pytest.approx(2.3)
    assert medians["fixed cost per job"] == pytest.approx(0.3)  # of 0.3, 0.7, 0.3
    assert medians["outside the jobs (sweep)"] == pytest.approx(10.0 - 7.3)
