"""Forward+backward throughput of MoE dispatch: the sorted batched-matmul fast path against the
per-expert loop reference, timed in the same process on the same routing.

    .venv/bin/python benchmarks/bench_dispatch.py            # 4096 tokens, d 256, d_ff 512, top-2, E = 8, 64
    .venv/bin/python benchmarks/bench_dispatch.py --device cuda

Both paths get the same top-2 routing of random router logits (dropless). Reports tokens/s and the
fast/loop ratio; the router itself is shared and not timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.ops import dispatch


def _time(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def bench(tokens: int, d_model: int, d_ff: int, n_experts: int, top_k: int, reps: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=g).to(device, dtype).requires_grad_()
    w_up = (torch.randn(n_experts, d_model, 2 * d_ff, generator=g) * 0.02).to(device, dtype).requires_grad_()
    w_down = (torch.randn(n_experts, d_ff, d_model, generator=g) * 0.02).to(device, dtype).requires_grad_()
    logits = torch.randn(tokens, n_experts, generator=g).to(device).requires_grad_()
    r = dispatch.route(logits, "topk_softmax", top_k, 1)

    def step(fn):
        def run():
            y = fn(x, w_up, w_down, r["tok_A"], r["exp_A"], r["gate_A"])
            y.float().square().mean().backward(retain_graph=True)
            x.grad = w_up.grad = w_down.grad = logits.grad = None

        return run

    t_fast = _time(step(dispatch.expert_mlp), reps, device)
    t_ref = _time(step(dispatch.expert_mlp_ref), reps, device)
    return tokens / t_fast, tokens / t_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} tokens={args.tokens} "
        f"d_model={args.d_model} d_ff={args.d_ff} top_k={args.top_k}"
    )
    print(f"{'experts':>8} {'fast tok/s':>12} {'loop tok/s':>12} {'fast/loop':>10}")
    for E in args.experts:
        fast, ref = bench(args.tokens, args.d_model, args.d_ff, E, args.top_k, args.reps, device, dtype)
        print(f"{E:>8} {fast:>12.0f} {ref:>12.0f} {fast / ref:>10.2f}")


if __name__ == "__main__":
    main()
