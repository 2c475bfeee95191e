"""Approach 3 (Besiroglu et al. 2024 grid, Huber 1e-3, L-BFGS-B) with bootstrap resamples: wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_fit.py [--points 300] [--bootstrap 1000]

Target (issue 9): 300 points and 1000 resamples in under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import fit as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=300)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    e, a, b, al, be = 1.82, 482.0, 2085.0, 0.35, 0.37
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), args.points))
    d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), args.points))
    loss = (e + a * n**-al + b * d**-be) * np.exp(rng.normal(0, 0.01, args.points))
    t0 = time.perf_counter()
    grid_only = F.fit_parametric(n, d, loss, np.random.default_rng(1), n_boot=0)
    t1 = time.perf_counter()
    fit = F.fit_parametric(n, d, loss, np.random.default_rng(1), n_boot=args.bootstrap)
    t2 = time.perf_counter()
    boot = (t2 - t1) - (t1 - t0)
    print(f"points={args.points} grid starts={grid_only.extra['n_starts']}")
    print(f"grid fit: {t1 - t0:.2f} s; grid + {args.bootstrap} resamples: {t2 - t1:.2f} s "
          f"({1e3 * boot / max(args.bootstrap, 1):.2f} ms per resample)")  # fmt: skip
    print(fit.table(0.95).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
