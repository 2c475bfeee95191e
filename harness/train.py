"""`harness-train`: the Hydra entry point and the training loop.

A run owns `results/<sweep>/<run>/`: `config.yaml` (resolved), `metrics.jsonl` (one JSON line per
log/eval step), `summary.json` (status and final numbers) and `ckpt/step_<n>/` (safetensors
weights + optimizer, step and RNG state). Starting a run whose directory holds a checkpoint resumes
it; a completed run is skipped. Everything is written atomically.
"""

from __future__ import annotations

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
from harness.rundir import latest_checkpoint, load_checkpoint, read_metrics, read_summary, save_checkpoint

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


# ---------------------------------------------------------------- the loop


def _mark_failed(run_dir: Path, summary: dict[str, Any], e: BaseException, step: int) -> None:
    summary.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500], steps_done=step)
    atomic_write_json(run_dir / "summary.json", summary)


def train(run: RunConfig) -> dict[str, Any]:
    """Trains one run to its token budget (resuming if possible) and returns its summary."""
    run_dir = run.run_dir
    prev = read_summary(run_dir)
    if prev and prev.get("status") == "completed":
        log.info(
            "%s already completed (val loss %.4f); skipping",
            run_dir,
            prev.get("final_val_loss", float("nan")),
        )
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
    cfg_dict = run_config_dict(run)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists() and _identity(yaml.safe_load(cfg_path.read_text()) or {}) != _identity(cfg_dict):
        raise ValueError(f"{run_dir} holds a run with a different config; use another sweep or run_name")
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
        "hardware": hardware(device),
    }
    atomic_write_json(run_dir / "summary.json", summary)

    step, wall_prev, loss_acc, loss_n = 0, 0.0, 0.0, 0
    try:  # from here on, any failure is recorded in summary.json rather than leaving it "running"
        torch.manual_seed(run.train.seed)
        model = build_model(run.model).to(device)
        opt = make_optimizer(model, run.optim)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            st = load_checkpoint(ckpt, model, opt)
            step, wall_prev, loss_acc, loss_n = st["step"], st["wall_s"], st["loss_acc"], st["loss_n"]
            log.info("resuming %s from step %d", run_dir, step)
        lines = read_metrics(run_dir, step)
        atomic_write_text(run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
        metrics_f = open(run_dir / "metrics.jsonl", "a")
    except BaseException as e:
        _mark_failed(run_dir, summary, e, step)
        raise
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
    last_val = last_train = math.nan
    try:
        while step < steps:
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
            if not math.isfinite(loss_v):
                summary.update(status="failed", reason=f"diverged: non-finite loss at step {step}")
                log.error("%s: %s", run_dir, summary["reason"])
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
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                last_train = rec["train_loss"]
                loss_acc, loss_n = 0.0, 0
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{tps:.0f}")
            stop_now = run.train.stop_after_steps and step - start_step >= run.train.stop_after_steps
            if step == steps or stop_now or (run.train.ckpt_every and step % run.train.ckpt_every == 0):
                save_checkpoint(
                    run_dir,
                    model,
                    opt,
                    step,
                    {"wall_s": wall, "loss_acc": loss_acc, "loss_n": loss_n},
                )
            if stop_now and step < steps:
                log.info(
                    "stopping after %d steps as asked (train.stop_after_steps); resumable",
                    step - start_step,
                )
                summary.update(wall_s=wall, steps_done=step)
                atomic_write_json(run_dir / "summary.json", summary)
                return summary
    except BaseException as e:
        _mark_failed(run_dir, summary, e, step)
        raise
    finally:
        bar.close()
        metrics_f.close()

    wall = wall_prev + time.perf_counter() - t0
    summary.update(
        wall_s=round(wall, 3),
        steps_done=step,
        tokens_per_s=round(step * tokens_per_step / max(wall, 1e-9), 1),
    )
    if summary["status"] == "running":
        summary.update(status="completed", final_val_loss=last_val, final_train_loss=last_train)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


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

    _main()


if __name__ == "__main__":
    main()
