"""The benchmark scripts run end to end on tiny settings and write the rows they promise.

No assertion reads a timing: wall time depends on the machine, not on the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments import bench_fusers, bench_routing


def test_bench_routing_writes_rows_and_outputs_agree(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    argv = ["--batch-sizes", "4", "9", "--in-dim", "8", "--classes", "3", "--conditions", "3"]
    assert bench_routing.main([*argv, "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert {"torch", "threads", "cpu"} <= set(result["machine"])
    rows = result["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [
        (4, "no_grad"),
        (4, "fwd_bwd"),
        (9, "no_grad"),
        (9, "fwd_bwd"),
    ]
    for row in rows:
        assert row["max_abs_diff"] < 1e-5
        assert row["batched_ms"] > 0 and row["loop_ms"] > 0


def test_bench_fusers_records_too_large_tfn(tmp_path: Path) -> None:
    out = tmp_path / "fusers.json"
    argv = ["--dims", "4", "128", "--modalities", "2", "3", "--batch", "4", "--out-dim", "8"]
    assert bench_fusers.main([*argv, "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0

    rows = json.loads(out.read_text())["rows"]
    status = {(r["modalities"], r["dim"], r["fuser"]): r["status"] for r in rows}
    assert len(status) == len(rows) == 8
    # 129^3 entries is over TensorFuser's limit; LMF has no such tensor.
    assert status.pop((3, 128, "TFN")) == "too large"
    assert set(status.values()) == {"ok"}
    for row in rows:
        if row["status"] == "ok":
            assert row["params"] > 0 and row["est_mib"] > 0
