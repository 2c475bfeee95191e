"""`harness-report RESULTS`: every plot and table of a sweep, from its results directory alone (R13).

Writes RESULTS/report/: runs.csv, excluded.csv (every run the fits leave out and every run whose
malformed metrics lines were skipped, with the file at fault and why; the command prints them too),
fits.csv (every fitted parameter with its bootstrap interval), isoflop_optima.csv,
allocation_optima.csv, compare.csv (fixed-compute table at the largest observed compute), the plots
(loss vs compute with fits, bands and the Pareto frontier; IsoFLOP parabolas; N_opt and D_opt vs C;
training curves; loss vs wall-clock; MoE expert load when logged)
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

RUN_COLS = ["arch", "family", "run", "label", "status", "final_val_loss", "params_nonembed", "params_active",
            "tokens", "flops_train", "flops_budget", "wall_s", "device_name", "world_size", "device_hours",
            "train_flops_per_s", "mfu", "peak_mem_gb"]  # fmt: skip
EXCLUDED_COLS = ["arch", "run", "status", "file", "why"]


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


FIT_COLS = ["arch", "approach", "status", "param", "estimate", "lo", "hi", "n_points", "n_boot", "n_boot_failed",
            "why", "form", "note"]  # fmt: skip


def fits_table(fits: Fits, level: float) -> pd.DataFrame:
    frames = []
    for name in ("frontier", "envelope", "isoflop", "parametric"):
        for arch, f in getattr(fits, name).items():
            frames.append(f.table(level).assign(arch=arch, approach=name))
    if not frames:
        return pd.DataFrame(columns=FIT_COLS)
    t = pd.concat(frames, ignore_index=True)
    return t[FIT_COLS].sort_values(["arch", "approach"], kind="stable").reset_index(drop=True)


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


def _legend_outside(ax: plt.Axes, **kw) -> None:
    """Legend to the right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, **kw)


def _panels(n: int, ncols: int = 4, w: float = 4.2, h: float = 3.4, rows_per: int = 1):
    """A grid of `n` panel groups, `rows_per` rows each; unused axes hidden."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols) * rows_per
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    groups = []
    for i in range(-(-n // ncols) * ncols):
        r, c = divmod(i, ncols)
        cell = [axes[r * rows_per + k, c] for k in range(rows_per)]
        if i < n:
            groups.append(cell)
        else:
            for ax in cell:
                ax.set_visible(False)
    return fig, groups


def _pareto_step(ax: plt.Axes, runs: pd.DataFrame, x: str) -> None:
    front = F.pareto_frontier(runs, x=x)
    ax.step(front[x], front[F.LOSS_COL], where="post", color="black", ls="--", lw=1, label="Pareto frontier")


def plot_loss_vs_compute(kept: pd.DataFrame, fits: Fits, colors: dict, level: float) -> bytes:
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for arch, g in kept.groupby("arch", sort=True):
        f = fits.frontier.get(arch)
        ok = f is not None and f.status == F.IDENTIFIED
        label = f"{arch}: {f.extra.get('form', F.FULL_FORM)}" if ok else f"{arch} (no identified fit)"
        ax.scatter(g["flops_train"], g[F.LOSS_COL], color=colors[arch], s=28, label=label,
                   marker="o" if ok else "x", alpha=0.9)  # fmt: skip
        if ok:
            c = _cgrid(g["flops_train"])
            lo, hi = f.interval(c, level=level)
            ax.plot(c, f.predict(c), color=colors[arch], lw=1.5)
            ax.fill_between(c, lo, hi, color=colors[arch], alpha=0.15, lw=0)
    _pareto_step(ax, kept, "flops_train")
    ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="final validation loss (nats/token)",
           title=f"Loss vs compute: identified frontier fits, {round(100 * level)}% bands")  # fmt: skip
    _loss_ylim(ax, kept[F.LOSS_COL])
    _legend_outside(ax)
    return _png(fig)


def plot_cost(kept: pd.DataFrame, colors: dict) -> bytes:
    """Loss against training FLOPs and against device-hours, side by side: an architecture can win
    per FLOP and lose per hour (a kernel it lacks, a scan that does not use the tensor cores)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (("flops_train", "training compute C (FLOPs)"),
              ("device_hours", "device-hours (wall-clock x devices held)"))  # fmt: skip
    for ax, (x, label) in zip(axes, panels, strict=True):
        d = kept[np.isfinite(kept[x]) & (kept[x] > 0)]
        sns.scatterplot(
            data=d, x=x, y=F.LOSS_COL, hue="arch", palette=colors, ax=ax, s=40, legend=ax is axes[1]
        )
        if len(d):
            _pareto_step(ax, d, x)
        ax.set(xscale="log", xlabel=label)
    devices = sorted({str(n) for n in kept.get("device_name", pd.Series(dtype=object)).dropna()})
    on = f" on {', '.join(devices[:3])}{' and others' if len(devices) > 3 else ''}" if devices else ""
    axes[0].set(ylabel="final validation loss (nats/token)", title="Per FLOP")
    axes[1].set(title=f"Per device-hour{on}")
    _loss_ylim(axes[0], kept[F.LOSS_COL])
    _legend_outside(axes[1])
    return _png(fig)


