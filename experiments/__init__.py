"""Entry points: thin scripts that turn Hydra configs into library objects and run them.

Every entry point gets the OpenMP wait policy set here, before torch loads OpenMP: a thread
that reaches a barrier spins 1,000 iterations, then sleeps (`GOMP_SPINCOUNT=1000`; libgomp,
which torch's Linux wheels use, spins 300,000). Long spinning is fast on an idle machine but
collapses when another process wants the cores (a sweep's parallel runs, torchrun's
processes, another user's job): a stage-1 step then took 3-4x as long, against 1.9x with
short spinning, which costs about 13% on an idle machine (`python -m experiments.bench_threads`).
An `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` in the environment is left as it is.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
