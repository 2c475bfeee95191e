"""Scaling-law fits with bootstrap uncertainty: pure functions, tables in, dataclasses out (R11).

- `fit_frontier`: L(C) = E + A * C^(-alpha) on the lower envelope (Pareto frontier) of runs.
- `fit_envelope` (Chinchilla approach 1, Hoffmann et al. 2022 sec. 3.1): at each compute C the run
  whose training curve is lowest gives N_opt(C), D_opt(C); power laws are fitted to those.
- `fit_isoflop` (approach 2, sec. 3.2): a parabola in log N (and one in log D) per IsoFLOP budget,
  its vertex is the optimum, power laws over budgets.
- `fit_parametric` (approach 3, sec. 3.3, as replicated by Besiroglu et al. 2024, "Chinchilla
  Scaling: A replication attempt"): L(N, D) = E + A/N^alpha + B/D^beta, written as
  log L = LSE(a - alpha log N, b - beta log D, e) with A, B, E = exp(a), exp(b), exp(e); the sum of
  Huber losses (delta 1e-3) of log-space residuals is minimised with L-BFGS-B from every point of
  the grid alpha, beta in {0, .5, .., 2}, e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}; the best is
  kept. Bootstrap refits start from the full-sample optimum (a full grid per resample costs 4500
  fits; the optimum of a resample lies next to the full-sample one).

Every fit carries bootstrap refits (`Fit.samples`, resampling runs with replacement from a passed
`np.random.Generator`) and gives percentile intervals for each parameter and each prediction.

Every fit also says whether its data identify it (`Fit.status`: "ok" or "not identified", with
`Fit.reasons`), by the checks of `Checks`: too few points for its parameters, a compute span under a
decade, a parameter at a bound (E at 0, an exponent outside its plausible range, a log-coefficient
beyond the start grid), too many failed bootstrap refits, an interval spanning an order of magnitude
or more.
Coefficients A, B and k are the law's value at N, D or C = 1, many decades outside any data, so their
intervals are judged where the data are: A N_ref^-alpha, B D_ref^-beta, k C_ref^exponent at the
geometric means of the data. An IsoFLOP budget gives an optimum only when its parabola is convex and
its vertex lies inside the sampled sizes (`isoflop_parabolas`, column `why`); other budgets are listed
and left out of the power laws.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
    "e": np.arange(-1.0, 1.5, 0.5),
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
}
# Frontier starts are on a centred compute axis (log C - log C_ref), so a = log(L(C_ref) - E).
FRONTIER_GRID = {
    "alpha": np.array([0.1, 0.3, 0.9]),
    "e": np.array([-1.0, 0.0, 1.0]),
    "a": np.array([-2.0, -0.5, 1.0]),
}
MIN_POINTS = {"frontier": 3, "envelope": 2, "isoflop": 3, "parametric": 6}
IDENTIFIED, NOT_IDENTIFIED = "ok", "not identified"
N_COL = "params_nonembed"
LOSS_COL = "final_val_loss"


class FitError(ValueError):
    """Not enough usable data for a fit; the message says what is missing."""


@dataclass(frozen=True)
class Fit:
    """A fitted law: point estimate `theta` and bootstrap refits `samples` (NaN rows: failed refits)."""

    kind: str
    names: tuple[str, ...]
    theta: np.ndarray
    samples: np.ndarray
    n_points: int
    model: Callable[..., np.ndarray]
    extra: dict = field(default_factory=dict)
    reasons: tuple[str, ...] = ()  # why the data do not identify this fit; empty: identified

    @property
    def status(self) -> str:
        return NOT_IDENTIFIED if self.reasons else IDENTIFIED

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.theta), strict=True))

    def _ok(self) -> np.ndarray:
        return self.samples[np.all(np.isfinite(self.samples), axis=1)]

    def ci(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        ok, q = self._ok(), 50 * (1 - level)
        if len(ok) == 0:
            return {n: (math.nan, math.nan) for n in self.names}
        lo, hi = np.percentile(ok, [q, 100 - q], axis=0)
        return {n: (float(lo[i]), float(hi[i])) for i, n in enumerate(self.names)}

    def predict(self, *x: np.ndarray) -> np.ndarray:
        return self.model(self.theta[None, :], *map(np.asarray, x))[0]

    def interval(self, *x: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        ok, q = self._ok(), 50 * (1 - level)
        shape = np.broadcast(*map(np.asarray, x)).shape
        if len(ok) == 0:
            return np.full(shape, math.nan), np.full(shape, math.nan)
        pred = self.model(ok, *map(np.asarray, x))
        return tuple(np.nanpercentile(pred, [q, 100 - q], axis=0))

    def table(self, level: float = 0.95) -> pd.DataFrame:
        ci = self.ci(level)
        n_ok = len(self._ok())
        return pd.DataFrame(
            [
                dict(param=n, estimate=float(v), lo=ci[n][0], hi=ci[n][1], n_points=self.n_points,
                     n_boot=n_ok, n_boot_failed=len(self.samples) - n_ok, status=self.status,
                     why="; ".join(self.reasons), form=self.extra.get("form", ""),
                     note=self.extra.get("note", ""))
                for n, v in zip(self.names, self.theta, strict=True)
            ]
        )  # fmt: skip


@dataclass(frozen=True)
class Allocation:
    """Compute-optimal allocation N_opt(C) = k_N C^a and D_opt(C) = k_D C^b, and the optima it came from."""

    kind: str
    n_opt: Fit
    d_opt: Fit
    optima: pd.DataFrame

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.n_opt.reasons + self.d_opt.reasons))

    @property
    def status(self) -> str:
        return NOT_IDENTIFIED if self.reasons else IDENTIFIED

    def with_reasons(self, reasons: tuple[str, ...]) -> Allocation:
        """The same allocation with `reasons` put first on both of its laws."""
        if not reasons:
            return self
        return replace(self, n_opt=replace(self.n_opt, reasons=reasons + self.n_opt.reasons),
                       d_opt=replace(self.d_opt, reasons=reasons + self.d_opt.reasons))  # fmt: skip

    def table(self, level: float = 0.95) -> pd.DataFrame:
        a = self.n_opt.table(level).assign(param=lambda t: "N_opt." + t.param)
        b = self.d_opt.table(level).assign(param=lambda t: "D_opt." + t.param)
        return pd.concat([a, b], ignore_index=True)


def power_law(theta: np.ndarray, c: np.ndarray) -> np.ndarray:
    """theta rows (k, exponent): k * C^exponent, shape (rows, *C.shape)."""
    k, p = (theta[:, i].reshape((-1,) + (1,) * np.ndim(c)) for i in range(2))
    return k * np.asarray(c, dtype=float) ** p


def frontier_loss(theta: np.ndarray, c: np.ndarray) -> np.ndarray:
    """theta rows (E, A, alpha): E + A * C^-alpha."""
    e, a, al = (theta[:, i].reshape((-1,) + (1,) * np.ndim(c)) for i in range(3))
    return e + a * np.asarray(c, dtype=float) ** -al


def parametric_loss(theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """theta rows (E, A, B, alpha, beta): E + A/N^alpha + B/D^beta."""
    nd = np.ndim(np.broadcast(n, d))
    e, a, b, al, be = (theta[:, i].reshape((-1,) + (1,) * nd) for i in range(5))
    return e + a * np.asarray(n, dtype=float) ** -al + b * np.asarray(d, dtype=float) ** -be


def frontier_inverse(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Compute at which E + A C^-alpha reaches `loss` (inf where loss <= E)."""
    e, a, al = (theta[:, i].reshape((-1,) + (1,) * np.ndim(loss)) for i in range(3))
    gap = np.asarray(loss, dtype=float) - e
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (a / np.where(gap > 0, gap, 1.0)) ** (1 / al), np.inf)


