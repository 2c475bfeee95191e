"""Forward+backward throughput of MoE dispatch: the fast paths (`expert_mlp`, layouts "grouped",
"padded" and "grouped_mm") against the per-expert loop reference, timed in the same process on
the same routing.

    .venv/bin/python benchmarks/bench_dispatch.py      # 4096 tokens, d 256, d_ff 512, top-2, E = 8, 64
    .venv/bin/python benchmarks/bench_dispatch.py --dtype bfloat16   # only bf16 autocast
    .venv/bin/python benchmarks/bench_dispatch.py --device cuda

"auto" runs grouped on CPU and, on CUDA, grouped_mm where its kernel needs no host sync (bf16
autocast on SM 9.0 or 10.x), else padded (`dispatch.default_layout`). All paths get the same top-2
routing of random router logits (dropless). Parameters and inputs are
fp32. Each dtype is one table: fp32, then bf16 with every path under torch.autocast, so all of
them do bf16 matmuls and the ratios compare like with like. The paths take turns within each
repetition and the median step is reported, so load from other processes on a shared machine
falls on all paths alike. Reports tokens/s and the fast/loop ratios; the router itself is shared
and not timed.

The "floor" column times only the expert matmuls of the same routing (no dispatch, no
activations, no autograd); under autocast it also casts the fp32 weights to bf16 and the weight
gradients back, into preallocated buffers, as any path must once per step. floor/loop is the
most any dispatch built on these matmuls could gain over the loop here.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from harness.ops import dispatch

PATHS = {
    "grouped": lambda *a: dispatch.expert_mlp(*a, layout="grouped"),
    "padded": lambda *a: dispatch.expert_mlp(*a, layout="padded"),
    "grouped_mm": lambda *a: dispatch.expert_mlp(*a, layout="grouped_mm"),
    "loop": dispatch.expert_mlp_ref,
}
FAST = [name for name in PATHS if name != "loop"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(tokens: int, d_model: int, d_ff: int, n_experts: int, top_k: int, reps: int, device, dtype):
    """Median seconds per forward+backward step of each path in PATHS."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=g).to(device).requires_grad_()
    w_up = (torch.randn(n_experts, d_model, 2 * d_ff, generator=g) * 0.02).to(device).requires_grad_()
    w_down = (torch.randn(n_experts, d_ff, d_model, generator=g) * 0.02).to(device).requires_grad_()
    logits = torch.randn(tokens, n_experts, generator=g).to(device).requires_grad_()
    r = dispatch.route(logits, "topk_softmax", top_k, 1)

    def step(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = fn(x, w_up, w_down, r["tok_A"], r["exp_A"], r["gate_A"])
        y.float().square().mean().backward(retain_graph=True)
        _sync(device)
        x.grad = w_up.grad = w_down.grad = logits.grad = None
        return time.perf_counter() - t0

    # The floor: only the matmuls of this routing (per expert, forward 2 and backward 4, into
    # preallocated buffers, no autograd), with no routing, sorting, gathering, scattering or
    # activation; under autocast plus the weight casts every path needs. No dispatch that runs
    # these matmuls can be faster: floor/loop bounds the speed-up.
    counts = torch.bincount(r["exp_A"], minlength=n_experts).tolist()
    A, F2 = sum(counts), 2 * d_ff
    xs = torch.randn(A, d_model, generator=g).to(device, dtype)
    wu, wd = w_up.detach().to(dtype), w_down.detach().to(dtype)
    h, act, o = xs.new_empty(A, F2), xs.new_empty(A, d_ff), xs.new_empty(A, d_model)
    gw_up, gw_down = torch.empty_like(wu), torch.empty_like(wd)
    gw_up32, gw_down32 = torch.empty_like(w_up), torch.empty_like(w_down)
    gx = xs.new_empty(A, d_model)
    cast = dtype != w_up.dtype

    def floor() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if cast:
                wu.copy_(w_up)
                wd.copy_(w_down)
            s0 = 0
            for e, n in enumerate(counts):
                s1 = s0 + n
                if n:
                    x_e, h_e, a_e, o_e = xs[s0:s1], h[s0:s1], act[s0:s1], o[s0:s1]
                    torch.mm(x_e, wu[e], out=h_e)  # forward
                    torch.mm(a_e, wd[e], out=o_e)
                    torch.mm(o_e, wd[e].t(), out=a_e)  # backward: d act, d w_down, d h, d x
                    torch.mm(a_e.t(), o_e, out=gw_down[e])
                    torch.mm(x_e.t(), h_e, out=gw_up[e])
                    torch.mm(h_e, wu[e].t(), out=gx[s0:s1])
                s0 = s1
            if cast:
                gw_up32.copy_(gw_up)
                gw_down32.copy_(gw_down)
        _sync(device)
        return time.perf_counter() - t0

    paths = {}
    for name, fn in PATHS.items():
        try:
            step(fn)  # warm-up
        except (RuntimeError, ValueError) as e:  # e.g. grouped_mm has no fp32 CUDA kernel
            print(f"  {name}: not run ({str(e).splitlines()[0]})")
            continue
        paths[name] = fn
    floor()
    times = {name: [] for name in [*paths, "floor"]}
    for _ in range(reps):
        for name, fn in paths.items():
            times[name].append(step(fn))
        times["floor"].append(floor())
    return {
        name: statistics.median(times[name]) if times.get(name) else math.nan for name in [*PATHS, "floor"]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="matmul dtypes (bfloat16: autocast), one table each",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    names = [*PATHS, "floor"]
    head = " ".join(f"{name + ' tok/s':>16}" for name in names)
    head += " " + " ".join(f"{name + '/loop':>15}" for name in [*FAST, "floor"])
    for dtype_name in args.dtype:
        print(
            f"device={device} threads={torch.get_num_threads()} dtype={dtype_name} tokens={args.tokens} "
            f"d_model={args.d_model} d_ff={args.d_ff} top_k={args.top_k} reps={args.reps} (median step)"
        )
        print(f"{'experts':>8} {head}")
        for E in args.experts:
            t = bench(
                args.tokens,
                args.d_model,
                args.d_ff,
                E,
                args.top_k,
                args.reps,
                device,
                getattr(torch, dtype_name),
            )
            rates = " ".join(f"{args.tokens / t[name]:>16.0f}" for name in names)
            ratios = " ".join(f"{t['loop'] / t[name]:>15.2f}" for name in [*FAST, "floor"])
            print(f"{E:>8} {rates} {ratios}")


if __name__ == "__main__":
    main()
