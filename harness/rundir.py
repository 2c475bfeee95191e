"""The run directory `results/<sweep>/<run>/`: its files' schemas, checkpoints and metrics.

    config.yaml     the resolved RunConfig (harness.config)
    metrics.jsonl   one `MetricsRecord` per log/eval step
    summary.json    a `Summary`: status (running | completed | failed), reason, final numbers
    ckpt/step_<n>/  model.safetensors + state.pt (optimizer, step, RNG state), written atomically
    owner.json      who is training the run right now (`harness.owner`)

Train, the sweeper, `collect` and `evaluate` read these files through this module, so each file
has one definition of what a well-formed copy holds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_model, save_file

from harness.fileio import atomic_write_json, fsync_tree


class RunFileError(ValueError):
    """A run file that exists but does not hold what its schema says; names the file. `why` is the
    reason alone, for callers that name the file themselves."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.why = why


class Summary(BaseModel):
    """summary.json. Fields a run writes as it goes; later ones appear once known."""

    model_config = ConfigDict(extra="allow")

    status: Literal["running", "completed", "failed"]
    reason: str = ""
    sweep: str | None = None
    run: str | None = None
    family: str | None = None
    arch: str | None = None
    causal: bool = True
    comparable: bool = True
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    steps: int | None = None
    tokens: int | None = None
    flops_fwd_per_token: float | None = None
    flops_per_token: float | None = None
    flops_6n_per_token: float | None = None
    params_total: int | None = None
    params_nonembed: int | None = None
    params_active: int | None = None
    flops_train: float | None = None
    flops_budget: float | None = None
    hardware: dict[str, Any] | None = None
    steps_done: int | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    # steady-state training throughput: compile warm-up, evaluation and checkpoints excluded
    train_flops_per_s: float | None = None
    mfu: float | None = None  # of the peak of every device the run holds (harness.hardware)
    peak_mem_gb: float | None = None
    world_size: int | None = None
    parallel: str | None = None  # none | ddp | fsdp (harness.parallel)
    final_val_loss: float | None = None
    final_train_loss: float | None = None


class MetricsRecord(BaseModel):
    """One line of metrics.jsonl. `aux/<name>` and `metric/<name>` keys ride along as extras."""

    model_config = ConfigDict(extra="allow")

    step: int
    tokens: int | None = None
    flops_train: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    train_flops_per_s: float | None = None  # since the previous record, warm-up and eval excluded
    mfu: float | None = None
    peak_mem_gb: float | None = None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}" + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")