# --- data selection ---------------------------------------------------------------------------


def split_usable(runs: pd.DataFrame, loss_col: str = LOSS_COL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs fits may use, excluded runs with a `why` column). Excluded: not completed (failed,
    running, corrupt or invalid: `why` is the status and its reason), a non-finite or negative loss,
    no compute, or marked not comparable (a non-causal mixer's loss is not an LM loss)."""
    why = pd.Series("", index=runs.index, dtype=object)
    status = runs["status"].fillna("unknown").astype(str)
    reason = runs["reason"].fillna("").astype(str) if "reason" in runs else pd.Series("", index=runs.index)
    why[status != "completed"] = status + np.where(reason != "", ": " + reason, "")
    loss = pd.to_numeric(runs[loss_col], errors="coerce")
    flops = pd.to_numeric(runs["flops_train"], errors="coerce")
    why[(why == "") & ~np.isfinite(loss)] = "non-finite loss (diverged)"
    # a cross-entropy is never negative: such a number is a bug upstream, not a good run
    why[(why == "") & (loss < 0)] = "negative loss (impossible)"
    why[(why == "") & ~(np.isfinite(flops) & (flops > 0))] = "no training FLOP count"
    if "comparable" in runs:
        why[(why == "") & ~runs["comparable"].fillna(True).astype(bool)] = "not comparable (non-causal)"
    return runs[why == ""].copy(), runs[why != ""].assign(why=why[why != ""])


def pareto_frontier(df: pd.DataFrame, x: str = "flops_train", y: str = LOSS_COL) -> pd.DataFrame:
    """Rows no other row beats on both x (lower) and y (lower), sorted by x."""
    d = df.sort_values([x, y], kind="stable")
    best = d[y].cummin().shift(fill_value=np.inf)
    return d[d[y] < best]


# --- identification: does the data determine the fit? --------------------------------------------


@dataclass(frozen=True)
class Checks:
    """Thresholds of the identification checks (module docstring)."""

    min_decades: float = 1.0  # compute span of the points a fit uses
    max_boot_failed: float = 0.1  # share of bootstrap refits that may fail
    max_ci_ratio: float = 10.0  # hi / lo of a positive quantity's interval: one order of magnitude
    max_exponent_width: float = 1.0  # width of an exponent's interval
    min_e_share: float = 0.01  # E below this share of the lowest loss sits at its bound 0
    max_edge_share: float = 0.5  # envelope optima at the smallest or largest model trained
    level: float = 0.95


CHECKS = Checks()
# Plausible ranges of the fitted exponents and log-coefficients: the start grids' spans, widened by a
# step. An estimate outside ran off to a bound the optimizer does not have (E -> 0, alpha -> inf).
FRONTIER_BOUNDS = {"alpha": (0.02, 3.0)}
PARAMETRIC_BOUNDS = {"alpha": (0.02, 2.5), "beta": (0.02, 2.5), "log A": (-5.0, 30.0), "log B": (-5.0, 30.0)}


def _decades(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.log10(x.max() / x.min())) if len(x) else 0.0


def _span_reason(x: np.ndarray, what: str, checks: Checks) -> list[str]:
    d = _decades(x)
    return [f"{what} spans {d:.2g} decades (under {checks.min_decades:g})"] if d < checks.min_decades else []


def _few_reason(n: int, n_params: int, what: str) -> list[str]:
    return [f"too few points: {n} {what} for {n_params} parameters"] if n <= n_params else []


def _boot_reason(samples: np.ndarray, checks: Checks) -> list[str]:
    if not len(samples):
        return []
    failed = float(np.mean(~np.all(np.isfinite(samples), axis=1)))
    return [f"{failed:.0%} of bootstrap refits failed"] if failed > checks.max_boot_failed else []


def _interval(draws: np.ndarray, checks: Checks) -> tuple[float, float] | None:
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    q = 50 * (1 - checks.level)
    lo, hi = np.percentile(draws, [q, 100 - q])
    return float(lo), float(hi)


def _ratio_reason(name: str, draws: np.ndarray, checks: Checks) -> list[str]:
    """A positive quantity whose interval spans an order of magnitude or more (or reaches 0)."""
    iv = _interval(draws, checks)
    if iv is None or (iv[0] > 0 and iv[1] / iv[0] <= checks.max_ci_ratio):
        return []
    lo, hi = iv
    span = "reaches 0" if lo <= 0 else f"spans {math.log10(hi / lo):.2g} orders of magnitude"
    return [f"{name}: {round(100 * checks.level)}% interval [{lo:.3g}, {hi:.3g}] {span}"]


def _width_reason(name: str, draws: np.ndarray, checks: Checks) -> list[str]:
    """An exponent whose interval is wider than `max_exponent_width`."""
    iv = _interval(draws, checks)
    if iv is None or iv[1] - iv[0] <= checks.max_exponent_width:
        return []
    return [f"{name}: {round(100 * checks.level)}% interval [{iv[0]:.3g}, {iv[1]:.3g}] is wider than "
            f"{checks.max_exponent_width:g}"]  # fmt: skip


def _bound_reason(
    name: str, value: float, bounds: tuple[float, float], shown: str | None = None
) -> list[str]:
    lo, hi = bounds
    if lo <= value <= hi:
        return []
    return [f"{shown or name} = {value:.3g}: {name} outside [{lo:g}, {hi:g}], at a bound of the fit"]


def _e_reason(e: float, min_loss: float, checks: Checks) -> list[str]:
    if e < checks.min_e_share * min_loss:
        return [f"E = {e:.3g} at its lower bound 0"]
    return []


def frontier_reasons(fit: Fit, c: np.ndarray, loss: np.ndarray, checks: Checks = CHECKS,
                     fixed_e: bool = False) -> tuple[str, ...]:  # fmt: skip
    """Why (C, L) data do not identify E + A C^-alpha (A C^-alpha when `fixed_e`); `c`, `loss`: every
    run the fit drew from."""
    e, a, al = fit.theta
    ok = fit._ok()
    c_ref = float(np.exp(np.mean(np.log(c))))
    out = _few_reason(fit.n_points, 2 if fixed_e else 3, "runs on the compute frontier")
    out += _span_reason(c, "compute", checks)
    out += [] if fixed_e else _e_reason(e, float(np.min(loss)), checks)
    out += _bound_reason("alpha", al, FRONTIER_BOUNDS["alpha"])
    out += _boot_reason(fit.samples, checks)
    if len(ok) and not fixed_e:
        out += _ratio_reason("E", ok[:, 0], checks)
    if len(ok):
        out += _ratio_reason("alpha", ok[:, 2], checks)
        out += _ratio_reason(f"A C^-alpha at C = {c_ref:.3g}", ok[:, 1] * c_ref ** -ok[:, 2], checks)
    return tuple(out)


def parametric_reasons(fit: Fit, n: np.ndarray, d: np.ndarray, loss: np.ndarray,
                       checks: Checks = CHECKS) -> tuple[str, ...]:  # fmt: skip
    """Why (N, D, L) data do not identify E + A/N^alpha + B/D^beta; compute is taken as N D."""
    e, a, b, al, be = fit.theta
    ok = fit._ok()
    n_ref, d_ref = (float(np.exp(np.mean(np.log(v)))) for v in (n, d))
    out = _few_reason(fit.n_points, 5, "runs")
    out += _span_reason(np.asarray(n) * np.asarray(d), "compute (N D)", checks)
    out += _e_reason(e, float(np.min(loss)), checks)
    out += _bound_reason("alpha", al, PARAMETRIC_BOUNDS["alpha"])
    out += _bound_reason("beta", be, PARAMETRIC_BOUNDS["beta"])
    out += _bound_reason("log A", math.log(a), PARAMETRIC_BOUNDS["log A"], f"A = {a:.3g}, log A")
    out += _bound_reason("log B", math.log(b), PARAMETRIC_BOUNDS["log B"], f"B = {b:.3g}, log B")
    out += _boot_reason(fit.samples, checks)
    if len(ok):
        out += _ratio_reason("E", ok[:, 0], checks)
        out += _ratio_reason("alpha", ok[:, 3], checks)
        out += _ratio_reason("beta", ok[:, 4], checks)
        out += _ratio_reason(f"A N^-alpha at N = {n_ref:.3g}", ok[:, 1] * n_ref ** -ok[:, 3], checks)
        out += _ratio_reason(f"B D^-beta at D = {d_ref:.3g}", ok[:, 2] * d_ref ** -ok[:, 4], checks)
    return tuple(out)


def power_law_reasons(fit: Fit, c: np.ndarray, what: str, checks: Checks = CHECKS, distinct: int | None = None,
                      span: np.ndarray | None = None) -> tuple[str, ...]:  # fmt: skip
    """Why optima at compute values `c` do not identify `what` = k C^exponent; `distinct`: how many
    different optima they hold (default: one per compute value), `span`: the compute they stand for."""
    k, p = fit.theta
    ok = fit._ok()
    c = np.asarray(c, dtype=float)
    c_ref = float(np.exp(np.mean(np.log(c)))) if len(c) else 1.0
    n = len(np.unique(c)) if distinct is None else distinct
    out = _few_reason(n, 2, f"distinct optima for {what}")
    out += _span_reason(c if span is None else span, f"{what}: compute of the optima", checks)
    out += _boot_reason(fit.samples, checks)
    if len(ok):
        out += _width_reason(f"{what} exponent", ok[:, 1], checks)
        out += _ratio_reason(f"{what} at C = {c_ref:.3g}", ok[:, 0] * c_ref ** ok[:, 1], checks)
    return tuple(out)


# --- the log-sum-exp Huber fit (Hoffmann et al. 2022 eq. 10; Besiroglu et al. 2024) ---------------


def _lse_objective(theta: np.ndarray, feats_t: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber(LSE(e, c_j - s_j f_j) - log L) and its gradient; theta = (e, c_1..c_m, s_1..s_m),
    feats_t (m, n). With c = clip(r, -delta, delta), Huber(r) = c (r - c/2) in both branches."""
    m = feats_t.shape[0]
    t = theta[1 : m + 1, None] - theta[m + 1 :, None] * feats_t
    mx = np.maximum(t.max(axis=0), theta[0])  # log-sum-exp shift: N^-alpha underflows otherwise
    w = np.exp(t - mx)
    w0 = np.exp(theta[0] - mx)
    s = w0 + w.sum(axis=0)
    r = mx + np.log(s) - log_l
    c = np.clip(r, -delta, delta)
    gw = w * (c / s)
    grad = np.empty(2 * m + 1)
    grad[0] = (c / s) @ w0
    grad[1 : m + 1] = gw.sum(axis=1)
    grad[m + 1 :] = -(gw * feats_t).sum(axis=1)
    return float(c @ (r - 0.5 * c)), grad


# The default stop (relative reduction 1e7 * eps) ends a warm-started refit within a few steps on
# this flat objective (values ~1e-3), which shrinks bootstrap intervals to nothing (measured: A moved
# 0.01% where the converged refit moves it 50%); the grid keeps the defaults, its best is polished.
TIGHT = {"ftol": 1e-14, "gtol": 1e-10, "maxiter": 2000}


def _lse_fit(feats: np.ndarray, log_l: np.ndarray, starts: np.ndarray, delta: float,
             options: dict | None = None) -> tuple[np.ndarray, float]:  # fmt: skip
    """L-BFGS-B from every start (feats (n, m)), keep the lowest objective (ties: the first start)."""
    feats_t = np.ascontiguousarray(feats.T)
    best, best_f = np.full(starts.shape[1], np.nan), np.inf
    for x0 in starts:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = minimize(_lse_objective, x0, args=(feats_t, log_l, delta), jac=True, method="L-BFGS-B",
                           options=options)  # fmt: skip
        if np.isfinite(res.fun) and res.fun < best_f and np.all(np.isfinite(res.x)):
            best, best_f = res.x, float(res.fun)
    return best, best_f


def _grid_fit(
    feats: np.ndarray, log_l: np.ndarray, starts: np.ndarray, delta: float
) -> tuple[np.ndarray, float]:
    best, f = _lse_fit(feats, log_l, starts, delta)
    if not np.isfinite(f):
        raise FitError("no start of the grid gave a finite objective")
    polished, pf = _lse_fit(feats, log_l, best[None], delta, TIGHT)
    return (polished, pf) if pf <= f else (best, f)


def _grid(grid: dict[str, np.ndarray], order: list[str]) -> np.ndarray:
    return np.array(list(itertools.product(*(grid[k] for k in order))), dtype=float)


def _resamples(
    n: int, n_boot: int, rng: np.random.Generator, strata: np.ndarray | None = None
) -> list[np.ndarray]:
    """`n_boot` resamples of row indices with replacement (within each stratum if given), drawn up front
    so results do not depend on refit order."""
    if strata is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    return [np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]) for _ in range(n_boot)]


def _refits(draws: list, refit: Callable[..., np.ndarray], width: int) -> np.ndarray:
    """One refit per draw; NaN rows where a draw cannot be fitted."""
    out = np.full((len(draws), width), np.nan)
    for i, x in enumerate(draws):
        try:
            out[i] = refit(x)
        except FitError:
            pass
    return out


def _bootstrap(n: int, n_boot: int, rng: np.random.Generator, refit: Callable[[np.ndarray], np.ndarray], width: int,
               strata: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Refits on resampled row indices (`_resamples`)."""
    return _refits(_resamples(n, n_boot, rng, strata), refit, width)


def _exp(*logs: float) -> np.ndarray:
    """exp of fitted log-parameters; a resample whose coefficient overflows (a runaway exponent on
    too few points) is an unusable fit, not a crash."""
    with np.errstate(over="ignore"):
        out = np.exp(np.asarray(logs, dtype=float))
    if not np.isfinite(out).all():
        raise FitError(f"fit diverged: coefficient exp({max(logs):.3g}) overflows")
    return out


def _need(kind: str, n: int, what: str) -> None:
    if n < MIN_POINTS[kind]:
        raise FitError(f"{kind} fit needs at least {MIN_POINTS[kind]} {what}, got {n}")


# --- compute frontier ----------------------------------------------------------------------------


FULL_FORM, POWER_FORM = "E + A C^-alpha", "A C^-alpha"


def _huber_line(x: np.ndarray, y: np.ndarray, x0: np.ndarray, delta: float) -> np.ndarray:
    """(a, s) minimising sum Huber(a - s x - y): the log-space form of L = A C^-alpha with E = 0."""

    def obj(th: np.ndarray) -> tuple[float, np.ndarray]:
        r = th[0] - th[1] * x - y
        c = np.clip(r, -delta, delta)
        return float(c @ (r - 0.5 * c)), np.array([c.sum(), -(c @ x)])

    return minimize(obj, x0, jac=True, method="L-BFGS-B", options=TIGHT).x


def fit_frontier(runs: pd.DataFrame, rng: np.random.Generator, n_boot: int = 200, x: str = "flops_train",
                 y: str = LOSS_COL, delta: float = HUBER_DELTA, checks: Checks = CHECKS,
                 form: str = "auto") -> Fit:  # fmt: skip
    """L(C) = E + A C^-alpha on the Pareto frontier of (C, L); resamples redraw runs and redo the frontier.

    form "full" fits E; "power" fixes E = 0 (Kaplan et al. 2020's L(C) = (C_c / C)^alpha_C); "auto" fits
    E and, when only E is what the data fail to identify (at its bound, or an interval spanning orders
    of magnitude, as over a span where the frontier is nearly straight in log C), falls back to the
    power law if that one is identified. `extra["form"]` names the law, `extra["note"]` why E was dropped.
    """
    if form not in ("auto", "full", "power"):
        raise ValueError(f"frontier form is 'auto', 'full' or 'power', got {form!r}")
    c_all, l_all = runs[x].to_numpy(float), runs[y].to_numpy(float)
    log_ref = float(np.mean(np.log(c_all))) if len(c_all) else 0.0
    starts = _grid(FRONTIER_GRID, ["e", "a", "alpha"])

    def frontier(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = pareto_frontier(pd.DataFrame({"c": c_all[idx], "l": l_all[idx]}), "c", "l")
        _need("frontier", len(f), "runs on the compute frontier")
        return np.log(f["c"].to_numpy()) - log_ref, np.log(f["l"].to_numpy())

    def fit_full(idx: np.ndarray, x0: np.ndarray | None = None) -> np.ndarray:
        xc, log_l = frontier(idx)
        th = (
            _grid_fit(xc[:, None], log_l, starts, delta)[0]
            if x0 is None
            else _lse_fit(xc[:, None], log_l, x0[None], delta, TIGHT)[0]
        )
        e, a, al = th
        return np.array([*_exp(e, a + al * log_ref), al])

    def fit_power(idx: np.ndarray, x0: np.ndarray | None = None) -> np.ndarray:
        xc, log_l = frontier(idx)
        a, al = _huber_line(xc, log_l, np.polyfit(-xc, log_l, 1)[::-1] if x0 is None else x0, delta)
        return np.array([0.0, *_exp(a + al * log_ref), al])

    n_front = len(pareto_frontier(runs, x, y))

    def make(kind: str) -> Fit:
        fitter = fit_full if kind == FULL_FORM else fit_power
        theta = fitter(np.arange(len(c_all)))
        if kind == FULL_FORM:
            x0 = np.array([math.log(theta[0]), math.log(theta[1]) - theta[2] * log_ref, theta[2]])
        else:
            x0 = np.array([math.log(theta[1]) - theta[2] * log_ref, theta[2]])
        samples = _bootstrap(len(c_all), n_boot, rng, lambda i: fitter(i, x0), 3)
        f = Fit("frontier", ("E", "A", "alpha"), theta, samples, n_front, frontier_loss, extra={"form": kind})
        return replace(f, reasons=frontier_reasons(f, c_all, l_all, checks, fixed_e=kind == POWER_FORM))

    if form == "power":
        return make(POWER_FORM)
    full = make(FULL_FORM)
    only_e = full.reasons and all(r.startswith(("E = ", "E: ")) for r in full.reasons)
    if form == "full" or not only_e:
        return full
    power = make(POWER_FORM)
    if power.reasons:
        return full
    note = "E not identified (" + "; ".join(full.reasons) + "), so E = 0"
    return replace(power, extra={**power.extra, "note": note})


# --- approach 3: parametric L(N, D) --------------------------------------------------------------


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray, rng: np.random.Generator, n_boot: int = 200,
                   grid: dict[str, np.ndarray] | None = None, delta: float = HUBER_DELTA,
                   checks: Checks = CHECKS) -> Fit:  # fmt: skip
    """Approach 3 (module docstring). Returns theta = (E, A, B, alpha, beta)."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    _need("parametric", len(n), "runs")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise FitError("parametric fit needs runs at two or more model sizes and two or more token counts")
    feats = np.log(np.stack([n, d], axis=1))
    log_l = np.log(loss)
    # internal order (e, a, b, alpha, beta) matches _lse_objective's (e, c1, c2, s1, s2)
    starts = _grid(grid or CHINCHILLA_GRID, ["e", "a", "b", "alpha", "beta"])
    best, obj = _grid_fit(feats, log_l, starts, delta)

    def public(th: np.ndarray) -> np.ndarray:
        e, a, b, al, be = th
        return np.array([*_exp(e, a, b), al, be])

    def refit(idx: np.ndarray) -> np.ndarray:
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            raise FitError("degenerate resample")
        with np.errstate(over="ignore"):
            return public(_lse_fit(feats[idx], log_l[idx], best[None], delta, TIGHT)[0])

    samples = _bootstrap(len(n), n_boot, rng, refit, 5)
    f = Fit("parametric", ("E", "A", "B", "alpha", "beta"), public(best), samples, len(n), parametric_loss,
            extra={"objective": obj, "n_starts": len(starts)})  # fmt: skip
    return replace(f, reasons=parametric_reasons(f, n, d, loss, checks))


def parametric_allocation(fit: Fit, flops_per_nd: float = 6.0) -> Allocation:
    """N_opt(C), D_opt(C) implied by an approach-3 fit under C = k N D (Hoffmann et al. eq. 4):
    N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b, a = beta/(alpha+beta), b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta))."""

    def derive(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, a_, b_, al, be = th.T
        with np.errstate(all="ignore"):
            g = (al * a_ / (be * b_)) ** (1 / (al + be))
            ea, eb = be / (al + be), al / (al + be)
            return np.stack([g * flops_per_nd**-ea, ea], 1), np.stack([flops_per_nd**-eb / g, eb], 1)

    (tn,), (td,) = (v for v in derive(fit.theta[None]))
    sn, sd = derive(fit.samples)
    mk = lambda th, s: Fit(
        "parametric", ("k", "exponent"), th, s, fit.n_points, power_law, reasons=fit.reasons
    )
    return Allocation("parametric", mk(tn, sn), mk(td, sd), pd.DataFrame())


# --- approaches 1 and 2: optima, then power laws -------------------------------------------------


def _power_fit(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Least squares of log v = log k + p log C; returns (k, p)."""
    ok = np.isfinite(c) & np.isfinite(v) & (v > 0)
    if ok.sum() < 2 or len(np.unique(c[ok])) < 2:
        raise FitError("a power law needs optima at two or more compute values")
    p, logk = np.polyfit(np.log(c[ok]), np.log(v[ok]), 1)
    return np.array([*_exp(logk), p])


