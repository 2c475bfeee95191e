"""`harness-train`: the Hydra entry point and the training loop.

A run owns `results/<sweep>/<run>/`: `config.yaml` (resolved), `metrics.jsonl` (one JSON line per
log/eval step), `summary.json` (status and final numbers) and `ckpt/step_<n>/` (safetensors
weights + optimizer, step and RNG state). Starting a run whose directory holds a checkpoint resumes
it; a completed run is skipped. Everything is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from harness import dist, flops, hardware, parallel
from harness.config import EXECUTION_ONLY, OptimConfig, RunConfig, TrainConfig, run_config_dict
from harness.data import Prefetcher, WindowLoader, check_windows, prepare, val_batches
from harness.fileio import atomic_write_json, atomic_write_text
from harness.models import build_model, get_family
from harness.owner import OwnershipLost, RunLock, read_owner
from harness.rundir import (
    CheckpointError,
    checkpoints,
    is_final,
    load_checkpoint,
    note_rank_failure,
    rank_failures,
    read_metrics,
    read_summary,
    save_checkpoint,
    set_aside,
)

log = logging.getLogger("harness.train")


def lr_at(step: int, steps: int, o: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `steps`."""
    warmup = int(o.warmup_frac * steps)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        decay_start = steps - int(o.decay_frac * steps)
        if step < decay_start:
            return o.lr
        frac = (step - decay_start + 1) / max(1, steps - decay_start)
        return o.lr + (floor - o.lr) * frac
    frac = (step - warmup) / max(1, steps - warmup - 1)
    return floor + 0.5 * (o.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def pick_device(spec: str, d: dist.Dist | None = None) -> torch.device:
    """The device of this rank: with several ranks, CUDA means cuda:LOCAL_RANK (modulo the GPUs this
    process sees: a task bound to one GPU sees it as cuda:0)."""
    d = d or dist.Dist()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available here")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", d.local_rank % torch.cuda.device_count() if d.world > 1 else 0)
    if dev.type == "cuda" and d.world > 1:
        raise ValueError(f"train.device={spec!r} puts every rank on one GPU; use train.device=cuda (or auto)")
    return dev


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    # Weight decay on matrices (incl. embeddings) only, not on norm gains and biases (nanoGPT's rule).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel (one launch for every tensor) where every parameter lives on a GPU
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, s: Setup) -> float:
    """Mean validation loss over the fixed validation windows; each rank scores its share of every
    batch and the means are averaged across ranks."""
    run, d = s.run, s.d
    model.eval()
    total = torch.zeros((), device=s.device)
    for x, y in val_batches(s.data, run.model.seq_len, run.train.batch_size, run.train.eval_batches):
        n = x.shape[0] // d.world
        x, y = x[d.rank * n : (d.rank + 1) * n], y[d.rank * n : (d.rank + 1) * n]
        parts = []
        for i in range(0, n, s.micro):  # no larger than a training forward, which is what fits
            with s.autocast():
                xi, yi = x[i : i + s.micro].to(s.device), y[i : i + s.micro].to(s.device)
                parts.append(lm_loss(model(xi).logits, yi))
        loss = parts[0] if len(parts) == 1 else torch.stack(parts).mean()
        total += loss.float()
    model.train()
    return dist.mean(total, d).item() / run.train.eval_batches  # one read of the device


# ---------------------------------------------------------------- run directory


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: {f: x for f, x in v.items() if f not in EXECUTION_ONLY.get(k, ())} if isinstance(v, dict) else v
            for k, v in cfg.items()}  # fmt: skip


def _default(section: Any, name: str) -> Any:
    for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return None


def config_differences(stored: dict[str, Any], run: RunConfig) -> list[str]:
    """What differs between a run directory's config.yaml and `run`, execution-only fields aside. A
    field the stored config lacks (added to the schema since) counts as its default, so runs
    started by an older version still resume."""
    a, b = _identity(stored), _identity(run_config_dict(run))
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            section = getattr(run, k, None)
            for f in sorted(set(x) | set(y)):
                old = x[f] if f in x else _default(section, f)
                if old != y.get(f):
                    out.append(f"{k}.{f}: {old!r} -> {y.get(f)!r}")
        elif x != y:
            out.append(f"{k}: {x!r} -> {y!r}")
    return out


# ---------------------------------------------------------------- the loop


