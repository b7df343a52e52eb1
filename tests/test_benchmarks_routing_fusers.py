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
    argv = ["--scaling", "--dims", "4", "128", "--modalities", "2", "3", "--batch", "4"]
    argv += ["--out-dim", "8", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert bench_fusers.main(argv) == 0

    rows = json.loads(out.read_text())["rows"]
    status = {(r["modalities"], r["dim"], r["fuser"]): r["status"] for r in rows}
    assert len(status) == len(rows) == 8
    # 129^3 entries is over TensorFuser's limit; LMF has no such tensor.
    assert status.pop((3, 128, "TFN")) == "too large"
    assert set(status.values()) == {"ok"}
    for row in rows:
        if row["status"] == "ok":
            assert row["params"] > 0 and row["est_mib"] > 0


def test_bench_fusers_quick_times_every_config_against_its_plain_reference(
    tmp_path: Path,
) -> None:
    """Every config in configs/model/fusion gets a row per setting with the four steps timed,
    the attention fusers a token row too, and the plain references compute what ours do."""
    out = tmp_path / "fusers.json"
    assert bench_fusers.main(["--quick", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert {"torch", "threads", "cpu"} <= set(result["machine"])
    assert result["config"]["mode"] == "quick"
    rows, summary = result["rows"], result["summary"]
    same = 0.0 if result["machine"]["device"] == "cpu" else 1e-4
    configs = {path.stem for path in bench_fusers.CONFIG_DIR.glob("*.yaml")}
    assert {row["config"] for row in rows} == configs | {"bilinear[rank=null]"}
    sequence = {row["config"] for row in rows if row["tokens"]}
    assert sequence == {"transformer", "cross_attention", "mult", "mbt"}
    for row in rows:
        assert {"modalities", "dim", "batch", "params", "rounds"} <= set(row)
        for key in ("ours_ms", "all_true_ms", "present_ms", "plain_ms"):
            assert row[key] > 0, (row["config"], key)
        for key in ("ours_over_plain", "present_over_absent", "all_true_over_absent"):
            assert row[key] > 0, (row["config"], key)
        assert row["plain_rel_diff"] < 1e-4, row["config"]  # the same math
        # Masks of all True change nothing (on the CPU they are not even applied).
        assert row["all_true_rel_diff"] <= same, row["config"]
    assert {(entry["config"], entry["input"]) for entry in summary} == {
        (row["config"], "tokens" if row["tokens"] else "vectors") for row in rows
    }
    for entry in summary:
        assert {"ms_4", "ours_over_plain_4", "present_over_absent_4", "missed_goals"} <= set(entry)