def _allocation(kind: str, optima_fn: Callable[..., pd.DataFrame], full: object, draws: list, checks: Checks,
                span: np.ndarray | None = None) -> Allocation:  # fmt: skip
    """Power laws N_opt, D_opt = k C^exponent through `optima_fn(full)`, refitted on `optima_fn(draw)`
    for every bootstrap draw; `span`: the compute the optima stand for (default: theirs)."""

    def fit(x: object) -> tuple[pd.DataFrame, np.ndarray]:
        o = optima_fn(x)
        c = o["flops"].to_numpy(float)
        return o, np.concatenate(
            [_power_fit(c, o["N_opt"].to_numpy(float)), _power_fit(c, o["D_opt"].to_numpy(float))]
        )

    optima, theta = fit(full)
    samples = _refits(draws, lambda x: fit(x)[1], 4)
    c = optima["flops"].to_numpy(float)
    distinct = int(optima["N_opt"].nunique())  # the envelope's optima are a staircase of few sizes

    def mk(sl: slice, what: str) -> Fit:
        f = Fit(kind, ("k", "exponent"), theta[sl], samples[:, sl], len(optima), power_law)
        return replace(f, reasons=power_law_reasons(f, c, what, checks, distinct, span))

    return Allocation(kind, mk(slice(0, 2), "N_opt"), mk(slice(2, 4), "D_opt"), optima)


