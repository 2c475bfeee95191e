"""`harness-plan`: IsoFLOP sweep planner.

For each compute budget C (training FLOPs) it picks `sizes` model sizes, log-spaced over a factor
`size_spread` around a compute-optimal guess N*, and at each size FLOP-matched shapes of every
variant (`harness.sizing.match`). For every run it sets the tokens D = C / F (F: the shape's exact
training FLOPs per token, `harness.flops`), rounded to whole steps, and the batch size and learning
rate of its size. The result is a sweep file `sweeps/<name>.yaml` that `harness-train -m
sweep=<name>` runs, one job per run, and a printed table.

Rules:
- N* solves D = tokens_per_param x N with D = C / F_ref(N), F_ref the reference variant's exact
  training FLOPs per token at N non-embedding parameters (tokens_per_param = 20: Hoffmann et al.
  2022). At these tiny scales F is well above 6N (head and attention), so 6N would misplace N*.
- Batch size and learning rate depend on the nominal size N of a group (the same for all its
  variants, so FLOP-matched runs share them): `constant` keeps `batch_size` and `lr`; `porian`
  scales them as in Porian et al. 2024, batch proportional to N^(2/3) and lr to N^(-1/3), equal to
  `batch_size` and `lr` at `ref_params`.
- Tokens are a whole number of steps (`train.tokens` = steps x batch_size x seq_len), so a trained
  run's `flops_train` in summary.json equals the plan's. The plan refuses a run whose total misses
  its budget by more than `budget_tolerance` (2%) after that rounding.
Everything is checked (each run composed through Hydra as `harness-train` will) before the file is
written, so a bad request fails before any job is launched.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from harness import flops, sizing
from harness.config import OptimConfig, check_sweep_name
from harness.models import FAMILIES

log = logging.getLogger(__name__)

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"


@dataclass(frozen=True)
class PlanRules:
    seq_len: int = 128
    vocab_size: int = 256  # the byte tokenizer
    sizes: int = 3  # model sizes per budget
    size_spread: float = 4.0  # largest / smallest nominal N within a budget
    tokens_per_param: float = 20.0  # the compute-optimal guess D / N
    batch_rule: str = "constant"  # "constant" | "porian"
    lr_rule: str = "constant"  # "constant" | "porian"
    batch_size: int = 16  # sequences per step (at ref_params under "porian")
    lr: float = 3e-3  # (at ref_params under "porian")
    ref_params: float = 1e6
    budget_tolerance: float = 0.02
    evals_per_run: int = 4  # evaluations spread over a run (the last step is always one)
    reference: str = ""  # the variant whose non-embedding parameters name a size; "": the first
    sizing: sizing.SizingRules = field(default_factory=sizing.SizingRules)
    # A measured centre N* = centre_params (C / centre_flops)^centre_exponent replaces the
    # tokens_per_param guess when centre_params > 0 (from a pilot or an earlier sweep's optima).
    centre_params: float = 0.0
    centre_flops: float = 1.0
    centre_exponent: float = 0.5

    def __post_init__(self) -> None:
        for r in (self.batch_rule, self.lr_rule):
            if r not in ("constant", "porian"):
                raise ValueError(f"plan: batch and lr rules are 'constant' or 'porian', got {r!r}")
        if self.sizes < 1 or self.size_spread < 1:
            raise ValueError("plan: sizes must be >= 1 and size_spread >= 1")
        if min(self.seq_len, self.vocab_size, self.batch_size, self.evals_per_run) < 1:
            raise ValueError("plan: seq_len, vocab_size, batch_size and evals_per_run must be >= 1")
        if self.tokens_per_param <= 0 or self.lr <= 0 or self.ref_params <= 0:
            raise ValueError("plan: tokens_per_param, lr and ref_params must be > 0")
        if self.centre_params < 0 or self.centre_flops <= 0:
            raise ValueError("plan: centre_params must be >= 0 and centre_flops > 0")


@dataclass(frozen=True)
class Run:
    budget: float
    size_index: int
    nominal_params: int
    variant: str
    shape: sizing.Shape
    batch_size: int
    lr: float
    steps: int
    tokens: int
    eval_every: int
    est_seconds: float | None = None

    @property
    def family(self) -> str:
        return self.shape.cfg.family

    @property
    def flops_per_token(self) -> int:
        return self.shape.flops_per_token

    @property
    def flops_train(self) -> int:
        return self.flops_per_token * self.tokens

    @property
    def params(self) -> int:
        return self.shape.params_nonembed

    def overrides(self) -> list[str]:
        return [
            *self.shape.overrides(),
            f"train.tokens={self.tokens}",
            f"train.batch_size={self.batch_size}",
            f"train.eval_every={self.eval_every}",
            f"optim.lr={self.lr:.4g}",
            f"train.flops_budget={fmt_budget(self.budget)}",
        ]


def fmt_budget(c: float) -> str:
    """1e13 -> '1e13', 3e13 -> '3e13', 2.5e12 -> '2.5e12': short, and a valid Hydra float."""
    e = math.floor(math.log10(c))
    m = round(c / 10**e, 6)
    if m >= 10:
        m, e = m / 10, e + 1
    return f"{m:g}e{e}"


def _batch_lr(n: float, rules: PlanRules) -> tuple[int, float]:
    ratio = n / rules.ref_params
    b = rules.batch_size * ratio ** (2 / 3) if rules.batch_rule == "porian" else rules.batch_size
    lr = rules.lr * ratio ** (-1 / 3) if rules.lr_rule == "porian" else rules.lr
    return max(1, round(b)), float(f"{lr:.4g}")


def compute_optimal_params(budget: float, reference: str, rules: PlanRules) -> float:
    """The centre of a budget's sizes: the measured law when the rules carry one, else N* with
    C / F_ref(N*) = tokens_per_param x N*, by bisection in log N."""
    if rules.centre_params > 0:
        return rules.centre_params * (budget / rules.centre_flops) ** rules.centre_exponent
    lo, hi = 1e2, 1e12

    def excess(n: float) -> float:
        s = sizing.size(
            reference,
            params=n,
            seq_len=rules.seq_len,
            vocab_size=rules.vocab_size,
            rules=rules.sizing,
            strict=False,
        )
        return math.log(budget / s.flops_per_token) - math.log(rules.tokens_per_param * s.params_nonembed)

    small = _smallest(reference, rules)
    lo = max(lo, small.params_nonembed)
    if excess(lo) <= 0:
        return lo
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        try:
            e = excess(mid)
        except ValueError:
            hi = mid  # past the largest shape the rules allow
            continue
        lo, hi = (mid, hi) if e > 0 else (lo, mid)
        if hi / lo < 1.01:
            break
    return math.sqrt(lo * hi)


def _smallest(variant: str, rules: PlanRules) -> sizing.Shape:
    return sizing.smallest(variant, seq_len=rules.seq_len, vocab_size=rules.vocab_size, rules=rules.sizing)


def plan(budgets: list[float], variants: list[str], rules: PlanRules | None = None) -> list[Run]:
    """Every run of an IsoFLOP sweep; raises ValueError, naming the problem, on a bad request."""
    rules = rules or PlanRules()
    if not budgets:
        raise ValueError("plan: give at least one compute budget")
    if not variants:
        raise ValueError("plan: give at least one model family or preset")
    for v in variants:
        sizing.resolve_variant(v)  # unknown names fail here, listing the known ones
    variants = list(dict.fromkeys(variants))
    reference = rules.reference or variants[0]
    sizing.resolve_variant(reference)
    tokens_per_step = rules.batch_size * rules.seq_len
    runs: list[Run] = []
    for c in sorted(budgets):
        if not c > 0 or not math.isfinite(c):
            raise ValueError(f"plan: budgets must be positive numbers, got {c}")
        for v in variants:
            s = _smallest(v, rules)
            need = s.flops_per_token * _batch_lr(s.params_nonembed, rules)[0] * rules.seq_len
            if c < need:
                raise ValueError(
                    f"budget {c:.3g} FLOPs is below the smallest buildable {v} model "
                    f"(d_model={s.cfg.d_model}, n_layers=1: {s.flops_per_token:,} training FLOPs per "
                    f"token, one batch of {tokens_per_step} tokens costs {need:.3g})"
                )
        n_opt = compute_optimal_params(c, reference, rules)
        k = rules.sizes
        seen: set[int] = set()
        n_small = _smallest(reference, rules).params_nonembed
        for i in range(k):
            n = n_opt * rules.size_spread ** ((i / (k - 1) - 0.5) if k > 1 else 0.0)
            if rules.centre_params > 0:
                n = max(n, n_small)  # a measured centre near the smallest model: start the grid there
            try:
                group = sizing.match(
                    variants,
                    params=n,
                    reference=reference,
                    seq_len=rules.seq_len,
                    vocab_size=rules.vocab_size,
                    rules=rules.sizing,
                )
            except ValueError as e:
                raise ValueError(f"budget {c:.3g}, size {i + 1}/{k} (N ~ {n:.3g}): {e}") from e
            # Sizes this close snap to one shape, or to two within 20%: train one of them.
            got = group.shapes[reference].params_nonembed
            if any(abs(math.log(got / m)) < math.log(1.2) for m in seen):
                continue
            seen.add(got)
            for v in variants:
                runs.append(_run(c, i, group.nominal_params, v, group.shapes[v], rules))
    return runs


def _run(c: float, i: int, nominal: int, v: str, sh: sizing.Shape, rules: PlanRules) -> Run:
    """The run of shape `sh` at budget `c`: whole steps of its size's batch, within the budget tolerance."""
    b, lr = _batch_lr(nominal, rules)
    per_step = b * rules.seq_len
    steps = round(c / (sh.flops_per_token * per_step))
    where = f"budget {c:.3g}, {v} at d_model={sh.cfg.d_model}, n_layers={sh.cfg.n_layers}"
    if steps < 1:
        raise ValueError(
            f"{where}: {c / sh.flops_per_token:.0f} tokens is fewer than one batch "
            f"({b} x {rules.seq_len} = {per_step}); raise the budget or lower the batch size"
        )
    total = steps * per_step * sh.flops_per_token
    if abs(total / c - 1) > rules.budget_tolerance:
        raise ValueError(
            f"{where}: {steps} whole steps of {per_step} tokens give {total:.4g} FLOPs, "
            f"{total / c - 1:+.1%} off the budget (tolerance {rules.budget_tolerance:.0%}); "
            "raise the budget or lower the batch size"
        )
    return Run(budget=c, size_index=i, nominal_params=nominal, variant=v, shape=sh, batch_size=b, lr=lr,
               steps=steps, tokens=steps * per_step, eval_every=max(1, steps // rules.evals_per_run))  # fmt: skip


# ---------------------------------------------------------------- extending a finished sweep


def sweep_results(results: Path, sweep_file: Path) -> pd.DataFrame:
    """One row per run of a sweep file: its directory name, variant and budget, and, where `usable`,
    its result (N, tokens, final loss; runs are matched by the directory name their overrides give)."""
    from harness.config import run_name_from_overrides
    from harness.fit import split_usable
    from harness.results import collect
    from hydra_plugins.harness_sweeper import load_sweep_file

    rows = []
    for ov in load_sweep_file(sweep_file, sweep_file.stem):  # each run's overrides, `common` merged in
        kv = dict(o.lstrip("+").split("=", 1) for o in ov if "=" in o)
        if "model" in kv and "train.flops_budget" in kv:
            rows.append(dict(run=kv.get("run_name") or run_name_from_overrides(ov), variant=kv["model"],
                             budget=float(kv["train.flops_budget"])))  # fmt: skip
    planned = pd.DataFrame(rows, columns=["run", "variant", "budget"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt runs are simply not usable here
        kept, _ = split_usable(collect(results))
    return planned.merge(kept, on="run", how="left", indicator=True).assign(
        usable=lambda t: t.pop("_merge") == "both"
    )


def extend(results: Path, sweep_file: Path, rules: PlanRules, max_new: int = 2) -> list[Run]:
    """Runs that would bracket the optimum of every (variant, budget) grid of a finished sweep that
    missed it: up to `max_new` more sizes past the edge the optimum lies beyond (continuing the grid's
    own log spacing), or on both sides when the parabola is not convex."""
    from harness.config import run_name_from_overrides
    from harness.fit import N_COL, isoflop_parabolas
    from hydra_plugins.harness_sweeper import merge_overrides

    table = sweep_results(results, sweep_file)
    common = [str(o) for o in (yaml.safe_load(sweep_file.read_text()) or {}).get("common") or []]
    planned = set(table["run"])  # every run of the file, trained or not: never planned twice

    def name(r: Run) -> str:
        return run_name_from_overrides(merge_overrides(common, r.overrides()))

    table = table[table["usable"]]
    new: list[Run] = []
    for (v, c), g in table.groupby(["variant", "budget"], sort=True):
        par = isoflop_parabolas(g.assign(flops_budget=c)).iloc[0]
        if par["ok"]:
            continue
        sizes = np.sort(g[N_COL].unique().astype(float))
        step = float(np.exp(np.mean(np.diff(np.log(sizes))))) if len(sizes) > 1 else rules.size_spread
        step = max(step, 1.5)
        targets = []  # past the edge the optimum lies beyond; both edges when that is unknown
        if par["side"] != "above":
            targets += [sizes[0] / step**k for k in range(1, max_new + 1)]
        if par["side"] != "below":
            targets += [sizes[-1] * step**k for k in range(1, max_new + 1)]
        smallest = _smallest(v, rules).params_nonembed
        have = {int(n) for n in sizes}
        for n in targets:
            if n < smallest:
                continue
            sh = sizing.size(v, params=n, seq_len=rules.seq_len, vocab_size=rules.vocab_size, rules=rules.sizing,
                             strict=False)  # fmt: skip
            if sh.params_nonembed in have:
                continue
            have.add(sh.params_nonembed)
            run = _run(c, len(have), sh.params_nonembed, v, sh, rules)
            if name(run) not in planned:
                planned.add(name(run))
                new.append(run)
        if not any(r.variant == v and r.budget == c for r in new):
            log.warning("%s at %.3g: cannot add sizes past the edge (%s)", v, c, par["why"])
    return new


def centres_from(results: Path, sweep_file: Path, rules: PlanRules) -> dict[str, PlanRules]:
    """Per variant, the rules with their centre set to the law N_opt(C) = k C^a through the optima its
    grids in a finished sweep bracketed (a least-squares line in log-log over two or more budgets; from
    one budget, `rules.centre_exponent` through it). Variants with no bracketed optimum are left out."""
    from harness.fit import isoflop_parabolas

    table = sweep_results(results, sweep_file)
    table = table[table["usable"]]
    out = {}
    for v, g in table.groupby("variant", sort=True):
        par = isoflop_parabolas(g.assign(flops_budget=g["budget"]))
        par = par[par["ok"]]
        if par.empty:
            log.warning(
                "%s: no grid of %s bracketed its optimum; its centre stays the default guess", v, results
            )
            continue
        c, n = par["flops"].to_numpy(float), par["N_opt"].to_numpy(float)
        exponent = (
            float(np.polyfit(np.log(c), np.log(n), 1)[0]) if len(np.unique(c)) > 1 else rules.centre_exponent
        )
        c0 = float(np.exp(np.mean(np.log(c))))
        n0 = float(np.exp(np.mean(np.log(n))))  # the fitted line passes through the mean point
        out[v] = replace(rules, centre_params=n0, centre_flops=c0, centre_exponent=exponent)
        log.info("%s: N_opt = %.3g (C / %.3g)^%.2f from %d bracketed optima in %s", v, n0, c0, exponent, len(c),
                 results)  # fmt: skip
    return out


def rules_from_sweep(sweep_file: Path) -> PlanRules | None:
    """The planning rules a sweep file was written with (its `plan:` section), if it has them."""
    d = (yaml.safe_load(sweep_file.read_text()) or {}).get("plan")
    if not isinstance(d, dict):
        return None
    sz = dict(d.pop("sizing", {}) or {})
    if "fine_knobs" in sz:
        sz["fine_knobs"] = tuple(sz["fine_knobs"])
    return PlanRules(**d, sizing=sizing.SizingRules(**sz))


def verify(runs: list[Run], common: list[str] | None = None) -> None:
    """Composes every run through Hydra, as `harness-train` will, and checks it is the run planned."""
    from harness.config import compose

    for r in runs:
        run_cfg = compose([*(common or []), *r.overrides()])
        got = flops.count(run_cfg.model).train * run_cfg.steps * r.batch_size * run_cfg.model.seq_len
        if run_cfg.model != r.shape.cfg or got != r.flops_train:
            raise ValueError(f"run {r.overrides()} composes to a different model or budget than planned")


# ---------------------------------------------------------------- timing


def measure_rates(runs: list[Run], steps: int = 2, max_batch: int = 8) -> dict[str, float]:
    """Training FLOP/s on this device, per variant, from its median planned shape.

    One warm-up and `steps` timed forward+backward+AdamW steps on `max_batch` sequences, so the
    whole measurement takes seconds; on CUDA under bf16 autocast as training runs. A batch this
    small underuses a GPU (and a little, a CPU), so estimates err long.
    """
    import torch

    from harness.models import build_model
    from harness.train import make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates: dict[str, float] = {}
    for v in dict.fromkeys(r.variant for r in runs):
        mine = sorted((r for r in runs if r.variant == v), key=lambda r: r.flops_per_token)
        r = mine[len(mine) // 2]
        torch.manual_seed(0)
        model = build_model(r.shape.cfg).to(dev)
        opt = make_optimizer(model, OptimConfig())
        b = min(r.batch_size, max_batch)
        x = torch.randint(0, r.shape.cfg.vocab_size, (b, r.shape.cfg.seq_len), device=dev)
        best = math.inf
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(x).logits.float().logsumexp(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step pays for allocation and kernel selection
                best = min(best, time.perf_counter() - t0)
        rates[v] = r.flops_per_token * b * r.shape.cfg.seq_len / best
    return rates


def with_estimates(runs: list[Run], rates: dict[str, float]) -> list[Run]:
    """Each run's estimated seconds: its training FLOPs over its variant's measured FLOP/s."""
    return [
        replace(r, est_seconds=r.flops_train / rates[r.variant]) if r.variant in rates else r for r in runs
    ]


# ---------------------------------------------------------------- output


def table(runs: list[Run]) -> str:
    head = (
        "budget",
        "family",
        "variant",
        "d_model",
        "n_layers",
        "N",
        "D",
        "D/N",
        "C",
        "steps",
        "batch",
        "lr",
        "est_h",
    )
    rows = [head]
    for r in runs:
        rows.append(
            (
                f"{r.budget:.3g}",
                r.family,
                r.variant,
                str(r.shape.cfg.d_model),
                str(r.shape.cfg.n_layers),
                f"{r.params:,}",
                f"{r.tokens:,}",
                f"{r.tokens / r.params:.1f}",
                f"{r.flops_train:.4g}",
                str(r.steps),
                str(r.batch_size),
                f"{r.lr:.3g}",
                "" if r.est_seconds is None else f"{r.est_seconds / 3600:.3f}",
            )
        )
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w[i]) if i > 2 else c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    est = [r.est_seconds for r in runs if r.est_seconds is not None]
    if est:
        lines.append(f"{len(runs)} runs, estimated {sum(est) / 3600:.3f} h ({sum(est):.0f} s) on this device")
    else:
        lines.append(f"{len(runs)} runs")
    return "\n".join(lines)


def sweep_text(name: str, runs: list[Run], common: list[str] | None = None, command: str = "",
               rules: PlanRules | None = None, kept: list[str] | None = None) -> str:  # fmt: skip
    """The sweep file: `sweep`, `common`, the planning rules (`plan:`, read by `--extend`) and one
    override list per run, each after a comment; `kept`: run lines of an earlier file, kept first."""
    lines = [
        f"# IsoFLOP sweep planned by harness-plan{': ' + command if command else ''}",
        f"# Run with: harness-train -m sweep={name}",
        f"sweep: {name}",
        f"common: {_flow(common or [])}",
    ]
    if rules is not None:
        lines.append(
            f"plan: {yaml.safe_dump(_plain(asdict(rules)), default_flow_style=True, width=10**6).strip()}"
        )
    lines.append("runs:")
    lines += kept or []
    for r in runs:
        lines.append(
            f"  # C={fmt_budget(r.budget)} {r.variant}: N={r.params:,} D={r.tokens:,} "
            f"F/token={r.flops_per_token:,} flops_train={r.flops_train:.6g}"
        )
        lines.append(f"  - {_flow(r.overrides())}")
    return "\n".join(lines) + "\n"


def _flow(items: list[str]) -> str:
    return yaml.safe_dump(items, default_flow_style=True, width=10**6).strip()


def _plain(x: object) -> object:
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else (
        {k: _plain(v) for k, v in x.items()} if isinstance(x, dict) else x)  # fmt: skip


def write_sweep(path: Path, name: str, runs: list[Run], common: list[str] | None = None, command: str = "",
                rules: PlanRules | None = None, kept: list[str] | None = None) -> Path:  # fmt: skip
    from harness.fileio import atomic_write_text

    text = sweep_text(name, runs, common, command, rules, kept)
    loaded = yaml.safe_load(text)
    assert loaded["sweep"] == name and loaded["runs"][len(loaded["runs"]) - len(runs) :] == [
        r.overrides() for r in runs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def default_variants() -> list[str]:
    """One variant per registered family: the family's own preset (or its tiny one)."""
    out = []
    for fam in FAMILIES:
        try:
            sizing.resolve_variant(fam)
        except ValueError:
            log.warning("family %s has no preset conf/model/%s.yaml or %s_tiny.yaml; left out", fam, fam, fam)
            continue
        out.append(fam)
    return out


# The demo (`make demo`): Transformer++ and Mamba at six budgets over 1.5 decades, small enough to train
# in about five minutes on two CPU cores, two runs at a time. At this scale the embedding and head
# dominate the FLOPs and the optimum sits at hundreds of tokens per parameter, far from Hoffmann et
# al.'s 20, so the grids are centred on a law measured here: N_opt = 9e3 (C / 1e11)^0.95, from the
# IsoFLOP optima of a first version of this sweep (about 0.9k at 1e10, 4-6k at 4e10, 8-13k at 8e10,
# 24-34k at 3.3e11, both families). Widths go down to 4 (one attention head) so that the smallest
# budgets can bracket their optimum.
DEMO_BUDGETS = (7.5e9, 1.5e10, 3e10, 6e10, 1.2e11, 2.5e11)
DEMO_VARIANTS = ("llama", "mamba")
DEMO_COMMON = ["train.eval_batches=4", "train.log_every=10", "train.ckpt_every=0", "train.threads=1"]
# The full-family sweep (`make demo-full`): every registered family plus a second MoE router (Switch
# top-1 with capacity and dropping) at three budgets, FLOP-matched at each size.
DEMO_FULL_BUDGETS = (5e10, 8e10, 1.3e11)
DEMO_EXTRA_VARIANTS = ("switch_small",)


def demo_full_rules() -> PlanRules:
    """Models this small need finer sizing steps to FLOP-match all families: d_model in multiples of 8
    (2 without a fine knob), heads of 16, a wider aspect band; 10 tokens per parameter as the guess."""
    fine = sizing.SizingRules(multiple=8, bare_multiple=2, head_dim=16, aspect_spread=4.0, knob_multiple=4)
    return PlanRules(
        seq_len=64,
        batch_size=8,
        sizes=3,
        size_spread=3.0,
        tokens_per_param=10.0,
        evals_per_run=8,
        sizing=fine,
    )


def demo_rules() -> PlanRules:
    fine = sizing.SizingRules(multiple=4, bare_multiple=2, head_dim=8, min_d_model=4, narrow_single_head=True,
                              aspect_spread=4.0, knob_multiple=4)  # fmt: skip
    return replace(demo_full_rules(), sizes=5, size_spread=12.0, sizing=fine, centre_params=9e3,
                   centre_flops=1e11, centre_exponent=0.95)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="harness-plan", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budgets", type=float, nargs="+", help="compute budgets, training FLOPs (e.g. 1e13 3e13)"
    )
    p.add_argument("--families", nargs="+", help="families or presets (default: every registered family)")
    p.add_argument("--reference", default="", help="variant whose non-embedding params name a size")
    p.add_argument("--sizes", type=int, default=3, help="model sizes per budget")
    p.add_argument("--size-spread", type=float, default=4.0, help="largest / smallest N per budget")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="compute-optimal guess D/N")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (at --ref-params)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (at --ref-params)")
    p.add_argument("--rule", choices=("constant", "porian"), default="constant", help="batch and lr rule")
    p.add_argument(
        "--ref-params", type=float, default=1e6, help="N where the porian rule gives --batch-size, --lr"
    )
    p.add_argument("--evals", type=int, default=4, help="evaluations per run")
    p.add_argument("--common", nargs="*", default=[], help="overrides applied to every run")
    p.add_argument("--name", default="", help="sweep name (default: isoflop_<budgets>)")
    p.add_argument("--out", default=str(SWEEPS_DIR), help="directory for the sweep file")
    p.add_argument("--demo", action="store_true", help="write the demo sweep (sweeps/demo.yaml)")
    p.add_argument(
        "--demo-full", action="store_true", help="write the full-family sweep (sweeps/demo_full.yaml)"
    )
    p.add_argument("--extend", metavar="RESULTS", default=None,
                   help="add sizes to the grids of a finished sweep (results/<sweep>) that missed their optimum; "
                        "rewrites its sweep file with the new runs after the old ones")  # fmt: skip
    p.add_argument("--centre-from", metavar="RESULTS", default=None,
                   help="centre each family's sizes on the optimum law N_opt(C) fitted to the bracketed IsoFLOP "
                        "optima of an earlier sweep (a pilot at small budgets), extrapolated to --budgets")  # fmt: skip
    p.add_argument("--no-timing", action="store_true", help="skip measuring this device's speed")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    kw = dict(
        seq_len=a.seq_len,
        vocab_size=a.vocab_size,
        sizes=a.sizes,
        size_spread=a.size_spread,
        tokens_per_param=a.tokens_per_param,
        batch_rule=a.rule,
        lr_rule=a.rule,
        batch_size=a.batch_size,
        lr=a.lr,
        ref_params=a.ref_params,
        evals_per_run=a.evals,
        reference=a.reference,
    )
    if a.extend:
        return _main_extend(a, argv)
    budgets, common, name = a.budgets, list(a.common), a.name
    if a.demo:
        budgets, common, name = budgets or list(DEMO_BUDGETS), common or list(DEMO_COMMON), name or "demo"
    if a.demo_full:
        budgets, name = budgets or list(DEMO_FULL_BUDGETS), name or "demo_full"
        common = common or [o for o in DEMO_COMMON if not o.startswith("train.threads")]
    if not budgets:
        p.error("give --budgets (or --demo)")
    name = name or "isoflop_" + "-".join(fmt_budget(b) for b in sorted(budgets))
    try:
        check_sweep_name(name)  # the file is <out>/<name>.yaml: a bad name would land elsewhere
        if a.demo:
            rules = demo_rules()
            # each family around its own measured centre; the largest runs first, so two workers end together
            runs = [r for v in (a.families or DEMO_VARIANTS) for r in plan(budgets, [v], rules)]
            runs.sort(key=lambda r: (-r.budget, r.flops_per_token))
        elif a.centre_from:
            rules = PlanRules(**kw)
            pilot = Path(a.centre_from)
            centres = centres_from(pilot, Path(a.out) / f"{pilot.name}.yaml", rules)
            variants = [sizing.resolve_variant(v) for v in a.families] if a.families else sorted(centres)
            if not variants:
                raise ValueError(
                    f"no grid in {pilot} bracketed its optimum: nothing to centre on (give --families)"
                )
            runs = [r for v in variants for r in plan(budgets, [v], centres.get(v, rules))]
        else:
            rules = demo_full_rules() if a.demo_full else PlanRules(**kw)
            variants = a.families or default_variants() + (list(DEMO_EXTRA_VARIANTS) if a.demo_full else [])
            runs = plan(budgets, variants, rules)
        verify(runs, common)
    except ValueError as e:
        sys.exit(f"harness-plan: {e}")
    if not a.no_timing:
        runs = with_estimates(runs, measure_rates(runs))
    print(table(runs))
    if not a.dry_run:
        cmd = "harness-plan " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_sweep(Path(a.out) / f"{name}.yaml", name, runs, common, cmd.strip(), rules)
        print(f"wrote {path}; run it with: harness-train -m sweep={name}")


def _main_extend(a: argparse.Namespace, argv: list[str] | None) -> None:
    results = Path(a.extend)
    name = a.name or results.name
    try:
        check_sweep_name(name)
    except ValueError as e:
        sys.exit(f"harness-plan: {e}")
    path = Path(a.out) / f"{name}.yaml"
    if not results.is_dir():
        sys.exit(f"harness-plan: results directory not found: {results}")
    if not path.is_file():
        sys.exit(f"harness-plan: no sweep file {path} for {results} (give --name or --out)")
    spec = yaml.safe_load(path.read_text()) or {}
    rules = rules_from_sweep(path)
    if rules is None:
        sys.exit(f"harness-plan: {path} has no plan: section (the rules its runs were planned with), so new "
                 "sizes could not match them; re-plan it with this version of harness-plan")  # fmt: skip
    common = [str(o) for o in spec.get("common") or []]
    try:
        runs = extend(results, path, rules)
        verify(runs, common)
    except ValueError as e:
        sys.exit(f"harness-plan: {e}")
    if not runs:
        print(f"every grid of {results} brackets its optimum (or has no usable runs): nothing to add")
        return
    print(table(runs))
    if not a.dry_run:
        lines = path.read_text().splitlines()
        kept = lines[lines.index("runs:") + 1 :] if "runs:" in lines else []
        cmd = "harness-plan " + " ".join(argv if argv is not None else sys.argv[1:])
        write_sweep(path, name, runs, common, cmd.strip(), rules, kept)
        print(f"added {len(runs)} runs to {path}; run them with: harness-train -m sweep={name} "
              f"(finished runs are skipped), then harness-report {results}")  # fmt: skip


if __name__ == "__main__":
    main()
