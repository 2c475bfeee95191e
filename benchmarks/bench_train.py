"""Whole training steps (forward, loss, backward, AdamW step, zero_grad) of every family at matched
FLOPs per token, against a nanoGPT-style twin of the `gpt2` family at the same shape.

    .venv/bin/python benchmarks/bench_train.py                          # d 256, 4 layers, 4 heads, T 256, B 8
    .venv/bin/python benchmarks/bench_train.py --families gpt2 llama --repeats 21
    .venv/bin/python benchmarks/bench_train.py --device cuda --compile  # bf16 autocast, MFU column

The twin (`nanogpt_twin.py`) is the reference. The `gpt2` family at --d-model, --n-layers,
--n-heads, --seq-len must match it in forward FLOPs per token as FlopCounterMode sees both, and,
loaded with the same weights, in its logits (both asserted); the loss after the timed steps is
printed for each. Every other family is sized by `harness.sizing` to the gpt2 family's training
FLOPs per token, with attention heads of the same width and each preset's aspect ratio scaled by
the twin's over the gpt2 preset's (so the dense families keep d_model and n_layers and move only
d_ff); `FLOPs/token` shows how close each got.

All models train on the same byte windows of the embedded corpus with the harness's optimizer
(`make_optimizer`: AdamW, nanoGPT's weight-decay groups) and loss (`lm_loss` plus auxiliary
losses). They take turns step by step, the order rotating every repetition, so load from other
processes on a shared machine falls on all of them alike; `tokens/s` is from the median step and
`vs twin` is its ratio to the twin's. On CUDA every model runs under bf16 autocast, as the train
loop does, and with --compile each block (the twin's too) goes through `torch.compile`, as
`train.compile` does. MFU is training FLOPs per token x tokens/s over the device's peak
(`harness.hardware`, or --peak-tflops).

With glibc, the process first stops the heap from shrinking (`mallopt`: no trimming, mmap only
above 32 MiB; --heap glibc keeps the defaults). By default glibc hands freed memory back to the
kernel and takes fresh pages again, thousands of page faults a step on CPU; with several models in
one process, which of them pays depends on where the others left their blocks, so a model's speed
moved by several percent with the list of families benchmarked.
"""

from __future__ import annotations

import argparse
import ctypes
import lzma
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from nanogpt_twin import twin_of
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness import flops, hardware, sizing
from harness.config import OptimConfig
from harness.models import FAMILIES, build_model, get_family
from harness.train import lm_loss, make_optimizer

CORPUS = Path(__file__).resolve().parent.parent / "harness" / "corpus" / "shakespeare.txt.xz"
TWIN = "twin"  # the nanoGPT-style gpt2