def fit_envelope(curves: pd.DataFrame, runs: pd.DataFrame, rng: np.random.Generator, n_boot: int = 200,
                 n_grid: int = 50, loss_col: str = "val_loss", n_col: str = N_COL,
                 checks: Checks = CHECKS) -> Allocation:  # fmt: skip
    """Approach 1: on `n_grid` log-spaced compute values the run with the lowest (log-C-interpolated)
    loss gives N_opt(C) (its size) and D_opt(C) (its tokens at C). Resamples redraw whole runs."""
    keys = runs[["sweep", "run", n_col]].rename(columns={n_col: "N"})
    cv = curves.merge(keys, on=["sweep", "run"])
    cv = cv[np.isfinite(cv[loss_col]) & (cv["flops_train"] > 0) & np.isfinite(cv["N"])]
    per_run = [
        (g["flops_train"].to_numpy(float), g[loss_col].to_numpy(float), g["tokens"].to_numpy(float), float(g["N"].iloc[0]))
        for _, g in cv.sort_values("flops_train", kind="stable").groupby(["sweep", "run"], sort=True)
        if len(g) >= 2
    ]  # fmt: skip
    _need("envelope", len(per_run), "runs with two or more evaluated points")
    lo = min(math.log(r[0][0]) for r in per_run)
    hi = max(math.log(r[0][-1]) for r in per_run)
    grid = np.exp(np.linspace(lo, hi, n_grid))

    def optima(idx: np.ndarray) -> pd.DataFrame:
        rows = []
        for c in grid:
            best = None
            for j in np.unique(idx):
                fc, fl, ft, nn = per_run[j]
                if fc[0] <= c <= fc[-1]:
                    lv = np.interp(math.log(c), np.log(fc), fl)
                    if best is None or lv < best[0]:
                        best = (lv, nn, np.interp(math.log(c), np.log(fc), ft))
            if best is not None:
                rows.append(dict(flops=c, L_opt=best[0], N_opt=best[1], D_opt=best[2]))
        o = pd.DataFrame(rows, columns=["flops", "L_opt", "N_opt", "D_opt"])
        if o["N_opt"].nunique() < 2:
            raise FitError("envelope fit needs two or more runs on the lower envelope of the training curves")
        return o

    final_c = np.array([r[0][-1] for r in per_run])  # what the runs were trained for, not their early evals
    draws = _resamples(len(per_run), n_boot, rng)
    alloc = _allocation("envelope", optima, np.arange(len(per_run)), draws, checks, span=final_c)
    sizes = np.array([r[3] for r in per_run])
    at_edge = float(np.isin(alloc.optima["N_opt"], [sizes.min(), sizes.max()]).mean())
    if at_edge > checks.max_edge_share:
        why = f"the envelope's optimum is the smallest or largest model trained at {at_edge:.0%} of compute values"
        return alloc.with_reasons((why,))
    return alloc


