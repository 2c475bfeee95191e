"""Evaluating a run's checkpoint with EleutherAI's lm-evaluation-harness.

`load_run(run_dir)` rebuilds a trained model from `results/<sweep>/<run>/` (its `config.yaml` and
the latest `ckpt/step_<n>/model.safetensors`) with its tokenizer. `HarnessLM` wraps it as an
`lm_eval` model registered as "harness", so `lm_eval.simple_evaluate(model="harness",
model_args={"run_dir": ...})` works once this module is imported. `python -m harness.evaluate
RUN_DIR --tasks t1,t2` runs tasks offline and writes the results JSON under `RUN_DIR/eval/`.

lm-eval is the optional `eval` extra: this is the only module that imports it, and nothing else in
`harness` imports this module.

Our tokenizers have no BOS/EOS token, so a newline stands in as the "start of text" token that
conditions the first token of a text (rolling perplexity, empty contexts): documents in the
corpora are separated by newlines, so it is the most neutral prefix the model has seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model

from harness.data import ByteTokenizer, HFTokenizer, get_tokenizer
from harness.fileio import atomic_write_json
from harness.models import build_model, make_config
from harness.rundir import latest_checkpoint

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the one optional import of this module: name the extra
    raise ImportError("harness.evaluate needs lm-eval: pip install -e '.[eval]'") from e

log = logging.getLogger("harness.evaluate")

DEFAULT_MAX_GEN_TOKS = 256


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ByteTokenizer | HFTokenizer, dict[str, Any]]:
    """(model in eval mode with the latest checkpoint's weights, tokenizer, config.yaml as a dict)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml in it")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"corrupt run config {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"corrupt run config {cfg_path}: expected a mapping with a 'model' section")
    try:
        model_cfg = make_config(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"corrupt run config {cfg_path}: {e}") from e

    ckpt = latest_checkpoint(run_dir)
    weights = ckpt / "model.safetensors" if ckpt is not None else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint (expected ckpt/step_<n>/model.safetensors); "
            "train the run first (harness-train) or resume it"
        )

    tok_spec = (cfg.get("data") or {}).get("tokenizer", "byte")
    if tok_spec != "byte" and not Path(tok_spec).is_file():
        raise FileNotFoundError(f"tokenizer file of run {run_dir} not found: {tok_spec}")
    tokenizer = get_tokenizer(tok_spec)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok_spec!r} has vocab {tokenizer.vocab_size}, model.vocab_size is {model_cfg.vocab_size}"
        )

    model = build_model(model_cfg)
    load_model(model, str(weights))  # safetensors: tensors only, no pickle
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s (%s) from %s", model_cfg.name, model_cfg.family, weights)
    return model, tokenizer, cfg


