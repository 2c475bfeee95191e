"""Collect every run under a results directory into tidy tables.

`collect(path)`: one row per run directory; `curves(path)`: one row per (run, logged step);
`exclusions(runs)`: one row per run the fits cannot use and per run whose metrics lines were skipped.
A run directory is one that holds config.yaml, metrics.jsonl or summary.json.

Every run file is validated when read (schemas in `harness.rundir`; the model in config.yaml must
build with `harness.models.make_config`). Reading one run never raises, so one bad run cannot hide
the others. A run's `status` is the summary's (running | completed | failed), or:
- "corrupt": a run file is missing or malformed;
- "invalid": the summary says completed but its numbers are impossible: a negative or non-finite
  loss, tokens that are not steps x batch_size x seq_len, flops_train that is not flops_per_token x
  tokens, flops_per_token other than the FLOP accountant's count for the config's model, a
  negative parameter count. (Completed without a finite final val loss stays "failed".)
`reason` says why, starting with the file at fault; `file` names that file (several joined by ", ",
empty for a run-level reason such as a divergence). Malformed metrics.jsonl lines are skipped:
`metrics_skipped` counts them and `metrics_reason` says which and why, except a torn last line of a
"running" run, which a crash mid-write leaves and which is counted but not reported. Corrupt and
invalid runs and skipped lines also raise a warning.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness import flops as flop_count
from harness.fit import split_usable
from harness.models import make_config
from harness.rundir import RunFileError, Summary, load_summary, parse_metrics

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
COLUMNS = [
    "sweep", "run", "path", "status", "reason", "file", "family", "arch", "causal", "comparable",
    "final_val_loss", "final_train_loss", "params_total", "params_nonembed", "params_active",
    "flops_per_token", "flops_6n_per_token", "flops_train", "flops_budget", "tokens", "steps",
    "batch_size", "lr", "seq_len", "wall_s", "tokens_per_s", "device", "device_name", "world_size",
    "parallel", "device_hours", "train_flops_per_s", "mfu", "peak_mem_gb", "d_model", "n_layers",
    "metrics_skipped", "metrics_reason",
]  # fmt: skip
CURVE_COLUMNS = ["sweep", "run", "family", "arch", "step", "tokens", "flops_train", "train_loss",
                 "val_loss", "lr", "wall_s", "tokens_per_s", "train_flops_per_s", "mfu"]  # fmt: skip
THROUGHPUT = (
    "wall_s",
    "tokens_per_s",
    "world_size",
    "device_hours",
    "train_flops_per_s",
    "mfu",
    "peak_mem_gb",
)
EXCLUSION_COLUMNS = ["sweep", "arch", "run", "status", "file", "why"]
SHAPE_KEYS = (("train", "batch_size"), ("model", "seq_len"))  # (config.yaml section, key = summary field)
REL_TOL = 1e-6  # summary numbers are written from exact integer products; 1e-6 absorbs float printing


def find_run_dirs(path: str | Path) -> list[Path]:
    root = Path(path)
    found = {p.parent for name in RUN_FILES for p in root.rglob(name)}
    # Hydra's bookkeeping and checkpoints are not runs.
    return sorted(
        d
        for d in found
        if not any(part.startswith(".") or part == "ckpt" for part in d.relative_to(root).parts)
    )


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _read_summary(d: Path) -> tuple[Summary | None, str | None]:
    """(summary, None) or (None, why it is unusable)."""
    try:
        s = load_summary(d)
    except RunFileError as e:
        return None, e.why  # the row names the file
    except OSError as e:
        return None, f"unreadable ({e})"
    return (s, None) if s is not None else (None, "missing")


def _yaml_error(e: yaml.YAMLError) -> str:
    """'expected ',' or ']', but got '<stream end>' at line 2, column 1': without the echoed source."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return " ".join(str(e).split())[:200]
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")