def isoflop_parabolas(runs: pd.DataFrame, budget_col: str = "flops_budget", n_col: str = N_COL,
                      loss_col: str = LOSS_COL) -> pd.DataFrame:  # fmt: skip
    """One row per budget: parabola coefficients of L in log N and in log D (highest power first), the
    vertices, the sampled range and whether the budget gives an optimum. `ok` is True only when the
    grid brackets the optimum: both parabolas convex, both vertices strictly inside the sampled sizes
    and token counts, and the best run not at either end of the grid; `why` says otherwise, and `side`
    ("below", "above" or "") on which side of the sizes the optimum lies when the grid misses it: past
    the vertex's edge, else past the edge whose run is the best."""
    rows = []
    for budget, g in runs[np.isfinite(runs[budget_col])].groupby(budget_col, sort=True):
        row = dict(
            flops=float(budget), n_runs=len(g), N_min=float(g[n_col].min()), N_max=float(g[n_col].max())
        )
        why, side = [], ""
        best = float(g[n_col].iloc[int(np.argmin(g[loss_col].to_numpy(float)))])
        for col, name in ((n_col, "N"), ("tokens", "D")):
            x, y = np.log(g[col].to_numpy(float)), g[loss_col].to_numpy(float)
            row.update({f"{name}_opt": math.nan, f"{name}_coef": None})
            if len(np.unique(x)) < MIN_POINTS["isoflop"]:
                why.append(f"{len(np.unique(x))} sizes (a parabola needs {MIN_POINTS['isoflop']})")
                break
            p = np.polyfit(x, y, 2)
            row[f"{name}_coef"] = p
            if not p[0] > 0:
                why.append(f"the parabola in log {name} is not convex (curvature {p[0]:.3g})")
                continue
            with np.errstate(over="ignore", divide="ignore"):
                v = float(np.exp(-p[1] / (2 * p[0])))
            row[f"{name}_opt"] = v
            lo, hi = float(np.exp(x.min())), float(np.exp(x.max()))
            if not lo < v < hi:
                where = "below the smallest" if v <= lo else "above the largest"
                what = "model size" if name == "N" else "token count"
                why.append(f"optimum {name} = {v:.3g} {where} {what} sampled ({lo if v <= lo else hi:.3g})")
                if name == "N":
                    side = "below" if v <= lo else "above"
            elif name == "N" and best in (row["N_min"], row["N_max"]):
                # a bracket needs a worse size on each side of the best one; a vertex just inside the
                # edge with the edge's run the best is still an extrapolation
                edge = "smallest" if best == row["N_min"] else "largest"
                why.append(f"the lowest loss is at the {edge} model size sampled ({best:.3g})")
        if why and not side and best in (row["N_min"], row["N_max"]):
            side = "below" if best == row["N_min"] else "above"
        row["ok"] = not why
        row["side"] = side
        row["why"] = "; ".join(dict.fromkeys(why))
        row["L_opt"] = (float(np.polyval(row["N_coef"], math.log(row["N_opt"])))
                        if np.isfinite(row["N_opt"]) else math.nan)  # fmt: skip
        rows.append(row)
    cols = [
        "flops",
        "n_runs",
        "ok",
        "why",
        "side",
        "N_opt",
        "D_opt",
        "L_opt",
        "N_min",
        "N_max",
        "N_coef",
        "D_coef",
    ]
    return pd.DataFrame(rows).reindex(columns=cols)


