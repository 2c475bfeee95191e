"""Collect every run under a results directory into tidy tables.

`collect(path)`: one row per run directory; `curves(path)`: one row per (run, logged step).
A run directory is one that holds config.yaml, metrics.jsonl or summary.json. A corrupt or
half-written run directory becomes a row with status "corrupt" and a reason, and a warning, never
an exception, so one bad run cannot hide the others.
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

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
COLUMNS = [
    "sweep", "run", "path", "status", "reason", "family", "arch", "causal", "comparable",
    "final_val_loss", "final_train_loss", "params_total", "params_nonembed", "params_active",
    "flops_per_token", "flops_6n_per_token", "flops_train", "flops_budget", "tokens", "steps",
    "batch_size", "lr", "seq_len", "wall_s", "tokens_per_s", "device", "d_model", "n_layers",
]  # fmt: skip
CURVE_COLUMNS = ["sweep", "run", "family", "arch", "step", "tokens", "flops_train", "train_loss",
                 "val_loss", "lr", "wall_s", "tokens_per_s"]  # fmt: skip


def find_run_dirs(path: str | Path) -> list[Path]:
    root = Path(path)
    found = {p.parent for name in RUN_FILES for p in root.rglob(name)}
    # Hydra's bookkeeping and checkpoints are not runs.
    return sorted(
        d
        for d in found
        if not any(part.startswith(".") or part == "ckpt" for part in d.relative_to(root).parts)
    )


def _read_run(d: Path, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    rel = d.relative_to(root)
    row.update(path=str(d), run=d.name, sweep=rel.parts[0] if len(rel.parts) > 1 else root.name)
    problems: list[str] = []
    summary: dict[str, Any] = {}
    if (d / "summary.json").exists():
        try:
            summary = json.loads((d / "summary.json").read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
            problems.append(f"summary.json unreadable ({e})")
            summary = {}
    else:
        problems.append("summary.json missing")
    config: dict[str, Any] = {}
    if (d / "config.yaml").exists():
        try:
            config = yaml.safe_load((d / "config.yaml").read_text()) or {}
            if not isinstance(config, dict):
                raise ValueError("not a mapping")
        except (yaml.YAMLError, ValueError) as e:
            problems.append(f"config.yaml unreadable ({e})")
            config = {}
    else:
        problems.append("config.yaml missing")

    model = config.get("model") or {}
    row.update(
        family=model.get("family"),
        arch=model.get("name") or model.get("family"),
        d_model=model.get("d_model"),
        n_layers=model.get("n_layers"),
        seq_len=model.get("seq_len"),
    )
    for k in COLUMNS:
        if k in summary and k not in ("path", "run"):
            row[k] = summary[k]
    row["device"] = (summary.get("hardware") or {}).get("device")
    status = summary.get("status")
    if problems:
        row.update(status="corrupt", reason="; ".join(problems))
    elif status not in ("completed", "failed", "running"):
        row.update(status="corrupt", reason=f"unknown status {status!r} in summary.json")
    elif status == "completed" and not _finite(summary.get("final_val_loss")):
        row.update(
            status="failed", reason=summary.get("reason") or "completed without a finite final val loss"
        )
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
        row = _read_run(d, root)
        if row["status"] == "corrupt":
            warnings.warn(f"run {d}: {row['reason']}", stacklevel=2)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("causal", "comparable"):
        df[c] = df[c].map(lambda v: bool(v) if v is not None else True).astype(bool)
    num = [
        c
        for c in COLUMNS
        if c.startswith(("final_", "params_", "flops_"))
        or c
        in ("tokens", "steps", "batch_size", "lr", "seq_len", "wall_s", "tokens_per_s", "d_model", "n_layers")
    ]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    df["label"] = [run_label(r) for r in df.itertuples()]
    return df.sort_values(["sweep", "run"], kind="stable").reset_index(drop=True)


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
    """One row per (run, logged step) from every metrics.jsonl under `path`; torn lines are skipped.
    `runs`: the `collect(path)` table when the caller already has it, so run dirs are read once."""
    root = Path(path)
    if runs is None:
        runs = collect(root) if root.is_dir() else pd.DataFrame(columns=COLUMNS)
    frames = []
    for r in runs.itertuples():
        p = Path(r.path) / "metrics.jsonl"
        if not p.exists():
            continue
        recs = []
        for i, line in enumerate(p.read_text(errors="replace").splitlines()):
            try:
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" in rec:
                    recs.append(rec)
            except json.JSONDecodeError:
                warnings.warn(f"{p}:{i + 1}: unreadable metrics line skipped", stacklevel=2)
        if recs:
            f = pd.DataFrame(recs)
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
