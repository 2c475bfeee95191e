"""Fixed-compute comparison: `harness-compare RESULTS --flops 1e15`.

Per architecture: the loss its compute-frontier fit L(C) = E + A C^-alpha predicts at the given
compute with a bootstrap interval, the best observed run within a factor `near` of that compute, and
the compute multiplier against the dense baseline (how many times more compute the baseline's
frontier needs to reach the same loss; > 1 means the architecture is more compute-efficient). A
second table says which pairs are statistically distinguishable: the bootstrap interval of their
predicted-loss difference excludes zero. Writes RESULTS/report/compare_<flops>.{csv,md}.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from harness import fit as F

log = logging.getLogger(__name__)

# Preferred baselines, in order; any other arch of a dense family comes next.
BASELINES = ("transformer++", "llama", "gpt2")
DENSE_FAMILIES = ("llama", "gpt2")


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator per (seed, keys): stable across processes (no str hash randomisation)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def default_baseline(runs: pd.DataFrame) -> str | None:
    archs = sorted(set(runs["arch"].dropna().astype(str)))
    for b in BASELINES:
        if b in archs:
            return b
    dense = sorted(set(runs.loc[runs["family"].isin(DENSE_FAMILIES), "arch"].dropna().astype(str)))
    return dense[0] if dense else None


def frontier_fits(kept: pd.DataFrame, n_boot: int, seed: int) -> tuple[dict[str, F.Fit], dict[str, str]]:
    """Compute-frontier fit per arch, and the reason for each arch that could not be fitted."""
    fits, why = {}, {}
    for arch, g in kept.groupby("arch", sort=True):
        try:
            fits[arch] = F.fit_frontier(g, rng_for(seed, "frontier", arch), n_boot)
        except F.FitError as e:
            why[arch] = str(e)
    return fits, why


def compare(runs: pd.DataFrame, flops: float, n_boot: int = 200, seed: int = 0, baseline: str | None = None,
            level: float = 0.95, near: float = 2.0, fits: dict[str, F.Fit] | None = None,
            ) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(per-arch table, pairwise distinguishability table) at `flops` training FLOPs; `fits` reuses
    frontier fits made already (keyed by arch)."""
    kept, _ = F.split_usable(runs)
    baseline = baseline or default_baseline(kept)
    if fits is None:
        fits, why = frontier_fits(kept, n_boot, seed)
    else:
        why = {a: "no compute-frontier fit" for a in set(kept["arch"]) - set(fits)}
    base = fits.get(baseline)
    base_ok = base is not None and base.status == F.IDENTIFIED
    rows = []
    for arch, g in kept.groupby("arch", sort=True):
        row = dict(arch=arch, family=str(g["family"].iloc[0]), n_runs=len(g))
        notes = [why[arch]] if arch in why else []
        f = fits.get(arch)
        c = g["flops_train"]
        row["fit_status"] = f.status if f is not None else "not fitted"
        if f is not None:
            if f.status != F.IDENTIFIED:
                notes.append("frontier fit not identified: " + "; ".join(f.reasons))
                f = None
        if f is not None:
            lo, hi = f.interval(flops, level=level)
            # a budget's runs land within a few percent of it: that is not an extrapolation
            row.update(loss_pred=float(f.predict(flops)), loss_lo=float(lo), loss_hi=float(hi),
                       extrapolated=bool(flops < c.min() / 1.05 or flops > c.max() * 1.05))  # fmt: skip
            if row["extrapolated"]:
                notes.append(f"extrapolated: runs span {c.min():.3g} to {c.max():.3g} FLOPs")
        near_runs = g[(g["flops_train"] >= flops / near) & (g["flops_train"] <= flops * near)]
        if len(near_runs):
            best = near_runs.sort_values([F.LOSS_COL, "run"], kind="stable").iloc[0]
            label = best["label"] if "label" in best and isinstance(best["label"], str) else best["run"]
            row.update(best_run=label, best_run_loss=float(best[F.LOSS_COL]),
                       best_run_flops=float(best["flops_train"]))  # fmt: skip
        if f is not None and base_ok:
            m, mlo, mhi = F.compute_multiplier(f, base, flops, level)
            row.update(multiplier=m, multiplier_lo=mlo, multiplier_hi=mhi)
            notes += _multiplier_notes(f, base, flops, baseline, m, mlo, mhi)
        elif f is not None and baseline != arch:
            notes.append(f"no multiplier: the baseline {baseline} has no identified frontier fit"
                         if baseline else "no multiplier: no dense baseline among the runs")  # fmt: skip
        row["note"] = "; ".join(notes)
        rows.append(row)
    cols = ["arch", "family", "n_runs", "fit_status", "loss_pred", "loss_lo", "loss_hi", "extrapolated", "best_run",
            "best_run_loss", "best_run_flops", "multiplier", "multiplier_lo", "multiplier_hi", "note"]  # fmt: skip
    table = pd.DataFrame(rows).reindex(columns=cols)
    for col in ("multiplier", "multiplier_lo", "multiplier_hi"):  # inf is never shown bare: `note` says why
        table[col] = table[col].astype(float).where(np.isfinite(table[col].astype(float)))
    table.attrs.update(baseline=baseline, flops=flops, level=level)
    fits = {a: f for a, f in fits.items() if f.status == F.IDENTIFIED}
    pairs = []
    for a, b in itertools.combinations(sorted(fits), 2):
        d, lo, hi = F.loss_difference(fits[a], fits[b], flops, level)
        pairs.append(dict(arch_a=a, arch_b=b, loss_diff=d, lo=lo, hi=hi,
                          distinguishable=bool(np.isfinite(lo) and (lo > 0 or hi < 0))))  # fmt: skip
    pair_cols = ["arch_a", "arch_b", "loss_diff", "lo", "hi", "distinguishable"]
    return table, pd.DataFrame(pairs).reindex(columns=pair_cols)


