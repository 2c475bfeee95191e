"""Forward+backward time and peak memory of the Mamba scans: fast paths against the sequential
references, measured in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scan.py            # the issue's shape
    .venv/bin/python benchmarks/bench_scan.py --seq-len 128 --d-model 64   # the demo sweep's

Shapes follow the models: Mamba-1 scans d_inner = expand * d_model channels with d_state states
each; Mamba-2 scans d_inner / head_dim heads of head_dim channels sharing one B and C. Memory is
`torch.cuda.max_memory_allocated` above the inputs on CUDA; on CPU, which keeps no allocator
statistics, it is what autograd saves for the backward (the part that grows with batch x length).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness.ops import scan


def _saved_mib(fn: Callable, leaves: list[torch.Tensor], chunk: int) -> float:
    """Memory autograd holds between forward and backward (unique storages), the part of peak
    memory that grows with batch x length."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = fn(*leaves, chunk_size=chunk, final_state=False)
    y.sum().backward()
    return sum(seen.values()) / 2**20


def measure(fn: Callable, inputs: list[torch.Tensor], chunk: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds for forward+backward, and memory in MiB: the peak above the
    inputs on CUDA, the tensors saved for backward on CPU (no allocator statistics there)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    cuda = leaves[0].is_cuda

    def once():
        y, h = fn(*leaves, chunk_size=chunk, final_state=False)
        y.sum().backward()
        for t in leaves:
            t.grad = None

    once()  # warm-up: allocator, kernels, autotuning
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _saved_mib(fn, leaves, chunk)
    return min(times), peak


def selective_inputs(b: int, t: int, d: int, n: int, device: str) -> list[torch.Tensor]:
    return [
        torch.randn(b, t, d, device=device),
        F.softplus(torch.randn(b, t, d, device=device) - 2),
        -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=device))).repeat(d, 1),
        torch.randn(b, t, n, device=device),
        torch.randn(b, t, n, device=device),
        torch.ones(d, device=device),
    ]


def ssd_inputs(b: int, t: int, h: int, p: int, n: int, device: str) -> list[torch.Tensor]:
    return [
        torch.randn(b, t, h, p, device=device),
        F.softplus(torch.randn(b, t, h, device=device) - 2),
        -torch.empty(h, device=device).uniform_(1, 16),
        torch.randn(b, t, n, device=device),
        torch.randn(b, t, n, device=device),
        torch.ones(h, device=device),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    d_inner = args.expand * args.d_model
    b, t, n, dev = args.batch, args.seq_len, args.d_state, args.device
    cases = [
        ("mamba1", selective_inputs(b, t, d_inner, n, dev), scan.selective_scan, scan.selective_scan_ref),
        (
            "mamba2",
            ssd_inputs(b, t, d_inner // args.head_dim, args.head_dim, n, dev),
            scan.ssd_scan,
            scan.ssd_scan_ref,
        ),
    ]
    cuda_fns = {"mamba1": scan.selective_scan_cuda, "mamba2": scan.ssd_scan_cuda}
    native_fns = {"mamba1": scan.selective_scan_native, "mamba2": scan.ssd_scan_native}
    print(
        f"batch {b}, d_model {args.d_model} (d_inner {d_inner}), d_state {n}, length {t}, chunk {args.chunk}, "
        f"device {dev}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'scan':8} {'path':10} {'fwd+bwd ms':>11} {'mem MiB':>9} {'speed-up':>9}")
    for name, inputs, fast, ref in cases:
        rows = [("reference", ref, args.ref_repeats), ("torch", fast, args.repeats)]
        if not dev.startswith("cuda"):
            rows.append(("native", native_fns[name], args.repeats))
        if dev.startswith("cuda") and scan.pick_backend("auto", inputs[0]) == "cuda":
            rows.append(("cuda", cuda_fns[name], args.repeats))
        ref_s = None
        for path, fn, reps in rows:
            s, mib = measure(fn, inputs, args.chunk, reps)
            ref_s = ref_s or s
            print(f"{name:8} {path:10} {1e3 * s:11.1f} {mib:9.1f} {ref_s / s:8.1f}x")


if __name__ == "__main__":
    main()
