"""Wall time per phase of a run, so that where a run's time goes is measured, not guessed.

The recipe and the entry point time their phases (`Stopwatch.phase`); a run writes the
result to `timings.json` in its directory, beside `summary.json` (which stays free of
timings, so that two runs of one seed have identical summaries). `experiments.bench_cache`
reads it to split a sweep's jobs into training epochs and everything else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIMINGS_FILE = "timings.json"


class Stopwatch:
    """Seconds spent in each named phase, summed over repeated entries, in first-entry order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def write(self, run_dir: Path) -> Path:
        """`timings.json` in `run_dir`: `{"seconds": {phase: s}, "total": s}` (total: the sum)."""
        path = Path(run_dir) / TIMINGS_FILE
        total = sum(self.seconds.values())
        path.write_text(json.dumps({"seconds": self.seconds, "total": total}, indent=2) + "\n")
        return path