def plot_curves(curves: pd.DataFrame, colors: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(8.5, 5))
    d = curves[np.isfinite(curves["val_loss"]) & (curves["flops_train"] > 0)]
    for (arch, _run), g in d.groupby(["arch", "run"], sort=True):
        ax.plot(g["flops_train"], g["val_loss"], color=colors.get(arch, "grey"), lw=1, alpha=0.8)
    for arch in sorted(set(d["arch"])):
        ax.plot([], [], color=colors.get(arch, "grey"), label=arch)
    ax.set(xscale="log", xlabel="training compute so far (FLOPs)", ylabel="validation loss (nats/token)",
           title="Training curves (validation loss, one line per run)")  # fmt: skip
    _legend_outside(ax)
    return _png(fig)


def plot_isoflop(kept: pd.DataFrame, parabolas: dict[str, pd.DataFrame]) -> bytes | None:
    """One panel per arch: loss against N per budget, the parabola, and its optimum when the grid brackets it."""
    archs = [a for a in sorted(parabolas) if len(parabolas[a])]
    if not archs:
        return None
    budgets = sorted({float(b) for a in archs for b in parabolas[a]["flops"]})
    cols = dict(zip(budgets, sns.color_palette("viridis", len(budgets)), strict=True))
    fig, groups = _panels(len(archs))
    for (ax,), arch in zip(groups, archs, strict=True):
        g = kept[(kept["arch"] == arch) & np.isfinite(kept["flops_budget"])]
        par = parabolas[arch]
        for row in par.itertuples():
            gb = g[g["flops_budget"] == row.flops]
            col = cols[float(row.flops)]
            ax.scatter(gb[F.N_COL], gb[F.LOSS_COL], color=col, s=22)
            if not isinstance(row.N_coef, np.ndarray):
                continue
            x = np.linspace(np.log(row.N_min), np.log(row.N_max), 60)
            convex = row.N_coef[0] > 0
            ax.plot(np.exp(x), np.polyval(row.N_coef, x), color=col, lw=1, ls="-" if convex else ":")
            if row.ok:
                ax.scatter(
                    [row.N_opt], [row.L_opt], marker="*", s=150, color=col, edgecolor="black", zorder=5
                )
            elif convex and row.side:  # the optimum lies at or past this edge: mark it
                edge = row.N_min if row.side == "below" else row.N_max
                ax.scatter([edge], [gb.loc[gb[F.N_COL] == edge, F.LOSS_COL].min()],
                           marker="<" if row.side == "below" else ">", s=90, facecolor="none", edgecolor=col,
                           lw=1.5, zorder=5)  # fmt: skip
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final val loss (nats/token)",
               title=f"{arch}: {int(par['ok'].sum())}/{len(par)} budgets bracket the optimum")  # fmt: skip
    handles = [
        plt.Line2D([], [], color=cols[b], marker="o", lw=1, label=f"C = {b:.2g} FLOPs") for b in budgets
    ]
    handles += [
        plt.Line2D([], [], color="grey", marker="*", ms=11, mec="black", lw=0, label="optimum inside the grid"),
        plt.Line2D([], [], color="grey", marker=">", ms=8, mfc="none", lw=0,
                   label="optimum at or past this edge (not used)"),
        plt.Line2D([], [], color="grey", ls=":", label="parabola not convex (not used)"),
    ]  # fmt: skip
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)),
               fontsize=8, frameon=False)  # fmt: skip
    return _png(fig)


