"""Stand-ins for mamba-ssm's and flash-linear-attention's GPU kernels, so the CPU tests can run the
code that calls them. Each fake checks the dtypes and shapes the real kernel requires (mamba-ssm's
`selective_scan_cuda.fwd` checks them in C++; fla's Triton matmuls need one dtype), records what
it received, and returns the `_ref` result in the kernel's own layout and conventions.
`install(monkeypatch)` puts them in `sys.modules` and empties the kernel probe's cache."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

from harness.ops import kernels, scan, wkv

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fake_module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec reads it: "installed"
    m.__dict__.update(attrs)
    return m


def install(monkeypatch) -> list[dict]:
    """Fake mamba-ssm (with its compiled extension) and fla; returns the list of recorded calls."""
    calls: list[dict] = []

    def selective_scan_fn(u, delta, A, B, C, D=None, return_last_state=False, **_):
        # selective_scan_cuda.fwd: u, delta and a variable B, C in one input dtype; A, D in fp32.
        assert u.dtype in KERNEL_DTYPES, u.dtype
        assert delta.dtype == B.dtype == C.dtype == u.dtype, (u.dtype, delta.dtype, B.dtype, C.dtype)
        assert A.dtype == D.dtype == torch.float32, (A.dtype, D.dtype)
        Bsz, Dm, T = u.shape
        assert delta.shape == u.shape and A.shape[0] == Dm and B.shape == C.shape == (Bsz, A.shape[1], T)
        calls.append({"kernel": "selective_scan", "dtypes": (u.dtype, delta.dtype, B.dtype, C.dtype)})
        u_BTD, delta_BTD, B_BTN, C_BTN = (t.transpose(1, 2) for t in (u, delta, B, C))
        y_BTD, h = scan.selective_scan_ref(u_BTD, delta_BTD, A, B_BTN, C_BTN, D)
        y = y_BTD.transpose(1, 2).to(u.dtype)  # the kernel writes its output in the input dtype
        return (y, h) if return_last_state else y

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None, **kw):
        # The SSD Triton matmuls take x, B and C in one dtype; the harness passes dt, A, D in fp32.
        assert x.dtype in KERNEL_DTYPES and B.dtype == C.dtype == x.dtype, (x.dtype, B.dtype, C.dtype)
        assert dt.dtype == A.dtype == D.dtype == torch.float32, (dt.dtype, A.dtype, D.dtype)
        Bsz, T, H, P = x.shape
        assert (
            dt.shape == (Bsz, T, H) and A.shape == (H,) and B.shape == C.shape and B.shape[:3] == (Bsz, T, 1)
        )
        calls.append({"kernel": "ssd_scan", "dtypes": (x.dtype, B.dtype, C.dtype)})
        y, h = scan.ssd_scan_ref(x, dt, A, B[:, :, 0], C[:, :, 0], D, initial_states)
        return (y, h) if kw.get("return_final_states") else y

    def _fla_check(name, xs, u, initial_state):
        assert all(t.dtype == xs[0].dtype for t in (*xs, u)), [t.dtype for t in (*xs, u)]
        assert xs[0].dtype in KERNEL_DTYPES
        assert initial_state is None or initial_state.dtype == torch.float32
        assert len({t.shape[:3] for t in xs}) == 1  # all (B, T, H, .)
        calls.append({"kernel": name, "dtypes": tuple(t.dtype for t in xs)})

    def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, **_):
        _fla_check("rwkv6", (r, k, v, w), u, initial_state)
        scale = r.shape[-1] ** -0.5 if scale is None else scale
        o, S = wkv.wkv6_ref(*(t.transpose(1, 2) for t in (r * scale, k, v, w)), u, initial_state)
        return o.transpose(1, 2).to(r.dtype), (S if output_final_state else None)

    def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=True, **_):
        _fla_check("rwkv7", (r, w, k, v, a, b), r, initial_state)
        s0 = None if initial_state is None else initial_state.transpose(-1, -2)  # fla: K x V
        o, S = wkv.wkv7_ref(*(t.transpose(1, 2) for t in (r * scale, w, k, v, a, b)), s0)
        return o.transpose(1, 2).to(r.dtype), (S.transpose(-1, -2) if output_final_state else None)

    fakes = [
        fake_module("mamba_ssm"),
        fake_module("selective_scan_cuda"),
        fake_module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=selective_scan_fn),
        fake_module("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=mamba_chunk_scan_combined),
        fake_module("fla"),
        fake_module("fla.ops.rwkv6", chunk_rwkv6=chunk_rwkv6),
        fake_module("fla.ops.rwkv7", chunk_rwkv7=chunk_rwkv7),
    ]
    for m in fakes:
        monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(kernels, "_found", {})
    monkeypatch.setattr(kernels, "_noted", {})
    return calls


def fake_cuda_tensor(dtype=torch.bfloat16) -> types.SimpleNamespace:
    """What the backend pickers read of a CUDA tensor."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=dtype)