def fit_isoflop(runs: pd.DataFrame, rng: np.random.Generator, n_boot: int = 200, budget_col: str = "flops_budget",
                n_col: str = N_COL, loss_col: str = LOSS_COL, checks: Checks = CHECKS) -> Allocation:  # fmt: skip
    """Approach 2: parabola vertices per budget, then power laws over budgets.

    The bootstrap keeps each grid's sizes (a fixed design: redrawing runs would leave a grid of three
    sizes with fewer than three in most resamples) and redraws the noise: each run's loss is its
    budget's fitted parabola plus a residual drawn from all budgets' residuals, each scaled by
    sqrt(n / (n - 3)) for the three parameters its parabola used. Grids of three sizes leave no residual
    to learn the noise from; when no grid has more, there is no interval, and the fit says so."""
    r = runs[np.isfinite(runs[budget_col].astype(float))].reset_index(drop=True)
    if r.empty:
        raise FitError("IsoFLOP fit needs runs with a flops_budget; none have one")

    def optima(loss: np.ndarray) -> pd.DataFrame:
        o = isoflop_parabolas(r.assign(**{loss_col: loss}), budget_col, n_col, loss_col)
        o = o[o["ok"]]
        if len(o) < 2:
            raise FitError(
                "IsoFLOP fit needs two or more budgets whose parabola is convex with its optimum inside the "
                "sampled sizes"
            )
        return o.reset_index(drop=True)

    loss = r[loss_col].to_numpy(float)
    coefs = isoflop_parabolas(r, budget_col, n_col, loss_col).set_index("flops")["N_coef"]
    fitted, pool = loss.copy(), []
    for budget, g in r.groupby(budget_col, sort=True):
        if not isinstance(coefs[budget], np.ndarray):  # too few sizes for a parabola
            continue
        fitted[g.index] = np.polyval(coefs[budget], np.log(g[n_col].to_numpy(float)))
        if len(g) > 3:
            pool.append((loss[g.index] - fitted[g.index]) * math.sqrt(len(g) / (len(g) - 3)))
    pool = np.concatenate(pool) if pool else np.zeros(0)
    draws = [fitted + rng.choice(pool, len(r)) for _ in range(n_boot)] if len(pool) else []
    alloc = _allocation("isoflop", optima, loss, draws, checks)
    if not len(pool):
        return alloc.with_reasons(("no bootstrap: every grid has three sizes or fewer, which a parabola fits "
                                   "exactly, so the noise cannot be estimated",))  # fmt: skip
    return alloc