class Divergence:
    """The divergence rules beside non-finite losses (TrainConfig).

    - Spike: the moving average of the train loss (EMA_BETA) above `spike_factor` x its own running
      minimum, for `spike_steps` steps in a row. Both sides are averages, so neither one easy
      batch (a low floor) nor one hard batch (a high step) decides; a run that climbs back to the
      unigram plateau, about twice the loss it had reached, is caught.
    - Uniform: the final validation loss worse than guessing uniformly, ln(vocab), or any
      validation loss after warmup worse than twice that. An untrained model sits near ln(vocab),
      so a slow but sound run can be just above it mid-run; past 2 ln(vocab) it has blown up.
    """

    EMA_BETA = 0.9

    def __init__(self, run: RunConfig, state: dict[str, Any] | None = None):
        t = run.train
        self.factor, self.steps, self.uniform = t.spike_factor, t.spike_steps, t.fail_above_uniform
        self.ln_vocab = math.log(run.model.vocab_size)
        self.warmup, self.last_step = int(run.optim.warmup_frac * run.steps), run.steps
        state = state or {}
        self.ema = state.get("loss_ema", math.nan)
        self.ema_min = state.get("loss_ema_min", math.inf)
        self.spikes = state.get("spikes", 0)

    def state(self) -> dict[str, Any]:
        return {"loss_ema": self.ema, "loss_ema_min": self.ema_min, "spikes": self.spikes}

    def train_loss(self, loss: float, step: int) -> str:
        """The reason the run diverged at this step, or ""."""
        if not math.isfinite(loss):
            return f"diverged: non-finite loss at step {step}"
        self.ema = loss if math.isnan(self.ema) else self.EMA_BETA * self.ema + (1 - self.EMA_BETA) * loss
        if self.factor and self.ema > self.factor * self.ema_min:
            self.spikes += 1
            if self.spikes >= self.steps:
                return (
                    f"diverged: the moving average of the train loss, {self.ema:.4g} at step {step}, has "
                    f"stayed above {self.factor:g} x its minimum {self.ema_min:.4g} for {self.spikes} steps "
                    "(train.spike_factor, train.spike_steps)"
                )
        else:
            self.spikes = 0
        self.ema_min = min(self.ema_min, self.ema)
        return ""

    def val_loss(self, loss: float, step: int) -> str:
        if not math.isfinite(loss):
            return f"diverged: non-finite validation loss at step {step}"
        if not self.uniform or step <= self.warmup:
            return ""
        final = step >= self.last_step
        bound = self.ln_vocab if final else 2 * self.ln_vocab
        if loss > bound:
            n = f"{math.exp(self.ln_vocab):.0f}"
            what = f"ln({n}) = {bound:.4g}" if final else f"2 ln({n}) = {bound:.4g}"
            return (
                f"diverged: {'final ' if final else ''}validation loss {loss:.4g} at step {step} is above "
                f"{'' if final else 'twice '}the loss of guessing uniformly, {what} (train.fail_above_uniform)"
            )
        return ""


# ---------------------------------------------------------------- setup