def _read_config(d: Path) -> tuple[dict[str, Any], Any, list[str]]:
    """(config mapping, built model config or None, [why config.yaml is malformed])."""
    p = d / "config.yaml"
    try:
        config = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        return {}, None, ["missing"]
    except yaml.YAMLError as e:
        return {}, None, [f"not valid YAML ({_yaml_error(e)})"]
    except (OSError, UnicodeDecodeError) as e:
        return {}, None, [f"unreadable ({e})"]
    if not isinstance(config, dict):
        found = "nothing" if config is None else f"{type(config).__name__} {_show(config)}"
        return {}, None, [f"expected a mapping, found {found}"]
    bad = [
        f"{k} must be a mapping, found {type(config[k]).__name__} {_show(config[k])}"
        for k in ("model", "train", "data", "optim")
        if k in config and not isinstance(config[k], dict)
    ]
    model = config.get("model")
    if "model" not in config:
        bad.insert(0, "model missing")
    model_cfg = None
    if isinstance(model, dict):
        try:
            model_cfg = make_config(dict(model))
        except Exception as e:  # unknown family or field, or a value its __post_init__ rejects
            bad.append(f"model: {e}" if isinstance(e, ValueError) else f"model: {type(e).__name__}: {e}")
    for section, key in SHAPE_KEYS:  # the truth the summary's token count is held to
        v = config[section].get(key) if isinstance(config.get(section), dict) else None
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            bad.append(f"{section}.{key} must be a positive integer, found {_show(v)}")
    return config, model_cfg, bad


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)


def _impossible(s: Summary, config: dict[str, Any], model_cfg: Any) -> list[str]:
    """Why a completed run's numbers cannot be true (empty when they can)."""
    why = []
    for k in ("final_val_loss", "final_train_loss"):
        v = getattr(s, k)
        if v is not None and not (math.isfinite(v) and v >= 0):
            why.append(f"{k} {v} is {'negative' if v < 0 else 'not finite'}")
    for k in ("params_total", "params_nonembed", "params_active"):
        v = getattr(s, k)
        if v is not None and v < 0:
            why.append(f"{k} {v} is negative")
    # config.yaml is what the run was built from: its shape is the truth the summary must match
    truth = {}
    for section, key in SHAPE_KEYS:
        cv, sv = config.get(section, {}).get(key), getattr(s, key)
        if cv is not None and sv is not None and cv != sv:
            why.append(f"{key} {sv} disagrees with config.yaml {section}.{key} {cv}")
        truth[key] = (cv, f"config.yaml {section}.{key}") if cv is not None else (sv, key)
    (bs, bs_src), (sl, sl_src) = truth["batch_size"], truth["seq_len"]
    if s.tokens is not None and s.steps is not None and bs is not None and sl is not None:
        if s.tokens != s.steps * bs * sl:
            why.append(
                f"tokens {s.tokens} != steps {s.steps} x {bs_src} {bs} x {sl_src} {sl} = {s.steps * bs * sl}"
            )
    if s.flops_train is not None and s.flops_per_token is not None and s.tokens is not None:
        want = s.flops_per_token * s.tokens
        if not _close(s.flops_train, want):
            why.append(
                f"flops_train {s.flops_train:.6g} != flops_per_token {s.flops_per_token:.6g} x tokens "
                f"{s.tokens} = {want:.6g}"
            )
    if s.flops_per_token is not None and model_cfg is not None:
        try:
            want = flop_count.count(model_cfg, model_cfg.seq_len).train
        except Exception as e:  # a config that builds but cannot be counted is reported, not raised
            why.append(f"the FLOP accountant cannot count config.yaml's model ({type(e).__name__}: {e})")
        else:
            if not _close(s.flops_per_token, want):
                why.append(
                    f"flops_per_token {s.flops_per_token:.6g} != {want:.6g}, the FLOP accountant's count "
                    "for config.yaml's model"
                )
    return why


def _skipped_reason(bad: list[tuple[int, str]]) -> str:
    """'2 malformed lines skipped (lines 3, 7: not valid JSON (Expecting value))'."""
    by_why: dict[str, list[int]] = {}
    for n, why in bad:
        by_why.setdefault(why, []).append(n)
    parts = []
    for why, lines in by_why.items():
        shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
        parts.append(f"line{'s' if len(lines) > 1 else ''} {shown}: {why}")
    more = f"; {len(parts) - 3} other reasons" if len(parts) > 3 else ""
    n = len(bad)
    return f"{n} malformed line{'s' if n > 1 else ''} skipped ({'; '.join(parts[:3])}{more})"