# --- comparisons at fixed compute ----------------------------------------------------------------


def compute_multiplier(
    fit: Fit, baseline: Fit, flops: float, level: float = 0.95
) -> tuple[float, float, float]:
    """How many times `flops` the baseline needs to reach the loss `fit` predicts at `flops`
    (> 1: `fit` is more compute-efficient). Bootstrap draws of the two independent fits are paired by index."""
    est = float(frontier_inverse(baseline.theta[None], fit.predict(flops))[0] / flops)
    a, b = fit._ok(), baseline._ok()
    k = min(len(a), len(b))
    if k == 0:
        return est, math.nan, math.nan
    loss = frontier_loss(a[:k], np.array(flops))
    mult = np.array([frontier_inverse(b[i : i + 1], loss[i])[0] for i in range(k)]) / flops
    q = 50 * (1 - level)
    # inf draws (a loss below the baseline's E) are legitimate; percentile would blend two of them into NaN
    lo, hi = np.percentile(np.where(np.isinf(mult), np.finfo(float).max, mult), [q, 100 - q])
    return est, *(math.inf if v >= np.finfo(float).max else float(v) for v in (lo, hi))


def loss_difference(fit_a: Fit, fit_b: Fit, flops: float, level: float = 0.95) -> tuple[float, float, float]:
    """Predicted loss of a minus b at `flops`, with a bootstrap interval; excluding 0 = distinguishable."""
    est = float(fit_a.predict(flops) - fit_b.predict(flops))
    a, b = fit_a._ok(), fit_b._ok()
    k = min(len(a), len(b))
    if k == 0:
        return est, math.nan, math.nan
    diff = frontier_loss(a[:k], np.array(flops)) - frontier_loss(b[:k], np.array(flops))
    q = 50 * (1 - level)
    lo, hi = np.percentile(diff, [q, 100 - q])
    return est, float(lo), float(hi)