def _summary_json(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "summary.json"
    try:
        raw = json.loads(p.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints, deep nesting
        raise RunFileError(p, f"not valid JSON ({e})"[:500]) from e
    if not isinstance(raw, dict):
        raise RunFileError(p, f"expected a JSON object, found {type(raw).__name__}")
    try:
        Summary.model_validate(raw)
    except ValidationError as e:
        raise RunFileError(p, _first_error(e)) from e
    return raw


def load_summary(run_dir: Path) -> Summary | None:
    """summary.json validated against `Summary`; None when absent; `RunFileError` when malformed."""
    raw = _summary_json(run_dir)
    return Summary.model_validate(raw) if raw is not None else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json as written (validated), or None when absent or malformed: the caller treats
    such a run as not done."""
    try:
        return _summary_json(run_dir)
    except RunFileError:
        return None


def is_final(summary: dict[str, Any] | None) -> bool:
    """A run to leave alone: completed, or failed by diverging, a result that training again from
    its last checkpoint would only repeat."""
    if not summary:
        return False
    status, reason = summary.get("status"), str(summary.get("reason") or "")
    return status == "completed" or (status == "failed" and reason.startswith("diverged"))


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(records, [(line number, why)] of the lines skipped). A line is kept only when it parses as
    a `MetricsRecord`; blank lines are ignored."""
    recs, bad = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((i, f"not valid JSON ({e.msg})"))
            continue
        except (ValueError, RecursionError) as e:  # integers past Python's digit limit, deep nesting
            bad.append((i, f"not valid JSON ({type(e).__name__})"))
            continue
        if not isinstance(raw, dict):
            bad.append((i, f"expected a JSON object, found {type(raw).__name__}"))
            continue
        try:
            rec = MetricsRecord.model_validate(raw)
        except ValidationError as e:
            bad.append((i, _first_error(e)))
            continue
        recs.append({**raw, **rec.model_dump(exclude_unset=True)})
    return recs, bad


def read_metrics(run_dir: Path, upto_step: int) -> list[str]:
    """metrics.jsonl lines up to a checkpoint's step, for a resuming run to keep. Reading stops at
    the first line that does not parse: only the last line can be torn by a crash."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    kept = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            if MetricsRecord.model_validate_json(line).step > upto_step:
                break
        except ValidationError:
            break
        kept.append(line)
    return kept


# ---------------------------------------------------------------- failures on other ranks


def note_rank_failure(run_dir: Path, rank: int, reason: str) -> None:
    """A rank other than 0 leaves why it failed, for rank 0 to put in summary.json: the one file
    such a rank writes."""
    note = {"rank": rank, "reason": reason[:800], "time": time.time()}
    atomic_write_json(Path(run_dir) / f".rank_{rank}.failed", note)


def rank_failures(run_dir: Path, before: float = math.inf, clear: bool = False) -> list[tuple[int, str]]:
    """(rank, reason) of the failure notes written before `before` (a time.time()), earliest
    first: the ranks that failed before the caller did, not because it did. `clear` removes all."""
    out = []
    for p in Path(run_dir).glob(".rank_*.failed"):
        try:
            note = json.loads(p.read_text())
            if float(note["time"]) < before:
                out.append((float(note["time"]), int(note["rank"]), str(note["reason"])))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if clear:
            p.unlink(missing_ok=True)
    return [(r, why) for _, r, why in sorted(out)]


# ---------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be loaded."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first (in-progress `.tmp_*` and set-aside `broken_*` are not)."""
    return sorted((Path(run_dir) / "ckpt").glob("step_*"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = checkpoints(run_dir)
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    aliases: dict[str, str] | None = None,
    keep: int = 1,
    before_publish=lambda: None,
) -> None:
    """Writes ckpt/step_<state["step"]>/ atomically: `weights` (a full state dict without the tied
    aliases, `{dropped: kept}`) as model.safetensors, the rest (optimizer, step, RNG) as state.pt.
    Then removes all but the newest `keep` checkpoints. `before_publish()` runs before the rename
    and before the pruning (an owner's check that it still owns the run: writing can take long
    enough to lose it)."""
    ckpt = Path(run_dir) / "ckpt"
    for stale in ckpt.glob(".tmp_step_*"):  # left by a killed attempt; the caller owns the run
        shutil.rmtree(stale, ignore_errors=True)
    step = int(state["step"])
    tmp = ckpt / f".tmp_step_{step:08d}.{os.getpid()}"
    tmp.mkdir(parents=True)
    # the same file safetensors' save_model writes, which load_model reads back tied
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", **(aliases or {})})
    torch.save(state, tmp / "state.pt")
    fsync_tree(tmp)  # the rename below must not publish files whose data is still in the page cache
    final = ckpt / f"step_{step:08d}"
    before_publish()
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)  # a directory rename is atomic: a checkpoint is all there or absent
    fsync_tree(ckpt, files=False)
    before_publish()
    for old in checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _transient(e: BaseException) -> bool:
    """An I/O or device failure, as opposed to a file that does not hold a checkpoint. Corrupt
    files raise all sorts (IndexError from a truncated state.pt, SafetensorError, KeyError...), so
    the transient kinds are the ones named."""
    if isinstance(e, OSError):
        return not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
    return isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA" in str(e)


def load_checkpoint(path: Path, model, opt, rank: int = 0) -> dict[str, Any]:
    """Restores model, optimizer and this rank's RNG state, and returns the rest of state.pt (step,
    the loop's numbers); `CheckpointError` names the file that failed."""
    path = Path(path)
    try:
        load_model(model, str(path / "model.safetensors"))
        # on the CPU: a run may resume on fewer GPUs or none; the optimizer moves state to its params
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])
        state["step"] = int(state["step"])
        _restore_rng(state, rank)
    except Exception as e:
        if _transient(e):  # the checkpoint may be fine: never let skip-broken set it aside for this
            raise
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}"[:800]) from e
    return state


def _restore_rng(state: dict[str, Any], rank: int) -> None:
    """Rank 0's state is at the top level (as a one-process run writes it), the others' in
    `rank_rng`. A rank the checkpoint has no state for (written at a smaller world size) keeps the
    fresh seed it started with."""
    if rank == 0:
        own = state
    elif rank - 1 < len(state.get("rank_rng") or ()):
        own = state["rank_rng"][rank - 1]
    else:
        return
    torch.set_rng_state(own["torch_rng"])
    if own.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda_rng"][: torch.cuda.device_count()])


def set_aside(ckpt: Path) -> Path:
    """Moves a checkpoint that will not load to ckpt/broken_<name>, out of the resume path but kept
    for inspection."""
    dest = ckpt.parent / f"broken_{ckpt.name}"
    n = 1
    while dest.exists():
        dest, n = ckpt.parent / f"broken_{ckpt.name}.{n}", n + 1
    os.rename(ckpt, dest)
    return dest