APPROACH_STYLE = {  # (label, color, marker, line style)
    "envelope": ("approach 1: training-curve envelope", "tab:blue", "o", "-"),
    "isoflop": ("approach 2: IsoFLOP optima", "tab:orange", "s", "--"),
    "parametric": ("approach 3: parametric L(N, D)", "tab:green", None, ":"),
}


def allocations(kept: pd.DataFrame, fits: Fits) -> dict[str, dict[str, F.Allocation]]:
    """arch -> approach -> allocation; approach 3's from its L(N, D) with this arch's measured C / (N D)."""
    out: dict[str, dict[str, F.Allocation]] = {}
    for name in APPROACH_STYLE:
        for arch, a in getattr(fits, name).items():
            if name == "parametric":
                g = kept[kept["arch"] == arch]
                a = F.parametric_allocation(
                    a, float((g["flops_train"] / (g[F.N_COL] * g["tokens"])).median())
                )
            out.setdefault(arch, {})[name] = a
    return out


def plot_allocation(
    kept: pd.DataFrame, allocs: dict[str, dict[str, F.Allocation]], level: float
) -> bytes | None:
    """Per arch a column of two panels (N_opt, D_opt against C); a fit that is not identified shows its
    optima (hollow) and no line."""
    archs = sorted(allocs)
    if not archs:
        return None
    fig, groups = _panels(len(archs), w=4.0, h=3.0, rows_per=2)
    for (ax_n, ax_d), arch in zip(groups, archs, strict=True):
        c_runs = kept.loc[kept["arch"] == arch, "flops_train"]
        shown, missing = [], []
        for name, a in allocs[arch].items():
            label, color, marker, ls = APPROACH_STYLE[name]
            ok = a.status == F.IDENTIFIED
            c = _cgrid(a.optima["flops"] if len(a.optima) else c_runs)  # where this approach has data
            for ax, f, col in ((ax_n, a.n_opt, "N_opt"), (ax_d, a.d_opt, "D_opt")):
                if marker and len(a.optima):
                    ax.scatter(a.optima["flops"], a.optima[col], marker=marker, s=18, lw=1,
                               facecolor=color if ok else "none", edgecolor=color)  # fmt: skip
                if ok:
                    lo, hi = f.interval(c, level=level)
                    ax.plot(c, f.predict(c), ls=ls, color=color, lw=1.5)
                    ax.fill_between(c, lo, hi, color=color, alpha=0.12, lw=0)
            lo, hi = a.n_opt.ci(level)["exponent"]
            (shown if ok else missing).append(
                f"{name}: N ~ C^{a.n_opt.theta[1]:.2f} [{lo:.2f}, {hi:.2f}]" if ok else name
            )
        note = "\n".join(shown + ([f"not identified: {', '.join(missing)}"] if missing else []))
        ax_n.text(0.02, 0.98, note, transform=ax_n.transAxes, va="top", fontsize=7,
                  bbox=dict(facecolor="white", alpha=0.8, lw=0))  # fmt: skip
        ax_n.set(xscale="log", yscale="log", ylabel="N_opt (parameters)", title=arch)
        ax_d.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="D_opt (tokens)")
    handles = [
        plt.Line2D([], [], color=c_, marker=m, ls=ls, label=lab) for lab, c_, m, ls in APPROACH_STYLE.values()
    ]
    handles.append(plt.Line2D([], [], color="grey", marker="o", mfc="none", lw=0,
                              label="hollow: optima of a fit that is not identified (no line)"))  # fmt: skip
    fig.tight_layout()
    fig.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False
    )
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