def twin_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gpt2 family's weights under the twin's parameter names."""
    rename = {
        "tok_emb": "wte", "pos_emb": "wpe", "norm_f": "ln_f", "blocks.": "h.", "norm1": "ln_1",
        "norm2": "ln_2", "seq_mixer.qkv": "attn.c_attn", "seq_mixer.proj": "attn.c_proj",
        "channel_mixer.w_in": "mlp.c_fc", "channel_mixer.w_out": "mlp.c_proj", "head": "lm_head",
    }  # fmt: skip
    out = {}
    for name, p in model.state_dict().items():
        for a, b in rename.items():
            name = name.replace(a, b)
        out[name] = p
    return out


def forward_flops(model: torch.nn.Module, seq_len: int, vocab: int) -> int:
    """Forward FLOPs per token that FlopCounterMode sees, attention through its math kernel (the
    fused CPU kernel is opaque to the counter)."""
    idx = torch.randint(0, vocab, (1, seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(idx)
    return fc.get_total_flops() // seq_len


def configs(args) -> dict[str, object]:
    """The gpt2 family at the twin's shape, then every other family at its training FLOPs per token."""
    if args.d_model % args.n_heads:
        raise SystemExit(f"--d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    head_dim = args.d_model // args.n_heads
    kw = dict(seq_len=args.seq_len, vocab_size=256)
    rules = sizing.SizingRules(head_dim=head_dim)
    ref = sizing.shape("gpt2", d_model=args.d_model, n_layers=args.n_layers, rules=rules, **kw)

    def aspect(variant: str) -> float:
        f = sizing.preset_fields(sizing.resolve_variant(variant))
        return f.get("d_model", 128) / f.get("n_layers", 4)

    out = {"gpt2": ref.cfg}
    for v in args.families:
        if v != "gpt2":
            a = args.d_model / args.n_layers * aspect(v) / aspect("gpt2")
            r = sizing.SizingRules(head_dim=head_dim, aspect=a)
            out[v] = sizing.size(v, flops_per_token=ref.flops_per_token, rules=r, strict=False, **kw).cfg
    return out


def keep_heap() -> bool:
    """glibc: no heap trimming, mmap only above 32 MiB (mallopt's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 32 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    peak = hardware.peak_tflops(hardware.device_name(device), hardware.compute_dtype(device))
    return peak * 1e12 if peak else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), help="registry families or presets")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile every block, the twin's too")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: harness.hardware)")
    ap.add_argument("--heap", default="keep", choices=["keep", "glibc"], help="keep: no heap trimming")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: this process's CPU time, blind to time other processes took (use with --threads 1)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    heap = "kept" if args.heap == "keep" and keep_heap() else "glibc defaults"
    device = torch.device(args.device)
    B, T = args.batch, args.seq_len
    cfgs = configs(args)

    torch.manual_seed(0)
    models = {name: build_model(cfg) for name, cfg in cfgs.items()}
    counts = {name: flops.count(cfg) for name, cfg in cfgs.items()}
    twin = twin_of(cfgs["gpt2"])
    twin.load_state_dict(twin_state(models["gpt2"]))
    # The twin must do the gpt2 family's work: the same FLOPs, counted and measured, and the same function.
    f_twin, f_gpt2 = (forward_flops(m, T, 256) for m in (twin, models["gpt2"]))
    assert f_twin == f_gpt2, f"forward FLOPs per token: twin {f_twin}, gpt2 {f_gpt2}"
    assert abs(f_twin / counts["gpt2"].forward_matmul - 1) < 0.01, (f_twin, counts["gpt2"].forward_matmul)
    with torch.no_grad():
        idx = torch.randint(0, 256, (2, T))
        torch.testing.assert_close(twin(idx), models["gpt2"](idx).logits, rtol=1e-4, atol=1e-4)
    models[TWIN], cfgs[TWIN], counts[TWIN] = twin, cfgs["gpt2"], counts["gpt2"]

    text = torch.frombuffer(bytearray(lzma.decompress(CORPUS.read_bytes())), dtype=torch.uint8).long()
    starts = torch.randint(0, len(text) - T - 1, (8, B), generator=torch.Generator().manual_seed(0))
    batches = [
        (torch.stack([text[s : s + T] for s in row]).to(device),
         torch.stack([text[s + 1 : s + T + 1] for s in row]).to(device))
        for row in starts.tolist()
    ]  # fmt: skip
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    opts, times, losses = {}, {name: [] for name in models}, {name: [] for name in models}
    for name, m in models.items():
        m.to(device).train()
        opts[name] = make_optimizer(m, OptimConfig())
        if args.compile and not (name != TWIN and get_family(cfgs[name].family).no_compile):
            for block in m.h if name == TWIN else m.blocks:
                block.compile()

    def step(name: str, i: int) -> None:
        m, opt = models[name], opts[name]
        x, y = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        with amp():
            out = m(x)
            loss = lm_loss(out if name == TWIN else out.logits, y)
            total = loss + sum(out.aux_losses.values()) if name != TWIN and out.aux_losses else loss
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name].append(clock() - t0)
        losses[name].append(loss.detach())

    names = list(models)
    for i in range(args.warmup + args.repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            step(name, i)

    peak = peak_flops(args, device)
    print(
        f"device={device} threads={torch.get_num_threads()} d_model={args.d_model} n_layers={args.n_layers} "
        f"n_heads={args.n_heads} seq_len={T} batch={B} repeats={args.repeats} compile={args.compile} clock={args.clock} "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} heap={heap}"
    )
    head = f"{'family':<13} {'shape':<9} {'params':>10} {'FLOPs/token':>11} {'loss':>6} {'tokens/s':>9}"
    print(head + (f" {'MFU':>6}" if peak else "") + f" {'vs twin':>8}")
    rates = {name: B * T / statistics.median(t[args.warmup :]) for name, t in times.items()}
    for name in names:
        c, cfg, rate = counts[name], cfgs[name], rates[name]
        params = sum(p.numel() for p in models[name].parameters())
        loss = torch.stack(losses[name][-4:]).float().mean().item()
        row = f"{name:<13} {f'd{cfg.d_model} L{cfg.n_layers}':<9} {params:>10,} {c.train:>11.4g} {loss:>6.3f} {rate:>9.0f}"
        print(row + (f" {c.train * rate / peak:>6.1%}" if peak else "") + f" {rate / rates[TWIN]:>7.3f}x")


if __name__ == "__main__":
    main()
