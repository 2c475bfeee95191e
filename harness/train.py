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
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from harness import flops
from harness.config import EXECUTION_ONLY, OptimConfig, RunConfig, run_config_dict
from harness.data import WindowLoader, check_windows, prepare, val_batches
from harness.fileio import atomic_write_json, atomic_write_text
from harness.models import build_model
from harness.owner import OwnershipLost, RunLock, read_owner
from harness.rundir import (
    CheckpointError,
    checkpoints,
    is_final,
    load_checkpoint,
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


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available here")
    return dev


def hardware(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    # Weight decay on matrices (incl. embeddings) only, not on norm gains and biases (nanoGPT's rule).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, data, run: RunConfig, device, autocast) -> float:
    model.eval()
    total = 0.0
    for x, y in val_batches(data, run.model.seq_len, run.train.batch_size, run.train.eval_batches):
        with autocast():
            total += lm_loss(model(x.to(device)).logits, y.to(device)).item()
    model.train()
    return total / run.train.eval_batches


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


def restore(run: RunConfig, run_dir: Path, device: torch.device):
    """(model, optimizer, checkpoint state or None): from the newest checkpoint that loads, or
    from scratch. A checkpoint that fails to load stops the run, naming it and the remedy, unless
    train.resume=skip-broken, which sets it aside and tries the one before."""

    def fresh():
        torch.manual_seed(run.train.seed)
        model = build_model(run.model).to(device)
        return model, make_optimizer(model, run.optim)

    model, opt = fresh()
    ckpts = checkpoints(run_dir)
    while ckpts:
        ckpt = ckpts.pop()
        try:
            return model, opt, load_checkpoint(ckpt, model, opt)
        except CheckpointError as e:
            before = (
                f"the previous checkpoint {ckpts[-1].name}" if ckpts else "scratch (no earlier checkpoint)"
            )
            if run.train.resume != "skip-broken":
                raise CheckpointError(
                    f"{e}. Remove it to resume from {before}, or relaunch with train.resume=skip-broken, "
                    "which moves it to ckpt/broken_* and does that."
                ) from e
            log.warning("%s; set aside as %s, resuming from %s", e, set_aside(ckpt), before)
            model, opt = fresh()  # a failed load may have changed some weights already
    return model, opt, None


def _log_final(run_dir: Path, summary: dict[str, Any], when: str) -> None:
    if summary["status"] == "completed":
        val = summary.get("final_val_loss") or math.nan
        log.info("%s %s completed (val loss %.4g); skipping", run_dir, when, val)
    else:
        log.warning(
            "%s %s %s; skipping (delete the run directory to train it again)",
            run_dir,
            when,
            summary["reason"],
        )


def _fail(summary: dict[str, Any], e: BaseException, step: int) -> None:
    summary.update(status="failed", reason=f"{type(e).__name__}: {e}"[:800], steps_done=step)


def train(run: RunConfig) -> dict[str, Any]:
    """Trains one run to its token budget (resuming if possible) and returns its summary.

    Only the process that owns the run directory (`harness.owner`) writes to it. Another live owner
    makes this call fail, skip or wait (train.if_busy); skipping returns {"status": "busy", ...}."""
    run_dir = run.run_dir
    prev = read_summary(run_dir)
    if is_final(prev):
        _log_final(run_dir, prev, "already")
        return prev

    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    device = pick_device(run.train.device)
    data = prepare(run.data)  # before anything is written: a bad corpus leaves no run directory
    check_windows(data, run.model.seq_len)
    if data.vocab_size != run.model.vocab_size:
        raise ValueError(
            f"tokenizer vocab size is {data.vocab_size} but model.vocab_size={run.model.vocab_size}; "
            f"add +model.vocab_size={data.vocab_size}"
        )
    lock = RunLock(run_dir, stale_s=run.train.owner_stale_s)
    if not lock.acquire(run.train.if_busy):
        owner = read_owner(run_dir)
        return {"status": "busy", "run": run.run_name, "reason": owner.describe() if owner else ""}
    try:
        return _train_owned(run, data, device, lock)
    finally:
        lock.release()


def _train_owned(run: RunConfig, data, device: torch.device, lock: RunLock) -> dict[str, Any]:
    run_dir = run.run_dir
    prev = read_summary(run_dir)  # again: it may have ended while this process waited
    if is_final(prev):
        _log_final(run_dir, prev, "while this process waited:")
        return prev
    cfg_dict = run_config_dict(run)
    cfg_path = run_dir / "config.yaml"
    stored = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    if not isinstance(stored, dict):
        stored = {"config.yaml": f"not a mapping ({type(stored).__name__})"}
    diff = config_differences(stored, run) if cfg_path.exists() else []
    if diff:
        raise ValueError(
            f"{run_dir} holds a run with a different config ({'; '.join(diff)[:500]}); use another sweep or run_name"
        )
    atomic_write_text(cfg_path, yaml.safe_dump(cfg_dict, sort_keys=True))

    counts = flops.count(run.model, run.model.seq_len)
    steps = run.steps
    tokens_per_step = run.train.batch_size * run.model.seq_len
    summary: dict[str, Any] = {
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
        "steps": steps,
        "tokens": steps * tokens_per_step,
        **counts.as_dict(),
        "flops_train": counts.train * steps * tokens_per_step,
        "flops_budget": run.train.flops_budget or None,
        "data_decode": run.data.decode,
        "data_replaced_bytes": getattr(data, "replaced_bytes", 0),
        "hardware": hardware(device),
    }

    metrics_ino = None  # the metrics.jsonl this process appends to

    def guard() -> None:
        """Before a checkpoint or a summary: this process still owns the run, and metrics.jsonl is
        still its file (a new owner rewrites it as a new file before appending)."""
        lock.verify()
        try:
            ino = (run_dir / "metrics.jsonl").stat().st_ino if metrics_ino is not None else None
        except FileNotFoundError:
            ino = -1
        if ino != metrics_ino:
            lock.lost = "metrics.jsonl was replaced by another process"
            lock.check()

    def write_summary() -> None:
        guard()
        atomic_write_json(run_dir / "summary.json", summary)

    write_summary()
    step, st, metrics_f = 0, None, None
    try:  # from here on, any failure is recorded in summary.json rather than leaving it "running"
        model, opt, st = restore(run, run_dir, device)
        if st is not None:
            step = st["step"]
            log.info("resuming %s from step %d", run_dir, step)
        lines = read_metrics(run_dir, step)
        lock.verify()  # restore may have taken long: another owner may have rewritten metrics.jsonl since
        atomic_write_text(run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
        metrics_f = open(run_dir / "metrics.jsonl", "a")
        metrics_ino = os.fstat(metrics_f.fileno()).st_ino
        _loop(run, data, device, lock, guard, summary, model, opt, st, metrics_f, counts)
    except OwnershipLost:
        raise
    except BaseException as e:
        _fail(summary, e, summary.get("steps_done", step))
        try:
            write_summary()
        except OwnershipLost:
            log.error("%s: not recording the failure: %s", run_dir, lock.lost)
        raise
    finally:
        if metrics_f is not None:
            metrics_f.close()
    write_summary()
    return summary


def _loop(run, data, device, lock, guard, summary, model, opt, st, metrics_f, counts) -> None:
    """The step loop; updates `summary` in place (steps_done, status, final numbers)."""
    run_dir, steps = run.run_dir, run.steps
    tokens_per_step = run.train.batch_size * run.model.seq_len
    step, wall_prev, loss_acc, loss_n = (
        (st["step"], st["wall_s"], st["loss_acc"], st["loss_n"]) if st else (0, 0.0, 0.0, 0)
    )
    div = Divergence(run, st)
    # a run stopped right after its final checkpoint resumes at its last step with nothing to do
    last_val, last_train = (
        (st.get("last_val", math.nan), st.get("last_train", math.nan)) if st else (math.nan,) * 2
    )
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )
    loader = WindowLoader(data.train, run.model.seq_len, run.train.batch_size, run.train.seed)

    t0, start_step = time.perf_counter(), step
    bar = tqdm(
        total=steps,
        initial=step,
        disable=not run.train.progress,
        unit="step",
        dynamic_ncols=True,
        desc=f"{run.model.name} {run.sweep}/{run.run_name}"[:48],
    )
    try:
        while step < steps:
            lock.check()
            lr = lr_at(step, steps, run.optim)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = loader.batch(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                out = model(x)
                loss = lm_loss(out.logits, y)
                total = loss + sum(out.aux_losses.values()) if out.aux_losses else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            if run.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
            opt.step()
            step += 1
            loss_v = loss.item()
            diverged = div.train_loss(loss_v, step)
            if diverged:
                summary.update(status="failed", reason=diverged)
                log.error("%s: %s", run_dir, diverged)
                break
            loss_acc, loss_n = loss_acc + loss_v, loss_n + 1
            wall = wall_prev + time.perf_counter() - t0
            tps = (step - start_step) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            is_eval = step % run.train.eval_every == 0 or step == steps
            if step % run.train.log_every == 0 or is_eval:
                rec: dict[str, Any] = {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "flops_train": counts.train * step * tokens_per_step,
                    "train_loss": loss_acc / loss_n,
                    "val_loss": None,
                    "lr": lr,
                    "wall_s": round(wall, 3),
                    "tokens_per_s": round(tps, 1),
                }
                rec.update({f"aux/{k}": float(v.detach()) for k, v in out.aux_losses.items()})
                rec.update({f"metric/{k}": v.detach().float().cpu().tolist() for k, v in out.metrics.items()})
                if is_eval:
                    last_val = rec["val_loss"] = evaluate(model, data, run, device, autocast)
                    eta_s = (steps - step) * tokens_per_step / max(tps, 1e-9)
                    log.info(
                        "step %d/%d train %.4f val %.4f lr %.2e %.0f tok/s ETA %.0fs",
                        *(step, steps, rec["train_loss"], last_val, lr, tps, eta_s),
                    )
                lock.check()
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                last_train = rec["train_loss"]
                loss_acc, loss_n = 0.0, 0
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{tps:.0f}")
                diverged = div.val_loss(last_val, step) if is_eval else ""
                if diverged:
                    summary.update(status="failed", reason=diverged)
                    log.error("%s: %s", run_dir, diverged)
                    break
            stop_now = run.train.stop_after_steps and step - start_step >= run.train.stop_after_steps
            if step == steps or stop_now or (run.train.ckpt_every and step % run.train.ckpt_every == 0):
                os.fsync(metrics_f.fileno())  # the lines up to a checkpoint outlive a lost node with it
                guard()
                save_checkpoint(
                    run_dir,
                    model,
                    opt,
                    step,
                    {
                        "wall_s": wall,
                        "loss_acc": loss_acc,
                        "loss_n": loss_n,
                        "last_val": last_val,
                        "last_train": last_train,
                        **div.state(),
                    },  # fmt: skip
                    keep=run.train.keep_checkpoints,
                    before_publish=guard,
                )
            if stop_now and step < steps:
                log.info(
                    "stopping after %d steps as asked (train.stop_after_steps); resumable",
                    step - start_step,
                )
                summary.update(wall_s=wall, steps_done=step)
                return
    finally:
        bar.close()
        summary["steps_done"] = step

    wall = wall_prev + time.perf_counter() - t0
    summary.update(
        wall_s=round(wall, 3),
        steps_done=step,
        tokens_per_s=round(step * tokens_per_step / max(wall, 1e-9), 1),
    )
    if summary["status"] == "running":
        summary.update(status="completed", final_val_loss=last_val, final_train_loss=last_train)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from harness.config import CONF_DIR, register_configs, to_run_config

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _main(cfg) -> None:
        run = to_run_config(cfg, list(HydraConfig.get().overrides.task))
        summary = train(run)
        if summary["status"] == "failed":  # diverged: a result to keep, not a crash
            log.error("run %s failed: %s", run.run_dir, summary["reason"])
        elif summary["status"] == "busy":
            log.warning("run %s skipped: owned by %s", run.run_dir, summary["reason"])

    _main()


if __name__ == "__main__":
    main()