class Preemption:
    """Slurm's warning signal before a time limit or a preemption, in a job of the submitit launcher.
    submitit's handler would requeue the job at once, losing the steps since the last checkpoint;
    this one only notes the signal. The loop checkpoints at the next step boundary, the run gives up
    its directory, and then submitit's handler requeues the job as before."""

    def __init__(self) -> None:
        self.pending: tuple | None = None
        self.original = None
        if (
            os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        from submitit.core.job_environment import JobEnvironment

        sig = JobEnvironment._usr_sig()
        self.original = signal.getsignal(sig)
        if callable(self.original):
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        log.warning("got %s: checkpointing at the next step boundary, then requeueing",
                    signal.Signals(signum).name)  # fmt: skip
        self.pending = (signum, frame)

    def requested(self, d: dist.Dist) -> bool:
        """Whether any rank got the signal (every rank must stop at the same step); asked on the
        CPU, so the device's queue of steps is not drained for it."""
        if self.original is None:
            return False
        return dist.any_rank(self.pending is not None, d)

    def hand_over(self) -> None:
        """submitit's own handler: requeues the job (rank 0) and exits."""
        if self.pending is not None and callable(self.original):
            self.original(*self.pending)


@dataclass
class Setup:
    """What every rank knows before the first step."""

    run: RunConfig
    d: dist.Dist
    device: torch.device
    data: Any
    micro: int  # sequences per forward pass on one rank
    accum: int  # forward passes per optimizer step on one rank
    preempt: Preemption | None = None
    mode: str = "none"  # how the model spans the ranks (harness.parallel)

    @property
    def autocast(self):
        if self.device.type == "cuda":
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext


def batch_split(t: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) that give the global batch `t.batch_size` on `world` ranks."""
    micro = t.micro_batch_size or t.batch_size // world
    if micro < 1 or t.batch_size % (world * micro):
        raise ValueError(
            f"train.batch_size={t.batch_size} (the global batch) is not a multiple of {world} rank(s) x "
            f"train.micro_batch_size={micro}; choose a micro batch that divides batch_size / {world}"
        )
    return micro, t.batch_size // (world * micro)


def on_main(d: dist.Dist, fn):
    """fn() on rank 0, its result on every rank; an exception there is raised on every rank."""
    if d.world == 1:
        return fn()
    out = None
    if d.main:
        try:
            out = ("ok", fn())
        except BaseException as e:  # the others must not wait forever for a result that never comes
            dist.broadcast(("err", f"{type(e).__name__}: {e}"), d)
            raise
    tag, value = dist.broadcast(out, d)
    if tag == "err":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def restore(s: Setup, run_dir: Path):
    """(model, optimizer, checkpoint state or None) from the newest checkpoint that loads, or from
    scratch. Rank 0 picks the checkpoint: one that fails to load stops the run, naming it and the
    remedy, unless train.resume=skip-broken, which sets it aside and tries the one before."""
    run = s.run

    def fresh():
        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        # FSDP shards a whole model from the CPU onto the device (harness.parallel)
        model = build_model(run.model).to("cpu" if s.mode == "fsdp" else s.device)
        if s.d.rank:
            torch.manual_seed(parallel.rank_seed(run.train.seed, s.d.rank))
        return model, make_optimizer(model, run.optim)

    def pick() -> str | None:
        """On rank 0: loads the newest checkpoint that loads into `picked`; returns its path."""
        nonlocal model, opt
        ckpts = checkpoints(run_dir)
        while ckpts:
            ckpt = ckpts.pop()
            try:
                picked["st"] = load_checkpoint(ckpt, model, opt)
                return str(ckpt)
            except CheckpointError as e:
                before = (
                    f"the previous checkpoint {ckpts[-1].name}"
                    if ckpts
                    else "scratch (no earlier checkpoint)"
                )
                if run.train.resume != "skip-broken":
                    raise CheckpointError(
                        f"{e}. Remove it to resume from {before}, or relaunch with train.resume=skip-broken, "
                        "which moves it to ckpt/broken_* and does that."
                    ) from e
                log.warning("%s; set aside as %s, resuming from %s", e, set_aside(ckpt), before)
                model, opt = fresh()  # a failed load may have changed some weights already
        return None

    model, opt = fresh()
    picked: dict[str, Any] = {}
    ckpt = on_main(s.d, pick)  # a checkpoint rank 0 cannot load stops every rank
    if s.d.main:
        return model, opt, picked.get("st")
    return model, opt, load_checkpoint(Path(ckpt), model, opt, s.d.rank) if ckpt else None


def train(run: RunConfig) -> dict[str, Any]:
    """Trains one run to its token budget (resuming if possible) and returns its summary.

    At any world size, rank 0 alone reads and writes the run directory, and only while it owns it
    (`harness.owner`). Another live owner makes this call fail, skip or wait (train.if_busy);
    skipping returns {"status": "busy", ...}."""
    d, run_dir = dist.from_env(), run.run_dir
    prev = read_summary(run_dir) if d.world == 1 else None  # before anything that could refuse
    if is_final(prev):
        _log_final(run_dir, prev, "already")
        return prev
    micro, accum = batch_split(run.train, d.world)
    mode = parallel.choose(run.train.parallel, d.world)
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    device = pick_device(run.train.device, d)
    if device.type == "cuda":  # fp32 matmuls outside autocast (the loss, fp32 scans) on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = run.train.tf32
    dist.init(d, device)
    dist.raise_on_sigterm(d)
    if not d.main:  # one voice for progress; every rank still speaks up about trouble
        logging.getLogger("harness").setLevel(logging.WARNING)
    if d.world > 1:
        prev = on_main(d, lambda: read_summary(run_dir))
        if is_final(prev):
            _log_final(run_dir, prev, "already")
            return prev
    # before anything is written: a bad corpus leaves no run directory; rank 0 tokenizes, the
    # others then find the cache
    prepared = {}
    on_main(d, lambda: prepared.update(data=prepare(run.data)))
    data = prepared["data"] if d.main else prepare(run.data)
    check_windows(data, run.model.seq_len)
    if data.vocab_size != run.model.vocab_size:
        raise ValueError(
            f"tokenizer vocab size is {data.vocab_size} but model.vocab_size={run.model.vocab_size}; "
            f"add +model.vocab_size={data.vocab_size}"
        )
    lock = RunLock(run_dir, stale_s=run.train.owner_stale_s) if d.main else None
    if not on_main(d, lambda: lock.acquire(run.train.if_busy)):
        owner = read_owner(run_dir)
        return {"status": "busy", "run": run.run_name, "reason": owner.describe() if owner else ""}
    setup = Setup(run, d, device, data, micro, accum, Preemption(), mode)
    try:
        summary = _train_owned(setup, lock)
    finally:
        if lock is not None:
            lock.release()
    if summary.get("preempted_at"):  # after the release, so the requeued job finds the run free
        setup.preempt.hand_over()
    return summary


def _log_final(run_dir: Path, summary: dict[str, Any], when: str) -> None:
    if summary["status"] == "completed":
        val = summary.get("final_val_loss") or math.nan
        log.info("%s %s completed (val loss %.4g); skipping", run_dir, when, val)
    else:
        log.warning("%s %s %s; skipping (delete the run directory to train it again)", run_dir, when,
                    summary["reason"])  # fmt: skip


def _write_config(run: RunConfig) -> None:
    cfg_path = run.run_dir / "config.yaml"
    stored = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    if not isinstance(stored, dict):
        stored = {"config.yaml": f"not a mapping ({type(stored).__name__})"}
    diff = config_differences(stored, run) if cfg_path.exists() else []
    if diff:
        raise ValueError(
            f"{run.run_dir} holds a run with a different config ({'; '.join(diff)[:500]}); "
            "use another sweep or run_name"
        )
    atomic_write_text(cfg_path, yaml.safe_dump(run_config_dict(run), sort_keys=True))


def _start_summary(s: Setup, counts) -> dict[str, Any]:
    run = s.run
    tokens_per_step = run.train.batch_size * run.model.seq_len
    return {
        "status": "running",
        "reason": "",
        "sweep": run.sweep,
        "run": run.run_name,
        "family": run.model.family,
        "arch": run.model.name,
        "causal": getattr(run.model, "causal", True),
        "comparable": getattr(run.model, "causal", True),
        "seq_len": run.model.seq_len,
        "batch_size": run.train.batch_size,
        "lr": run.optim.lr,
        "steps": run.steps,
        "tokens": run.steps * tokens_per_step,
        **counts.as_dict(),
        "flops_train": counts.train * run.steps * tokens_per_step,
        "flops_budget": run.train.flops_budget or None,
        "data_decode": run.data.decode,
        "data_replaced_bytes": getattr(s.data, "replaced_bytes", 0),
        "world_size": s.d.world,
        "parallel": s.mode,
        "micro_batch_size": s.micro,
        "grad_accum_steps": s.accum,
        "hardware": hardware.describe(s.device),
    }


class Writer:
    """Rank 0's hands on the run directory. Every write is checked against ownership: a process
    that lost the run (`harness.owner`) raises `OwnershipLost` instead of writing."""

    def __init__(self, run_dir: Path, lock: RunLock, summary: dict[str, Any]):
        self.run_dir, self.lock, self.summary = run_dir, lock, summary
        self.metrics_f = None
        self.metrics_ino = None  # the metrics.jsonl this process appends to

    def guard(self) -> None:
        """Before a checkpoint or a summary: this process still owns the run, and metrics.jsonl is
        still its file (a new owner rewrites it as a new file before appending)."""
        self.lock.verify()
        try:
            ino = (self.run_dir / "metrics.jsonl").stat().st_ino if self.metrics_ino is not None else None
        except FileNotFoundError:
            ino = -1
        if ino != self.metrics_ino:
            self.lock.lost = "metrics.jsonl was replaced by another process"
            self.lock.check()

    def write_summary(self) -> None:
        self.guard()
        atomic_write_json(self.run_dir / "summary.json", self.summary)

    def open_metrics(self, step: int) -> None:
        """Keeps metrics.jsonl up to the resumed step, then appends."""
        lines = read_metrics(self.run_dir, step)
        self.lock.verify()  # restore may have taken long: another owner may have rewritten it since
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
        self.metrics_f = open(self.run_dir / "metrics.jsonl", "a")
        self.metrics_ino = os.fstat(self.metrics_f.fileno()).st_ino

    def metrics(self, rec: dict[str, Any]) -> None:
        self.lock.check()
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()

    def checkpoint(self, weights, state: dict[str, Any], aliases: dict[str, str], keep: int) -> None:
        os.fsync(self.metrics_f.fileno())  # the lines up to a checkpoint outlive a lost node with it
        self.guard()
        save_checkpoint(self.run_dir, weights, state, aliases, keep=keep, before_publish=self.guard)

    def check(self) -> None:
        self.lock.check()

    def close(self) -> None:
        if self.metrics_f is not None:
            self.metrics_f.close()


class Silent(Writer):
    """Ranks other than 0 write nothing."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary

    def write_summary(self) -> None: ...
    def open_metrics(self, step: int) -> None: ...
    def metrics(self, rec: dict[str, Any]) -> None: ...
    def checkpoint(self, weights, state, aliases, keep) -> None: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


def _train_owned(s: Setup, lock: RunLock | None) -> dict[str, Any]:
    run, d = s.run, s.d
    prev = on_main(d, lambda: read_summary(run.run_dir))  # again: it may have ended while waiting
    if is_final(prev):
        _log_final(run.run_dir, prev, "while this process waited:")
        return prev
    on_main(d, lambda: _write_config(run))
    counts = flops.count(run.model, run.model.seq_len)
    summary = _start_summary(s, counts)
    w = Writer(run.run_dir, lock, summary) if d.main else Silent(summary)
    on_main(d, lambda: rank_failures(run.run_dir, clear=True))  # notes of an earlier attempt
    w.write_summary()
    step = 0
    try:  # from here on, any failure is recorded in summary.json rather than leaving it "running"
        model, opt, st = restore(s, run.run_dir)
        if st is not None:
            step = st["step"]
            log.info("resuming %s from step %d", run.run_dir, step)
        w.open_metrics(step)
        _loop(s, w, model, opt, st, counts)
    except OwnershipLost:
        raise
    except BaseException as e:
        failed_at = time.time()
        if d.world > 1:
            dist.ignore_sigterm()  # torchrun's SIGTERM must not cut the recording of this failure
        if not d.main:
            note_rank_failure(run.run_dir, d.rank, f"{type(e).__name__}: {e}")
            raise
        _fail(summary, e, summary.get("steps_done", step))
        if d.world > 1:
            notes = []
            for _ in range(20):  # a failing rank writes its note before it exits: it is there or near
                notes = rank_failures(run.run_dir, before=failed_at, clear=True)
                if notes:
                    break
                time.sleep(0.05)
            if notes:
                r, why = notes[0]
                summary["reason"] = f"rank {r} failed: {why}; rank 0 then stopped: {summary['reason']}"[:800]
        try:
            w.write_summary()
        except OwnershipLost:
            log.error("%s: not recording the failure: %s", run.run_dir, lock.lost)
        raise
    finally:
        w.close()
    w.write_summary()
    return summary


def _fail(summary: dict[str, Any], e: BaseException, step: int) -> None:
    summary.update(status="failed", reason=f"{type(e).__name__}: {e}"[:800], steps_done=step)


# ---------------------------------------------------------------- the loop


def _step(s: Setup, net, x: torch.Tensor, y: torch.Tensor):
    """Forward and backward over this rank's share of one global batch, in `s.accum` micro
    batches; returns (this rank's mean train loss, still on the device; the last forward's
    output). Gradients are averaged across ranks (DDP or FSDP) on the last micro batch only."""
    loss_sum = None
    for i in range(s.accum):
        xi = x[i * s.micro : (i + 1) * s.micro].to(s.device, non_blocking=True)
        yi = y[i * s.micro : (i + 1) * s.micro].to(s.device, non_blocking=True)
        with parallel.grad_sync(net, i == s.accum - 1):
            with s.autocast():
                out = net(xi)
                loss = lm_loss(out.logits, yi)
                total = loss + sum(out.aux_losses.values()) if out.aux_losses else loss
            (total / s.accum if s.accum > 1 else total).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum / s.accum if s.accum > 1 else loss_sum, out


@dataclass
class Progress:
    """The loop's running numbers; the ones a resume needs ride in the checkpoint."""

    step: int = 0
    wall_prev: float = 0.0
    loss_acc: float = 0.0
    loss_n: int = 0
    last_val: float = math.nan
    last_train: float = math.nan
    steady_tokens: int = 0  # tokens trained in steady state (harness.hardware: MFU)
    steady_s: float = 0.0  # and the seconds they took

    @classmethod
    def resumed(cls, st: dict[str, Any] | None) -> Progress:
        if not st:
            return cls()
        # a run stopped right after its final checkpoint resumes at its last step with nothing to do
        return cls(st["step"], st["wall_s"], st["loss_acc"], st["loss_n"], st.get("last_val", math.nan),
                   st.get("last_train", math.nan), st.get("steady_tokens", 0), st.get("steady_s", 0.0))  # fmt: skip

    def state(self, wall: float) -> dict[str, Any]:
        return {"wall_s": wall, "loss_acc": self.loss_acc, "loss_n": self.loss_n, "last_val": self.last_val,
                "last_train": self.last_train, "steady_tokens": self.steady_tokens,
                "steady_s": self.steady_s}  # fmt: skip


class Meter:
    """Training throughput between reads of the device (the loop's sync points), with the time
    spent evaluating and checkpointing left out. The first window after a start or resume holds
    the compile and allocator warm-up, so only later windows count as steady state."""

    def __init__(self, s: Setup, counts, p: Progress):
        self.tokens_per_step = s.run.train.batch_size * s.run.model.seq_len
        self.flops_per_token = counts.train
        peak = s.run.train.peak_tflops or hardware.peak_tflops(hardware.device_name(s.device),
                                                              hardware.compute_dtype(s.device))  # fmt: skip
        self.peak = peak * 1e12 * s.d.world if peak else None
        if self.peak is None and s.device.type == "cuda" and s.d.main:
            log.warning("no peak FLOP/s known for %s: MFU is not reported; pass train.peak_tflops",
                        hardware.device_name(s.device))  # fmt: skip
        self.device, self.p = s.device, p
        self.mark, self.mark_step, self.warm = time.perf_counter(), p.step, False

    def window(self) -> dict[str, Any]:
        """Closes the window at the current step (called right after a read of the device)."""
        now = time.perf_counter()
        tokens, secs = (self.p.step - self.mark_step) * self.tokens_per_step, now - self.mark
        flops = tokens * self.flops_per_token / max(secs, 1e-9)
        if self.warm:
            self.p.steady_tokens += tokens
            self.p.steady_s += secs
        self.warm = True
        return {"train_flops_per_s": flops, "mfu": flops / self.peak if self.peak else None,
                "peak_mem_gb": round(hardware.peak_memory_gb(self.device), 3)}  # fmt: skip

    def restart(self) -> None:
        """After evaluation or a checkpoint: the next window starts now."""
        self.mark, self.mark_step = time.perf_counter(), self.p.step

    def summary(self) -> dict[str, Any]:
        p = self.p
        if not p.steady_s:
            return {"peak_mem_gb": round(hardware.peak_memory_gb(self.device), 3)}
        flops = p.steady_tokens * self.flops_per_token / p.steady_s
        return {"train_flops_per_s": flops, "mfu": flops / self.peak if self.peak else None,
                "peak_mem_gb": round(hardware.peak_memory_gb(self.device), 3)}  # fmt: skip


def _update(s: Setup, net, model, opt, batch, lr: float) -> tuple[torch.Tensor, Any]:
    """One optimizer update on the global batch: (this rank's train loss on the device, last output)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss, out = _step(s, net, *batch)
    if s.run.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.run.optim.grad_clip)
    opt.step()
    after_step = getattr(model, "after_optimizer_step", None)
    if after_step is not None:  # e.g. the MoE balance bias, moved by the global batch's load
        after_step()
    return loss, out


def _compile(s: Setup, model) -> None:
    """train.compile: each block compiled in place (its parameter names unchanged), as torchtitan
    does, so identical blocks share one compiled graph."""
    want = s.run.train.compile
    if want == "false" or (want == "auto" and s.device.type != "cuda"):
        return
    fam = get_family(s.run.model.family)
    if fam.no_compile:
        if s.d.main:
            log.warning("train.compile: the %s family runs eagerly: %s", fam.name, fam.no_compile)
        return
    for block in model.blocks:
        block.compile()


def _loop(s: Setup, w: Writer, model, opt, st, counts) -> None:
    """The step loop; updates `w.summary` in place (steps_done, status, final numbers).

    The device is read only at sync points (log, eval and checkpoint steps, the last step, a
    stop): the train losses in between wait on the device, and the divergence rules go over them
    there, step by step, so a queued step never waits for the host."""
    run, summary = s.run, w.summary
    steps = run.steps
    p, div = Progress.resumed(st), Divergence(run, st)
    aliases = parallel.tied_aliases(model)  # before FSDP replaces the parameters
    _compile(s, model)
    net, opt = parallel.wrap(s.mode, model, opt, s.device, lambda m: make_optimizer(m, run.optim),
                             run.train.fsdp_param_dtype)  # fmt: skip
    lo = s.d.rank * s.micro * s.accum
    loader = WindowLoader(s.data.train, run.model.seq_len, run.train.batch_size, run.train.seed)
    batches = Prefetcher(loader, p.step, slice(lo, lo + s.micro * s.accum), s.device, run.train.prefetch)
    t0, start_step, meter, pending = time.perf_counter(), p.step, Meter(s, counts, p), []
    desc = f"{run.model.name} {run.sweep}/{run.run_name}"[:48]
    bar = tqdm(total=steps, initial=p.step, disable=not (run.train.progress and s.d.main), unit="step",
               dynamic_ncols=True, desc=desc)  # fmt: skip
    try:
        while p.step < steps:
            w.check()
            lr = lr_at(p.step, steps, run.optim)
            loss, out = _update(s, net, model, opt, batches.next(), lr)
            p.step += 1
            pending.append(loss)
            bar.update(1)
            stop = _stop_requested(s, p, start_step)  # "", "preempted" or "asked"
            ckpt = (
                p.step == steps
                or bool(stop)
                or bool(run.train.ckpt_every and p.step % run.train.ckpt_every == 0)
            )
            if not (ckpt or _log_due(run, p.step)):
                continue
            diverged = _read(s, w, model, p, div, meter, pending, out, counts, lr, t0, start_step)
            if diverged:
                summary.update(status="failed", reason=diverged)
                log.error("%s: %s", run.run_dir, diverged)
                break
            wall = p.wall_prev + time.perf_counter() - t0
            if ckpt:
                _checkpoint(s, w, (model, opt, aliases), p, div, wall)
            meter.restart()
            if stop and p.step < steps:
                _stop(w, stop, p, wall, start_step)
                return
    finally:
        batches.close()
        bar.close()
        summary["steps_done"] = p.step
    # finish
    wall = p.wall_prev + time.perf_counter() - t0
    summary.update(wall_s=round(wall, 3), steps_done=p.step, **meter.summary(),
                   tokens_per_s=round(p.step * run.train.batch_size * run.model.seq_len / max(wall, 1e-9), 1))  # fmt: skip
    if summary["status"] == "running":
        summary.update(status="completed", final_val_loss=p.last_val, final_train_loss=p.last_train)


def _log_due(run: RunConfig, step: int) -> bool:
    return step % run.train.log_every == 0 or step % run.train.eval_every == 0 or step == run.steps


def _stop_requested(s: Setup, p: Progress, start_step: int) -> str:
    """ "preempted" on Slurm's warning signal (to any rank), "asked" after train.stop_after_steps
    (which behaves like a preemption), else ""."""
    if s.preempt is not None and s.preempt.requested(s.d):
        return "preempted"
    after = s.run.train.stop_after_steps
    return "asked" if after and p.step - start_step >= after else ""


def _checkpoint(s: Setup, w: Writer, trained, p: Progress, div: Divergence, wall: float) -> None:
    """`trained`: model, optimizer, tied aliases. Every rank takes part: FSDP gathers the shards,
    rank 0 gathers the RNG states."""
    model, opt, aliases = trained
    weights, optim = parallel.full_state(s.mode, model, opt, aliases, s.d)
    rng = parallel.rng_states(s.d)
    state = {"optimizer": optim, "step": p.step, **rng, **p.state(wall), **div.state()}
    w.checkpoint(weights, state, aliases, s.run.train.keep_checkpoints)


def _stop(w: Writer, why: str, p: Progress, wall: float, start_step: int) -> None:
    """Ends this attempt after its checkpoint, resumable."""
    if why == "preempted":
        w.summary["preempted_at"] = p.step
        log.warning("preempted: checkpointed at step %d; requeueing", p.step)
    else:
        log.info("stopping after %d steps as asked (train.stop_after_steps); resumable", p.step - start_step)
    w.summary.update(wall_s=wall, steps_done=p.step)


def _read(s: Setup, w: Writer, model, p: Progress, div: Divergence, meter: Meter, pending: list, out, counts,
          lr: float, t0: float, start_step: int) -> str:  # fmt: skip
    """A sync point: reads the losses waiting on the device (one transfer, averaged over ranks),
    puts them through the divergence rules in step order, and at log and eval steps writes a
    metrics record. Returns why the run diverged, or ""."""
    first = p.step - len(pending) + 1
    losses = dist.mean(torch.stack(pending).float(), s.d).tolist()
    pending.clear()
    window = meter.window()
    for k, v in enumerate(losses):
        diverged = div.train_loss(v, first + k)
        if diverged:
            return diverged
        p.loss_acc, p.loss_n = p.loss_acc + v, p.loss_n + 1
    if not _log_due(s.run, p.step):
        return ""
    wall = p.wall_prev + time.perf_counter() - t0
    tps = (p.step - start_step) * meter.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
    return _log_eval(s, w, model, p, div, out, counts, lr, wall, tps, window)


def _log_eval(s: Setup, w: Writer, model, p: Progress, div: Divergence, out, counts, lr, wall, tps,
              window: dict[str, Any]) -> str:  # fmt: skip
    """Writes the metrics record of a log or eval step; returns why the run diverged, or ""."""
    run = s.run
    steps, tokens_per_step = run.steps, run.train.batch_size * run.model.seq_len
    is_eval = p.step % run.train.eval_every == 0 or p.step == steps
    rec: dict[str, Any] = {
        "step": p.step,
        "tokens": p.step * tokens_per_step,
        "flops_train": counts.train * p.step * tokens_per_step,
        "train_loss": p.loss_acc / p.loss_n,
        "val_loss": None,
        "lr": lr,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tps, 1),
        **window,
    }
    # the last micro batch's values, averaged over ranks (every rank reaches here at the same steps)
    rec.update({f"aux/{k}": float(dist.mean(v.detach(), s.d)) for k, v in out.aux_losses.items()})
    rec.update(
        {f"metric/{k}": dist.mean(v.detach().float(), s.d).cpu().tolist() for k, v in out.metrics.items()}
    )
    if is_eval:
        p.last_val = rec["val_loss"] = evaluate(model, s)
        eta_s = (steps - p.step) * tokens_per_step / max(tps, 1e-9)
        log.info("step %d/%d train %.4f val %.4f lr %.2e %.0f tok/s ETA %.0fs",
                 *(p.step, steps, rec["train_loss"], p.last_val, lr, tps, eta_s))  # fmt: skip
    w.metrics(rec)
    p.last_train = rec["train_loss"]
    p.loss_acc, p.loss_n = 0.0, 0
    return div.val_loss(p.last_val, p.step) if is_eval else ""


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from harness.config import CONF_DIR, register_configs, to_run_config

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _main(cfg) -> None:
        run = to_run_config(cfg, list(HydraConfig.get().overrides.task))
        dist.export_from_submitit()
        summary = train(run)
        if summary["status"] == "failed":  # diverged: a result to keep, not a crash
            log.error("run %s failed: %s", run.run_dir, summary["reason"])
        elif summary["status"] == "busy":
            log.warning("run %s skipped: owned by %s", run.run_dir, summary["reason"])

    _main()


if __name__ == "__main__":
    main()