def _fmt(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table, floats to 4 significant digits (pandas' to_markdown needs tabulate)."""
    if df.empty:
        return "(none)\n"
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = [
        "| " + " | ".join(_fmt(v).replace("|", "/").replace("\n", " ") for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *body]) + "\n"


def to_csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def render(table: pd.DataFrame, pairs: pd.DataFrame) -> str:
    a = table.attrs
    pct = round(100 * a.get("level", 0.95))
    return (
        f"# Fixed-compute comparison at {a.get('flops', float('nan')):.3g} training FLOPs\n\n"
        f"Predicted loss from each architecture's compute-frontier fit with a {pct}% bootstrap interval; "
        f"multiplier = compute the baseline ({a.get('baseline')}) needs to reach that loss, divided by the "
        f"given compute.\n\n{markdown_table(table)}\n## Distinguishable pairs\n\n"
        f"Loss difference a - b; distinguishable when its {pct}% interval excludes 0.\n\n{markdown_table(pairs)}"
    )


def _multiplier_notes(f: F.Fit, base: F.Fit, flops: float, baseline: str, m: float, lo: float,
                      hi: float) -> list[str]:  # fmt: skip
    """Why a multiplier or its interval is missing or unbounded."""
    target = float(f.predict(flops))
    e_base = float(base.params["E"])
    if not np.isfinite(m):
        return [f"no multiplier: {baseline}'s frontier never reaches loss {target:.4g} (its asymptote E = "
                f"{e_base:.4g})"]  # fmt: skip
    if np.isnan(lo) or np.isnan(hi):
        return ["no multiplier interval: no usable bootstrap refits"]
    if not np.isfinite(hi):
        return [
            f"multiplier unbounded above: in some bootstrap refits {baseline}'s frontier never reaches this loss"
        ]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness-compare", description=__doc__.splitlines()[0])
    p.add_argument("results", help="results directory of one sweep (results/<sweep>)")
    p.add_argument("--flops", type=float, required=True, help="training compute to compare at (FLOPs)")
    p.add_argument("--baseline", default=None, help="baseline arch (default: the dense one)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--out", default=None, help="output directory (default RESULTS/report)")
    args = p.parse_args(argv)
    import warnings

    from harness.fileio import atomic_write_text
    from harness.results import collect, exclusion_lines, exclusions

    root = Path(args.results)
    if not root.is_dir():
        print(f"harness-compare: results directory not found: {root}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem is printed below instead
        runs = collect(root)
    if runs.empty:
        print(f"harness-compare: no runs under {root}", file=sys.stderr)
        return 2
    table, pairs = compare(runs, args.flops, args.bootstrap, args.seed, args.baseline, args.level)
    text = render(table, pairs)
    stem = f"compare_{args.flops:.0e}".replace("+", "")
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.csv", to_csv(table))
    atomic_write_text(out / f"{stem}_pairs.csv", to_csv(pairs))
    print(text)
    for line in exclusion_lines(exclusions(runs)):
        print(line)
    print(f"written to {out / stem}.{{md,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
