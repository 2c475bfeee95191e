"""WKV forward+backward: the chunked fast path against the sequential reference, same process.

    .venv/bin/python benchmarks/bench_wkv.py                       # batch 2, d_model 256, head 64, T 1024
    .venv/bin/python benchmarks/bench_wkv.py --batch 16 --d-model 64 --seq-len 128   # demo-sweep size

Memory: on CUDA the peak allocated during forward+backward; on CPU (no allocator statistics) the
bytes autograd saves for backward, which is what grows with length and dominates the peak.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from harness.ops.wkv import wkv6, wkv6_ref, wkv7, wkv7_ref


def make_inputs(version: int, B: int, H: int, T: int, N: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)
    r, k, v = rand(B, H, T, N), rand(B, H, T, N), rand(B, H, T, N)
    if version == 6:
        xs = [r, k, v, -torch.exp(rand(B, H, T, N) - 2), rand(H, N)]
    else:
        kk = F.normalize(rand(B, H, T, N), dim=-1)
        xs = [r, -0.6 * torch.sigmoid(rand(B, H, T, N)), k, v, -kk, kk * torch.sigmoid(rand(B, H, T, N))]
    return [x.requires_grad_() for x in xs]


def run(fn, xs, device: str) -> tuple[float, int]:
    """Seconds and peak bytes for one forward+backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, S = fn(*xs)
    (o.sum() + S.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    return time.perf_counter() - t0, saved


def bench(fn, xs, device: str, repeats: int) -> tuple[float, int]:
    run(fn, xs, device)  # warm-up
    results = [run(fn, xs, device) for _ in range(repeats)]
    return min(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    B, N, T = args.batch, args.head_size, args.seq_len
    H = args.d_model // N
    print(f"device={args.device} threads={torch.get_num_threads()} B={B} H={H} head={N} T={T} fp32")
    print(f"{'op':<6} {'path':<20} {'fwd+bwd ms':>11} {'memory MiB':>11} {'speed-up':>9}")
    for version, fast, ref in ((6, wkv6, wkv6_ref), (7, wkv7, wkv7_ref)):
        xs = make_inputs(version, B, H, T, N, args.device)
        t_ref, m_ref = bench(ref, xs, args.device, max(1, args.repeats // 3))
        rows = [("reference (loop)", t_ref, m_ref)]
        for L in (16, 32, 64):
            fn = lambda *a, L=L, fast=fast: fast(*a, chunk_size=L, backend="torch")
            rows.append((f"chunked L={L}", *bench(fn, xs, args.device, args.repeats)))
        if args.device == "cuda":
            try:
                fn = lambda *a, fast=fast: fast(*a, backend="cuda")
                rows.append(("fla (cuda)", *bench(fn, xs, args.device, args.repeats)))
            except ImportError as e:
                print(f"  fla skipped: {e}")
        for name, t, m in rows:
            print(f"wkv{version:<3} {name:<20} {t * 1e3:11.1f} {m / 2**20:11.1f} {t_ref / t:8.1f}x")


if __name__ == "__main__":
    main()