@register_model("harness")
class HarnessLM(LM):
    """A trained `harness` run as an lm-eval model.

    Scoring left-truncates to the model's `seq_len` (it has no positions beyond it); generation is
    greedy and, with no KV cache, recomputes the last `seq_len` tokens at every step.
    """

    def __init__(
        self,
        run_dir: str | Path,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,  # passed by simple_evaluate; sizes are not searched here
    ) -> None:
        super().__init__()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, self.run_config = load_run(run_dir, dev)
        self.run_dir = Path(run_dir)
        self._device = dev
        self.seq_len: int = self.model.cfg.seq_len
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 16
        self.max_gen_toks = int(max_gen_toks)
        prefix = self.tokenizer.encode("\n")
        self.prefix_token = int(prefix[-1]) if len(prefix) else 0
        if not getattr(self.model.cfg, "causal", True):
            log.warning(
                "model %r is not causal: it reads later tokens (and padding), so its scores are not "
                "language-model likelihoods",
                self.model.cfg.name,
            )

    @property
    def device(self) -> torch.device:
        return self._device

    def get_model_info(self) -> dict[str, Any]:
        ckpt = latest_checkpoint(self.run_dir)
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": ckpt.name if ckpt else None,
            "family": self.model.cfg.family,
            "arch": self.model.cfg.name,
            "seq_len": self.seq_len,
        }

    # ------------------------------------------------------------ tokens and scoring

    def tok_encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's HF model: trailing context spaces move to the continuation, and the
        # continuation's tokens are the tail of the joint encoding, so a BPE merge across the
        # boundary is scored as the model would see it.
        if not context:
            return [self.prefix_token], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def _forward(self, x_BT: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self._device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with torch.no_grad(), autocast:
            return self.model(x_BT.to(self._device)).logits.float()

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        per (context tokens, continuation tokens) pair; the context is left-truncated to fit."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        windows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            if len(cont) > self.seq_len:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens does not fit the model's seq_len={self.seq_len}"
                )
            inp = (ctx + cont)[-(self.seq_len + 1) :][:-1]
            windows.append((i, inp, cont))
        # Longest first, so a batch holds similar lengths and little padding. Padding sits at the
        # right, after every scored position, so a causal model never sees it.
        windows.sort(key=lambda w: -len(w[1]))
        for b in range(0, len(windows), self.batch_size):
            batch = windows[b : b + self.batch_size]
            T = len(batch[0][1])
            x_BT = torch.zeros(len(batch), T, dtype=torch.long)
            for r, (_, inp, _) in enumerate(batch):
                x_BT[r, : len(inp)] = torch.tensor(inp)
            logp_BTV = F.log_softmax(self._forward(x_BT), dim=-1).cpu()
            for r, (i, inp, cont) in enumerate(batch):
                # Targets are the input shifted by one: positions len(inp)-len(cont) .. len(inp)-1.
                logp_CV = logp_BTV[r, len(inp) - len(cont) : len(inp)]
                target_C = torch.tensor(cont)
                lp = logp_CV.gather(1, target_C[:, None]).sum().item()
                greedy = bool((logp_CV.argmax(-1) == target_C).all())
                out[i] = (lp, greedy)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------ the lm-eval interface

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score(pairs)
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # Disjoint windows of seq_len predicted tokens, each conditioned on the one token before it
        # (lm-eval's context_len=1, as its HF model does), so every token is scored exactly once.
        spans, pairs = [], []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token,
                    max_seq_len=self.seq_len,
                    context_len=1,
                )
            ]
            spans.append((len(pairs), len(pairs) + len(windows)))
            pairs.extend(windows)
        scores = self._score(pairs)
        results = []
        for req, (a, b) in zip(requests, spans, strict=True):
            total = sum(lp for lp, _ in scores[a:b])
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0) > 0:
                log.warning("generate_until decodes greedily; ignoring sampling options %s", gen_kwargs)
            text = self._greedy(context, until, max_toks)
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results

    def _greedy(self, context: str, until: list[str], max_toks: int) -> str:
        tokens = self.tok_encode(context) or [self.prefix_token]
        new: list[int] = []
        text = ""
        for _ in range(max_toks):
            x_1T = torch.tensor([(tokens + new)[-self.seq_len :]], dtype=torch.long)
            new.append(int(self._forward(x_1T)[0, -1].argmax()))
            text = self.tokenizer.decode(new)
            if any(s in text for s in until):
                break
        cut = min((text.find(s) for s in until if s in text), default=len(text))
        return text[:cut]


# ---------------------------------------------------------------- running tasks


def _default_out(run_dir: Path, tasks: list[str], limit: float | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(sorted(tasks)))[:100]
    return run_dir / "eval" / (f"{name}.limit{limit:g}.json" if limit is not None else f"{name}.json")


def evaluate_run(
    run_dir: str | Path,
    tasks: Iterable[str | dict[str, Any]],
    include_path: str | Path | None = None,
    limit: float | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100_000,
) -> tuple[dict[str, Any], Path]:
    """Runs lm-eval tasks on a run's latest checkpoint; writes and returns the results."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    run_dir = Path(run_dir)
    tasks = list(tasks)
    lm = HarnessLM(run_dir=run_dir, device=device, batch_size=batch_size)
    named = [t for t in tasks if isinstance(t, str)]
    # Indexing lm-eval's built-in tasks takes seconds; skip it when the local ones cover the request.
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(named) <= set(manager.all_subtasks) | set(manager.all_groups) | set(manager.all_tags):
            manager = TaskManager(include_path=str(include_path))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    out_path = (
        Path(out)
        if out
        else _default_out(run_dir, [t if isinstance(t, str) else "task" for t in tasks], limit)
    )
    atomic_write_json(out_path, results)
    return results, out_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m harness.evaluate",
        description="Evaluate a run's latest checkpoint with lm-eval (offline).",
    )
    p.add_argument("run_dir", help="results/<sweep>/<run>")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of task YAMLs (local data)")
    p.add_argument("--limit", type=float, help="at most this many examples per task (a fraction if < 1)")
    p.add_argument("--out", help="results JSON (default: RUN_DIR/eval/<tasks>.json)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--bootstrap-iters", type=int, default=100_000, help="0 skips standard errors")
    args = p.parse_args(argv)
    # Before `datasets` is imported (evaluate_run imports it): both libraries read these once.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    results, out = evaluate_run(
        args.run_dir,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        include_path=args.include_path,
        limit=limit,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        bootstrap_iters=args.bootstrap_iters,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