def _read_metrics(d: Path, status: str | None) -> tuple[int, str]:
    """(lines skipped, why; empty when nothing needs reporting)."""
    p = d / "metrics.jsonl"
    try:
        text = p.read_text(errors="replace")
    except FileNotFoundError:
        return 0, ""
    except OSError as e:
        return 0, f"unreadable ({e})"
    _, bad = parse_metrics(text)
    report = list(bad)
    last = max((i for i, line in enumerate(text.splitlines(), start=1) if line.strip()), default=0)
    torn = bool(report) and report[-1][0] == last and report[-1][1].startswith("not valid JSON")
    # A run killed mid-write leaves its last line torn; it resumes from a checkpoint that drops it.
    if status == "running" and torn:
        report.pop()
    return len(bad), _skipped_reason(report) if report else ""


def _blank_row(d: Path, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    rel = d.relative_to(root)
    row.update(path=str(d), run=d.name, sweep=rel.parts[0] if len(rel.parts) > 1 else root.name, file="",
               metrics_skipped=0, metrics_reason="")  # fmt: skip
    return row


def _read_run(d: Path, root: Path) -> dict[str, Any]:
    row = _blank_row(d, root)
    problems: list[tuple[str, str]] = []  # (file, why)
    summary, why = _read_summary(d)
    if why:
        problems.append(("summary.json", why))
    config, model_cfg, bad = _read_config(d)
    problems += [("config.yaml", w) for w in bad]

    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    # labels only: a malformed one has already made the run corrupt, and must not break sorting
    family, name = (str(v) if v is not None else None for v in (model.get("family"), model.get("name")))
    row.update(
        family=family,
        arch=name or family,
        d_model=model.get("d_model"),
        n_layers=model.get("n_layers"),
        seq_len=model.get("seq_len"),
    )
    if summary is not None:
        for k in Summary.model_fields:  # declared fields only: extras are unvalidated
            v = getattr(summary, k)
            if k in COLUMNS and k not in ("run", "status", "reason") and v is not None:
                row[k] = v
        row["device"] = (summary.hardware or {}).get("device")
        row["device_name"] = (summary.hardware or {}).get("device_name")
        if summary.wall_s is not None:  # what the run cost: every device it held, for its whole wall time
            row["device_hours"] = summary.wall_s * (summary.world_size or 1) / 3600
    status = summary.status if summary is not None else None
    row.update(status=status, reason=(summary.reason or None) if summary is not None else None)
    if problems:
        row.update(
            status="corrupt",
            reason="; ".join(f"{f}: {w}" for f, w in problems),
            file=", ".join(dict.fromkeys(f for f, _ in problems)),
        )
    elif status == "completed" and not _finite(summary.final_val_loss):
        row.update(status="failed", reason=summary.reason or "completed without a finite final val loss")
    elif status == "completed" and (impossible := _impossible(summary, config, model_cfg)):
        row.update(status="invalid", reason="summary.json: " + "; ".join(impossible), file="summary.json")
    row["metrics_skipped"], row["metrics_reason"] = _read_metrics(d, status)
    return row


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def collect(path: str | Path) -> pd.DataFrame:
    """One row per run directory under `path` (see module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory not found: {root}")
    rows = []
    for d in find_run_dirs(root):
        try:
            row = _read_run(d, root)
        except Exception as e:  # a failure nobody foresaw still must not hide the other runs
            row = _blank_row(d, root)
            row.update(status="corrupt", reason=f"unreadable ({type(e).__name__}: {e})")
        if row["status"] in ("corrupt", "invalid"):
            warnings.warn(f"run {d}: {row['status']}: {row['reason']}", stacklevel=2)
        if row["metrics_reason"]:
            warnings.warn(f"run {d}: metrics.jsonl: {row['metrics_reason']}", stacklevel=2)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("causal", "comparable"):
        df[c] = df[c].map(lambda v: bool(v) if v is not None else True).astype(bool)
    num = [
        c
        for c in COLUMNS
        if c.startswith(("final_", "params_", "flops_"))
        or c in ("tokens", "steps", "batch_size", "lr", "seq_len", "d_model", "n_layers", *THROUGHPUT)
    ]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    df["metrics_skipped"] = df["metrics_skipped"].fillna(0).astype(int)
    df["metrics_reason"] = df["metrics_reason"].fillna("").astype(str)
    df["file"] = df["file"].fillna("").astype(str)
    df["label"] = [run_label(r) for r in df.itertuples()]
    return df.sort_values(["sweep", "run"], kind="stable").reset_index(drop=True)


def exclusions(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run `fit.split_usable` excludes, with the file at fault (empty for a run-level reason),
    and every run whose malformed metrics lines were skipped (file metrics.jsonl); sorted rows."""
    _, excluded = split_usable(runs)
    frames = [excluded.assign(file=excluded["file"] if "file" in excluded else "")]
    if "metrics_reason" in runs:
        lines = runs[runs["metrics_reason"].fillna("").astype(str) != ""]
        frames.append(lines.assign(file="metrics.jsonl", why=lines["metrics_reason"]))
    frames = [f.reindex(columns=EXCLUSION_COLUMNS) for f in frames if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EXCLUSION_COLUMNS)
    out["file"] = out["file"].fillna("").astype(str)
    return out.sort_values(["sweep", "arch", "run", "file"], kind="stable").reset_index(drop=True)


def exclusion_lines(excl: pd.DataFrame) -> list[str]:
    """One line per row of `exclusions`, for a command's output: 'excluded RUN [FILE]: WHY'."""
    return [
        f"excluded {r.run}" + (f" [{r.file}]" if r.file else "") + f": {r.why}" for r in excl.itertuples()
    ]


def _short(x: float) -> str:
    """12_345 -> '12.3k', 1_953_280 -> '1.95M': three significant digits."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def run_label(r: Any) -> str:
    """What varies between the runs of a sweep, for people: 'mamba N=12.6k D=700k C=1e+11'.
    The directory name (derived from overrides) stays the key; this is only for tables and plots."""
    parts = [str(r.arch or r.family or r.run)]
    for key, v in (("N", r.params_nonembed), ("D", r.tokens)):
        if _finite(v):
            parts.append(f"{key}={_short(float(v))}")
    if _finite(r.flops_budget):
        parts.append(f"C={float(r.flops_budget):.3g}")
    elif _finite(r.flops_train):
        parts.append(f"C={float(r.flops_train):.3g}")
    return " ".join(parts) if len(parts) > 1 else str(r.run)


def curves(path: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (run, logged step) from every metrics.jsonl under `path`. Lines that do not parse
    as a metrics record are skipped; `collect` counts and reports them (`metrics_skipped`,
    `metrics_reason`). `runs`: the `collect(path)` table when the caller already has it."""
    root = Path(path)
    if runs is None:
        runs = collect(root) if root.is_dir() else pd.DataFrame(columns=COLUMNS)
    frames = []
    for r in runs.itertuples():
        p = Path(r.path) / "metrics.jsonl"
        try:
            recs, _ = parse_metrics(p.read_text(errors="replace"))
        except OSError:
            continue
        if recs:
            # a record's own keys never shadow the run's identity columns inserted below
            f = pd.DataFrame([{k: v for k, v in rec.items() if k not in ("sweep", "run", "family", "arch")}
                              for rec in recs])  # fmt: skip
            f.insert(0, "sweep", r.sweep)
            f.insert(1, "run", r.run)
            f.insert(2, "family", r.family)
            f.insert(3, "arch", r.arch)
            for c in (c for c in f.columns if c.startswith("metric/")):
                f[c] = f[c].map(lambda v: json.dumps(v) if v is not None and not isinstance(v, str) else v)
            frames.append(f)
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    for c in CURVE_COLUMNS:
        if c not in df.columns:
            df[c] = float("nan")
    df["val_loss"] = pd.to_numeric(df["val_loss"], errors="coerce")
    rest = sorted(c for c in df.columns if c not in CURVE_COLUMNS)
    return (
        df[CURVE_COLUMNS + rest].sort_values(["sweep", "run", "step"], kind="stable").reset_index(drop=True)
    )


def save_table(df: pd.DataFrame, out_stem: str | Path) -> tuple[Path, Path]:
    """Writes `<stem>.parquet` and `<stem>.csv` (atomically)."""
    import io

    from harness.fileio import atomic_write_bytes, atomic_write_text

    out_stem = Path(out_stem)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out_stem.with_suffix(".parquet"), buf.getvalue())
    atomic_write_text(out_stem.with_suffix(".csv"), df.to_csv(index=False))
    return out_stem.with_suffix(".parquet"), out_stem.with_suffix(".csv")