def plot_moe_load(loads: dict[str, np.ndarray], runs: pd.DataFrame | None = None,
                  max_panels: int = 6) -> bytes | None:  # fmt: skip
    """One heatmap per MoE arch, from its run with the most training compute (`runs`: the run table,
    for compute and labels; without it, the last run by name)."""
    info = {}
    if runs is not None and len(runs):
        info = {f"{r.arch}/{r.run}": (float(r.flops_train), str(r.label)) for r in runs.itertuples()}
    per_arch: dict[str, tuple[str, np.ndarray]] = {}
    for name in sorted(loads, key=lambda k: (info.get(k, (0.0, ""))[0], k)):
        per_arch[name.split("/", 1)[0]] = (name, loads[name])
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
        run = info.get(name, (0.0, run))[1]
        uniform = float(m.sum(1).mean()) / m.shape[1]  # each row sums to the experts chosen per token
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"{arch} (uniform load = {uniform:.3g})")
        ax.text(0.5, -0.22, run if len(run) <= 70 else run[:67] + "...", transform=ax.transAxes,
                ha="center", fontsize=6, color="dimgrey")  # fmt: skip
    return _png(fig)


# --- the report ----------------------------------------------------------------------------------


def isoflop_by_arch(kept: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per arch with budgeted runs: every budget's parabola, optimum and whether its grid brackets it."""
    out = {}
    for arch, g in kept.groupby("arch", sort=True):
        g = g[np.isfinite(g["flops_budget"].astype(float))]
        if len(g):
            out[str(arch)] = F.isoflop_parabolas(g)
    return out


def fit_status(fits: Fits) -> pd.DataFrame:
    """One row per fit made: arch, approach, status, reasons."""
    rows = [dict(arch=arch, approach=name, status=f.status, why="; ".join(f.reasons),
                 note=getattr(f, "extra", {}).get("note", ""))
            for name in ("frontier", "envelope", "isoflop", "parametric")
            for arch, f in sorted(getattr(fits, name).items())]  # fmt: skip
    rows += [
        dict(arch=arch, approach=name, status="not fitted", why=why, note="")
        for arch, name, why in fits.notes
    ]
    t = pd.DataFrame(rows, columns=["arch", "approach", "status", "why", "note"])
    return t.sort_values(["arch", "approach"], kind="stable").reset_index(drop=True)


def _count_ok(fits: dict) -> str:
    ok = sorted(a for a, f in fits.items() if f.status == F.IDENTIFIED)
    return f"the {len(ok)} architectures whose fit is identified" + (f" ({', '.join(ok)})" if ok else "")


def _alloc_summary(allocs: dict[str, dict[str, F.Allocation]]) -> str:
    parts = []
    for arch in sorted(allocs):
        ok = [n for n, a in allocs[arch].items() if a.status == F.IDENTIFIED]
        parts.append(f"{arch}: {', '.join(ok) if ok else 'none'}")
    return "; ".join(parts) if parts else "none"


def build_report(results: str | Path, out: str | Path | None = None, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95, grid: dict | None = None) -> Path:  # fmt: skip
    """Writes the report for one results directory and returns the report directory."""
    import warnings

    from harness.results import collect, exclusions
    from harness.results import curves as read_curves

    root = Path(results)
    if not root.is_dir():
        raise ReportError(f"results directory not found: {root}")
    out = Path(out) if out else root / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem is listed in excluded.csv and index.md instead
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
    run_table = runs.reindex(columns=RUN_COLS + ["reason", "file", "metrics_skipped"]).sort_values(
        ["arch", "run"], kind="stable"
    )
    files["runs.csv"] = to_csv(run_table)
    buf = io.BytesIO()
    run_table.to_parquet(buf, index=False)
    files["runs.parquet"] = buf.getvalue()
    excl = exclusions(runs).reindex(columns=EXCLUDED_COLS)
    n_lines = int((excl["file"] == "metrics.jsonl").sum())
    files["excluded.csv"] = to_csv(excl)
    ft = fits_table(fits, level)
    files["fits.csv"] = to_csv(ft)
    status = fit_status(fits)
    parabolas = isoflop_by_arch(kept)
    iso = pd.concat([p.drop(columns=["N_coef", "D_coef"]).assign(arch=k) for k, p in parabolas.items()]
                    or [pd.DataFrame(columns=["arch"])], ignore_index=True)  # fmt: skip
    iso = iso.reindex(
        columns=["arch", "flops", "n_runs", "ok", "why", "N_opt", "D_opt", "L_opt", "N_min", "N_max"]
    )
    files["isoflop_optima.csv"] = to_csv(iso)
    missed = iso[~iso["ok"].astype(bool)].rename(columns={"flops": "budget"})[
        ["arch", "budget", "n_runs", "why"]
    ]
    env = pd.concat([a.optima.assign(arch=k) for k, a in fits.envelope.items()] or [pd.DataFrame(columns=["arch"])],
                    ignore_index=True)  # fmt: skip
    files["allocation_optima.csv"] = to_csv(env)
    notes = pd.DataFrame(fits.notes, columns=["arch", "approach", "why not fitted"])
    cmp_flops = float(kept["flops_train"].max()) if len(kept) else math.nan
    cmp, pairs = (compare(runs, cmp_flops, n_boot, seed, level=level, fits=fits.frontier) if len(kept)
                  else (pd.DataFrame(), pd.DataFrame()))  # fmt: skip
    files["compare.csv"] = to_csv(cmp)
    files["compare_pairs.csv"] = to_csv(pairs)
    allocs = allocations(kept, fits)

    plots = {
        "loss_vs_compute.png": (plot_loss_vs_compute(kept, fits, colors, level) if len(kept) else None),
        "isoflop.png": plot_isoflop(kept, parabolas),
        "optimal_allocation.png": plot_allocation(kept, allocs, level),
        "training_curves.png": plot_curves(curves, colors) if len(curves) else None,
        "loss_vs_cost.png": plot_cost(kept, colors) if len(kept) else None,
        "moe_load.png": plot_moe_load(expert_loads(curves), kept) if len(curves) else None,
    }
    files.update({k: v for k, v in plots.items() if v is not None})

    pct = round(100 * level)
    span = F._decades(kept["flops_train"].to_numpy(float)) if len(kept) else 0.0
    n_iso = len(iso)
    sections: list[tuple[str, str, pd.DataFrame | None, str | None]] = [
        ("Runs", (f"{len(runs)} runs found, {len(kept)} used in fits, {len(excluded)} excluded "
         f"(failed, diverged, incomplete, corrupt, invalid or not comparable). Training compute spans {span:.2f} "
         f"decades ({kept['flops_train'].min():.3g} to {kept['flops_train'].max():.3g} FLOPs). Table: runs.csv."
         if len(kept) else f"{len(runs)} runs found, none usable in fits, {len(excluded)} excluded.")
         + (f" Malformed metrics.jsonl lines were skipped in {n_lines} run{'s' * (n_lines > 1)}." if n_lines
            else ""), None, None),
        ("Exclusions", f"{len(excl)} exclusions: each run the fits leave out and each run with skipped metrics "
         "lines, with the file at fault (empty for a run-level reason) and why. Table: excluded.csv.", excl, None),
        ("Which fits the data identify", "A fit is `ok` when its data determine it, and `not identified` otherwise, "
         "with the reasons (too few points, a compute span under a decade, a parameter at a bound, failed bootstrap "
         "refits, an interval spanning an order of magnitude, an optimum outside the sampled sizes). Plots draw "
         "only identified fits; the others are listed here and in fits.csv.", status, None),
        ("Loss vs compute", f"Final validation loss against training FLOPs, one point per run. Lines: L(C) = E + A "
         f"C^-alpha on each architecture's compute frontier with {pct}% bootstrap bands ({n_boot} resamples), drawn "
         f"for {_count_ok(fits.frontier)}; where the data do not identify E, the line is A C^-alpha (E = 0), as the "
         "legend says. An architecture without an identified fit is drawn as crosses. Dashed: the Pareto frontier "
         "over all runs. Each point is one run with one seed.", None, "loss_vs_compute.png"),
        ("Training curves", "Validation loss against cumulative training FLOPs, one line per run.", None,
         "training_curves.png"),
        ("IsoFLOP curves", f"Loss against model size at each compute budget, one panel per architecture, with a "
         f"parabola in log N (approach 2). {int(iso['ok'].sum())} of {n_iso} (architecture, budget) grids bracket "
         "their optimum (star); an optimum at or beyond the edge of the sampled sizes (open triangle) or a parabola that is not convex "
         "(dotted) is an extrapolation and is left out of the allocation fit.", None, "isoflop.png"),
        ("IsoFLOP grids that missed their optimum", "These budgets need more model sizes on the side the triangle "
         "points to; `harness-plan --extend RESULTS` writes the runs that would bracket them." if len(missed)
         else "Every grid brackets its optimum.", missed if len(missed) else None, None),
        ("Compute-optimal allocation", "N_opt and D_opt against compute per architecture: approach 1 "
         "(training-curve envelope), approach 2 (IsoFLOP optima) and approach 3 (parametric fit, C = k N D with k "
         f"measured), with {pct}% bands. Lines are drawn for identified fits only: "
         f"{_alloc_summary(allocs)}.", None, "optimal_allocation.png"),
        ("Loss per FLOP and per device-hour", "The same runs against training FLOPs and against device-hours "
         "(wall-clock x devices held, evaluation included): the second view depends on the hardware and kernels "
         "each run used. Steady-state throughput and MFU per run are in runs.csv.", None, "loss_vs_cost.png"),
        ("MoE expert load", "Fraction of tokens per expert and MoE layer at the last logged step of each MoE "
         "architecture's largest-compute run.", None, "moe_load.png"),
        ("Fitted parameters", f"Estimates with {pct}% percentile-bootstrap intervals, and each fit's status. frontier: "
         "L(C) = E + A C^-alpha; envelope/isoflop: N_opt = k C^exponent and D_opt likewise; parametric: L = E + "
         f"A/N^alpha + B/D^beta (Huber 1e-3 on log residuals, L-BFGS-B from {_grid_name(grid)}). A, B and k are "
         "values at N, D or C = 1, far outside the data: read them with their exponent.", ft, None),
        ("Fits not made", "", notes, None),
        (f"Fixed-compute comparison at {cmp_flops:.3g} FLOPs", f"Baseline: {cmp.attrs.get('baseline')}. "
         "multiplier = compute the baseline needs for the same loss / this compute. An architecture whose frontier "
         "fit is not identified gets no prediction; `note` says why any value is missing.", cmp, None),
        ("Distinguishable pairs", f"Difference of predicted losses between identified fits; distinguishable when "
         f"the {pct}% interval excludes 0.", pairs, None),
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
    from harness.results import exclusion_lines

    excl = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False)
    for line in exclusion_lines(excl):
        print(line)
    print(f"report written to {out}/index.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
