"""experiments.bench_cache's phase table, on hand-made job timings."""

import pytest

from experiments.bench_cache import phase_medians


def test_phase_medians_pool_the_rounds_jobs_and_split_them_into_epochs_and_fixed_cost():
    timings = [
        {"seconds": {"data": 0.2, "stage 2 epochs": 2.0, "checkpoint": 0.1}, "total": 2.3},
        {"seconds": {"data": 0.4, "stage 2 epochs": 3.0, "checkpoint": 0.3}, "total": 3.7},
        {"seconds": {"data": 0.3, "stage 2 epochs": 1.0}, "total": 1.3},  # no checkpoint phase
    ]
    other_round = [{"seconds": {"data": 0.5, "stage 2 epochs": 1.5}, "total": 2.0}]
    medians = phase_medians([(10.0, timings), (3.0, other_round)])
    assert list(medians) == [
        "data", "stage 2 epochs", "checkpoint", "job total", "fixed cost per job",
        "outside the jobs (sweep)",
    ]  # fmt: skip
    # medians over the four jobs of both rounds
    assert medians["data"] == pytest.approx(0.35)
    assert medians["checkpoint"] == pytest.approx(0.05)  # 0.1, 0.3 and two jobs without: 0
    assert medians["job total"] == pytest.approx(2.15)
    assert medians["fixed cost per job"] == pytest.approx(0.4)  # of 0.3, 0.7, 0.3, 0.5
    # per round: 10 - 7.3 and 3 - 2, then their median
    assert medians["outside the jobs (sweep)"] == pytest.approx((2.7 + 1.0) / 2)
