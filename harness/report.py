"""`harness-report RESULTS`: every plot and table of a sweep, from its results directory alone (R13).

Writes RESULTS/report/: runs.csv, excluded.csv, fits.csv (every fitted parameter with its bootstrap
interval), isoflop_optima.csv, allocation_optima.csv, compare.csv (fixed-compute table at the largest
observed compute), the plots (loss vs compute with fits, bands and the Pareto frontier; IsoFLOP
parabolas; N_opt and D_opt vs C; training curves; loss vs wall-clock; MoE expert load when logged)
and index.md / index.html tying them together. Reruns are byte-identical: rows are sorted, every fit
draws from a generator seeded by (seed, approach, arch), nothing records a time, PNGs carry no
software or date metadata. A fit without enough points leaves a note and the other outputs still come.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from harness import fit as F  # noqa: E402
from harness.compare import compare, markdown_table, rng_for, to_csv  # noqa: E402
from harness.fileio import atomic_write_bytes, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

RUN_COLS = ["arch", "family", "run", "status", "final_val_loss", "params_nonembed", "params_active",
            "tokens", "flops_train", "flops_budget", "wall_s"]  # fmt: skip


# Every other value of the published grid: 243 starts instead of 4500, so a demo report takes seconds.
COARSE_GRID = {k: v[::2] for k, v in F.CHINCHILLA_GRID.items()}


class ReportError(RuntimeError):
    """The results directory cannot give a report (missing, or no runs); the message says why."""


@dataclass
class Fits:
    frontier: dict[str, F.Fit] = field(default_factory=dict)
    envelope: dict[str, F.Allocation] = field(default_factory=dict)
    isoflop: dict[str, F.Allocation] = field(default_factory=dict)
    parametric: dict[str, F.Fit] = field(default_factory=dict)
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # (arch, approach, why not)


def fit_all(
    kept: pd.DataFrame, curves: pd.DataFrame, n_boot: int, seed: int, grid: dict | None = None
) -> Fits:
    out = Fits()
    for arch, g in kept.groupby("arch", sort=True):
        g = g.sort_values("run", kind="stable")
        cv = curves[curves["arch"] == arch]
        jobs = {
            "frontier": lambda r, g=g: F.fit_frontier(g, r, n_boot),
            "envelope": lambda r, g=g, cv=cv: F.fit_envelope(cv, g, r, n_boot),
            "isoflop": lambda r, g=g: F.fit_isoflop(g, r, n_boot),
            "parametric": lambda r, g=g: F.fit_parametric(
                g[F.N_COL], g["tokens"], g[F.LOSS_COL], r, n_boot, grid
            ),
        }
        for name, job in jobs.items():
            try:
                getattr(out, name)[arch] = job(rng_for(seed, name, arch))
            except (F.FitError, KeyError) as e:
                out.notes.append((arch, name, str(e)))
    return out


def _grid_name(grid: dict | None) -> str:
    n = math.prod(len(v) for v in (grid or F.CHINCHILLA_GRID).values())
    return f"a {n}-point grid" + (
        " (the Besiroglu et al. 2024 grid)" if n == 4500 else " (subset of Besiroglu et al.'s)"
    )


def fits_table(fits: Fits, level: float) -> pd.DataFrame:
    frames = []
    for name in ("frontier", "envelope", "isoflop", "parametric"):
        for arch, f in getattr(fits, name).items():
            frames.append(f.table(level).assign(arch=arch, approach=name))
    if not frames:
        return pd.DataFrame(
            columns=["arch", "approach", "param", "estimate", "lo", "hi", "n_points", "n_boot"]
        )
    t = pd.concat(frames, ignore_index=True)
    cols = ["arch", "approach", "param", "estimate", "lo", "hi", "n_points", "n_boot", "n_boot_failed"]
    return t[cols].sort_values(["arch", "approach"], kind="stable").reset_index(drop=True)


# --- plots ---------------------------------------------------------------------------------------


def _palette(archs: list[str]) -> dict[str, tuple]:
    return dict(zip(archs, sns.color_palette("tab10", max(len(archs), 1)), strict=False))


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _cgrid(c: pd.Series, n: int = 100) -> np.ndarray:
    # Only where the arch has runs: bands extrapolated far outside the data swamp the plot.
    return np.geomspace(c.min(), c.max(), n)


def _loss_ylim(ax: plt.Axes, losses: pd.Series) -> None:
    lo, hi = float(losses.min()), float(losses.max())
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * hi
    ax.set_ylim(lo - pad, hi + pad)


def _pareto_step(ax: plt.Axes, runs: pd.DataFrame, x: str) -> None:
    front = F.pareto_frontier(runs, x=x)
    ax.step(front[x], front[F.LOSS_COL], where="post", color="black", ls="--", lw=1, label="Pareto frontier")


def plot_loss_vs_compute(kept: pd.DataFrame, fits: Fits, colors: dict, level: float) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sns.scatterplot(data=kept, x="flops_train", y=F.LOSS_COL, hue="arch", palette=colors, ax=ax, s=40)
    for arch, f in fits.frontier.items():
        c = _cgrid(kept.loc[kept["arch"] == arch, "flops_train"])
        lo, hi = f.interval(c, level=level)
        ax.plot(c, f.predict(c), color=colors[arch], lw=1.5)
        ax.fill_between(c, lo, hi, color=colors[arch], alpha=0.15, lw=0)
    _pareto_step(ax, kept, "flops_train")
    ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="final validation loss (nats/token)",
           title=f"Loss vs compute: fits L = E + A C^-alpha, {round(100 * level)}% bands")  # fmt: skip
    _loss_ylim(ax, kept[F.LOSS_COL])
    ax.legend(fontsize=8)
    return _png(fig)


def plot_wallclock(kept: pd.DataFrame, colors: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    d = kept[np.isfinite(kept["wall_s"]) & (kept["wall_s"] > 0)]
    sns.scatterplot(data=d, x="wall_s", y=F.LOSS_COL, hue="arch", palette=colors, ax=ax, s=40)
    if len(d):
        _pareto_step(ax, d, "wall_s")
    ax.set(xscale="log", xlabel="wall-clock training time (s)", ylabel="final validation loss (nats/token)",
           title="Loss vs wall-clock (hardware-dependent Pareto view)")  # fmt: skip
    ax.legend(fontsize=8)
    return _png(fig)


def plot_curves(curves: pd.DataFrame, colors: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    d = curves[np.isfinite(curves["val_loss"]) & (curves["flops_train"] > 0)]
    for (arch, _run), g in d.groupby(["arch", "run"], sort=True):
        ax.plot(g["flops_train"], g["val_loss"], color=colors.get(arch, "grey"), lw=1, alpha=0.8)
    for arch in sorted(set(d["arch"])):
        ax.plot([], [], color=colors.get(arch, "grey"), label=arch)
    ax.set(xscale="log", xlabel="training compute so far (FLOPs)", ylabel="validation loss (nats/token)",
           title="Training curves (validation loss)")  # fmt: skip
    ax.legend(fontsize=8)
    return _png(fig)


def plot_isoflop(kept: pd.DataFrame, fits: Fits) -> bytes | None:
    archs = [a for a, g in kept.groupby("arch", sort=True) if np.isfinite(g["flops_budget"]).any()]
    if not archs:
        return None
    ncols = min(4, len(archs))
    nrows = -(-len(archs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(archs) :]:
        ax.set_visible(False)
    for ax, arch in zip(axes.flat, archs, strict=False):
        g = kept[(kept["arch"] == arch) & np.isfinite(kept["flops_budget"])]
        budgets = sorted(set(g["flops_budget"]))
        cols = dict(zip(budgets, sns.color_palette("viridis", len(budgets)), strict=True))
        par = F.isoflop_parabolas(g)
        for b in budgets:
            gb = g[g["flops_budget"] == b]
            ax.scatter(gb[F.N_COL], gb[F.LOSS_COL], color=cols[b], s=30, label=f"{b:.2g} FLOPs")
            row = par[par["flops"] == b]
            if (
                len(row)
                and row["N_coef"].iloc[0] is not None
                and isinstance(row["N_coef"].iloc[0], np.ndarray)
            ):
                x = np.linspace(np.log(gb[F.N_COL].min()), np.log(gb[F.N_COL].max()), 60)
                ax.plot(np.exp(x), np.polyval(row["N_coef"].iloc[0], x), color=cols[b], lw=1)
                if bool(row["ok"].iloc[0]):
                    ax.scatter([row["N_opt"].iloc[0]], [row["L_opt"].iloc[0]], marker="*", s=160,
                               color=cols[b], edgecolor="black", zorder=5)  # fmt: skip
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss (nats/token)",
               title=f"IsoFLOP: {arch}")  # fmt: skip
        ax.legend(fontsize=7, title="budget (star: optimum)", title_fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_allocation(kept: pd.DataFrame, fits: Fits, colors: dict, level: float) -> bytes | None:
    if not (fits.envelope or fits.isoflop or fits.parametric):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"envelope": ("o", "-"), "isoflop": ("s", "--"), "parametric": (None, ":")}
    for name in ("envelope", "isoflop", "parametric"):
        allocs = getattr(fits, name)
        for arch in sorted(allocs):
            a = allocs[arch]
            if name == "parametric":
                g = kept[kept["arch"] == arch]
                a = F.parametric_allocation(
                    a, float((g["flops_train"] / (g[F.N_COL] * g["tokens"])).median())
                )
            c = _cgrid(kept.loc[kept["arch"] == arch, "flops_train"])
            marker, ls = styles[name]
            for ax, f, col in ((axes[0], a.n_opt, "N_opt"), (axes[1], a.d_opt, "D_opt")):
                if marker and len(a.optima):
                    ax.scatter(a.optima["flops"], a.optima[col], marker=marker, color=colors[arch], s=18)
                lo, hi = f.interval(c, level=level)
                ax.plot(c, f.predict(c), ls=ls, color=colors[arch], lw=1.3,
                        label=f"{arch} {name}: C^{f.theta[1]:.2f}")  # fmt: skip
                ax.fill_between(c, lo, hi, color=colors[arch], alpha=0.1, lw=0)
    axes[0].set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="N_opt (parameters)",
                title="Compute-optimal model size")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="D_opt (tokens)",
                title="Compute-optimal tokens")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    return _png(fig)


def expert_loads(curves: pd.DataFrame) -> dict[str, np.ndarray]:
    """Last logged `metric/expert_load` (layers x experts) per run that logged one."""
    col = "metric/expert_load"
    if col not in curves:
        return {}
    out = {}
    for (arch, run), g in curves[curves[col].notna()].groupby(["arch", "run"], sort=True):
        v = g[col].iloc[-1]
        try:
            m = np.array(json.loads(v) if isinstance(v, str) else v, dtype=float)
        except (ValueError, TypeError):
            continue
        if m.ndim == 2 and m.size:
            out[f"{arch}/{run}"] = m
    return out


def plot_moe_load(loads: dict[str, np.ndarray], max_panels: int = 6) -> bytes | None:
    """One heatmap per MoE arch, from its last run by name (run names carry size and budget)."""
    per_arch: dict[str, tuple[str, np.ndarray]] = {}
    for name, m in loads.items():
        per_arch[name.split("/", 1)[0]] = (name, m)
    panels = [per_arch[a] for a in sorted(per_arch)][:max_panels]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels, strict=True):
        # imshow, not sns.heatmap: the latter costs ~1 s per panel in text layout
        im = ax.imshow(m, cmap="magma", vmin=0, aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="fraction of tokens")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.grid(False)
        arch, run = name.split("/", 1)
        uniform = float(m.sum(1).mean()) / m.shape[1]  # each row sums to the experts chosen per token
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"{arch} (uniform load = {uniform:.3g})")
        ax.text(0.5, -0.28, run if len(run) <= 70 else run[:67] + "...", transform=ax.transAxes,
                ha="center", fontsize=6, color="dimgrey")  # fmt: skip
    return _png(fig)


# --- the report ----------------------------------------------------------------------------------


def build_report(results: str | Path, out: str | Path | None = None, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95, grid: dict | None = None) -> Path:  # fmt: skip
    """Writes the report for one results directory and returns the report directory."""
    import warnings

    from harness.results import collect
    from harness.results import curves as read_curves

    root = Path(results)
    if not root.is_dir():
        raise ReportError(f"results directory not found: {root}")
    out = Path(out) if out else root / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt runs are listed in the report instead
        runs = collect(root)
        curves = read_curves(root, runs)
    runs = runs[~runs["path"].astype(str).str.startswith(str(out))]
    if runs.empty:
        raise ReportError(
            f"no runs under {root} (a run directory holds config.yaml, metrics.jsonl or summary.json)"
        )
    kept, excluded = F.split_usable(runs)
    kept = kept.sort_values(["arch", "run"], kind="stable").reset_index(drop=True)
    curves = curves.merge(kept[["sweep", "run"]], on=["sweep", "run"]) if len(curves) else curves
    archs = sorted(set(kept["arch"].astype(str)))
    colors = _palette(archs)
    sns.set_theme(style="whitegrid", context="notebook")
    fits = fit_all(kept, curves, n_boot, seed, grid)

    files: dict[str, bytes | str] = {}
    run_table = runs.reindex(columns=RUN_COLS + ["reason"]).sort_values(["arch", "run"], kind="stable")
    files["runs.csv"] = to_csv(run_table)
    buf = io.BytesIO()
    run_table.to_parquet(buf, index=False)
    files["runs.parquet"] = buf.getvalue()
    excl = excluded.reindex(columns=["arch", "run", "status", "why"]).sort_values(
        ["arch", "run"], kind="stable"
    )
    files["excluded.csv"] = to_csv(excl)
    ft = fits_table(fits, level)
    files["fits.csv"] = to_csv(ft)
    iso = pd.concat([a.optima.drop(columns=["N_coef", "D_coef"]).assign(arch=k) for k, a in fits.isoflop.items()]
                    or [pd.DataFrame(columns=["arch"])], ignore_index=True)  # fmt: skip
    files["isoflop_optima.csv"] = to_csv(iso)
    env = pd.concat([a.optima.assign(arch=k) for k, a in fits.envelope.items()] or [pd.DataFrame(columns=["arch"])],
                    ignore_index=True)  # fmt: skip
    files["allocation_optima.csv"] = to_csv(env)
    notes = pd.DataFrame(fits.notes, columns=["arch", "approach", "why not fitted"])
    cmp_flops = float(kept["flops_train"].max()) if len(kept) else math.nan
    cmp, pairs = (compare(runs, cmp_flops, n_boot, seed, level=level, fits=fits.frontier) if len(kept)
                  else (pd.DataFrame(), pd.DataFrame()))  # fmt: skip
    files["compare.csv"] = to_csv(cmp)
    files["compare_pairs.csv"] = to_csv(pairs)

    plots = {
        "loss_vs_compute.png": (plot_loss_vs_compute(kept, fits, colors, level) if len(kept) else None),
        "isoflop.png": plot_isoflop(kept, fits),
        "optimal_allocation.png": plot_allocation(kept, fits, colors, level),
        "training_curves.png": plot_curves(curves, colors) if len(curves) else None,
        "loss_vs_wallclock.png": plot_wallclock(kept, colors) if len(kept) else None,
        "moe_load.png": plot_moe_load(expert_loads(curves)) if len(curves) else None,
    }
    files.update({k: v for k, v in plots.items() if v is not None})

    pct = round(100 * level)
    sections: list[tuple[str, str, pd.DataFrame | None, str | None]] = [
        ("Runs", f"{len(runs)} runs found, {len(kept)} used in fits, {len(excluded)} excluded "
         f"(failed, diverged, incomplete or not comparable). Table: runs.csv.", None, None),
        ("Excluded runs", "", excl, None),
        ("Loss vs compute", f"Final validation loss against training FLOPs; lines are L(C) = E + A C^-alpha fitted "
         f"on each architecture's compute frontier with {pct}% bootstrap bands ({n_boot} resamples); dashed: the "
         "Pareto frontier over all runs.", None, "loss_vs_compute.png"),
        ("Training curves", "Validation loss against cumulative training FLOPs.", None, "training_curves.png"),
        ("IsoFLOP curves", "Loss against model size per budget, with parabola fits in log N (approach 2).", None,
         "isoflop.png"),
        ("Compute-optimal allocation", "N_opt and D_opt against compute from approach 1 (training-curve envelope), "
         "approach 2 (IsoFLOP optima) and approach 3 (parametric fit, C = k N D with k measured).", None,
         "optimal_allocation.png"),
        ("Loss vs wall-clock", "A second Pareto view; wall-clock depends on the hardware each run used.", None,
         "loss_vs_wallclock.png"),
        ("MoE expert load", "Fraction of tokens per expert and MoE layer, last logged step.", None, "moe_load.png"),
        ("Fitted parameters", f"Estimates with {pct}% percentile-bootstrap intervals. frontier: L(C) = E + A C^-alpha; "
         "envelope/isoflop: N_opt = k C^exponent and D_opt likewise; parametric: L = E + A/N^alpha + B/D^beta "
         f"(Huber 1e-3 on log residuals, L-BFGS-B from {_grid_name(grid)}).", ft, None),
        ("Fits not made", "", notes, None),
        (f"Fixed-compute comparison at {cmp_flops:.3g} FLOPs", f"Baseline: {cmp.attrs.get('baseline')}. "
         "multiplier = compute the baseline needs for the same loss / this compute.", cmp, None),
        ("Distinguishable pairs", f"Difference of predicted losses; distinguishable when the {pct}% interval "
         "excludes 0.", pairs, None),
    ]  # fmt: skip
    md, body = [f"# Report: {root.name}\n"], []
    for title, text, table, img in sections:
        if img is not None and img not in files:
            text = "(not drawn: no data for this view)"
            img = None
        md.append(f"## {title}\n\n{text}\n" if text else f"## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(text)}</p>" if text else ""))
        if table is not None:
            md.append(markdown_table(table))
            body.append(
                table.to_html(index=False, float_format="%.4g", na_rep="", border=0)
                if len(table)
                else "<p>(none)</p>"
            )
        if img:
            md.append(f"![{title}]({img})\n")
            body.append(f'<img src="{img}" alt="{html.escape(title)}">')
    files["index.md"] = "\n".join(md)
    files["index.html"] = (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Report: {html.escape(root.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}</style></head>"
        f"<body><h1>Report: {html.escape(root.name)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    for name, data in files.items():
        if isinstance(data, bytes):
            atomic_write_bytes(out / name, data)
        else:
            atomic_write_text(out / name, data)
    for arch, approach, why in fits.notes:
        log.info("%s %s not fitted: %s", arch, approach, why)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="harness-report", description="Plots and tables for one sweep's results."
    )
    p.add_argument("results", help="results directory of one sweep (results/<sweep>)")
    p.add_argument("--out", default=None, help="report directory (default RESULTS/report)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--grid", choices=["coarse", "full"], default="coarse",
                   help="approach-3 starting grid: full = the 4500-point Besiroglu et al. grid (~15 s per arch), "
                        "coarse = every other value of it (243 starts)")  # fmt: skip
    args = p.parse_args(argv)
    grid = F.CHINCHILLA_GRID if args.grid == "full" else COARSE_GRID
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = build_report(args.results, args.out, args.bootstrap, args.seed, args.level, grid)
    except ReportError as e:
        print(f"harness-report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {out}/index.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
