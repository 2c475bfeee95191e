"""The WKV fast paths (chunked, recurrent, fla) against the sequential `_ref` loops."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from harness.ops import kernels, wkv
from harness.ops.wkv import (
    wkv6,
    wkv6_chunked,
    wkv6_recurrent,
    wkv6_ref,
    wkv7,
    wkv7_chunked,
    wkv7_recurrent,
    wkv7_ref,
)
from tests.ops import fake_kernels

B, H, K = 2, 2, 8
FAST_DECAY = {6: 3.0, 7: 60.0}  # decay_scale that takes a chunk of 8 past the factoring limit


def inputs(version: int, T: int, with_state: bool, dtype=torch.float64, device="cpu", decay_scale=1.0):
    """Leaf tensors shaped and ranged as the model produces them (decays in (0, 1))."""
    g = torch.Generator().manual_seed(T * 10 + version)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    r, k, v = rand(B, H, T, K), rand(B, H, T, K), rand(B, H, T, K)
    if version == 6:
        logw = -torch.exp(rand(B, H, T, K) * decay_scale - 1)
        xs = [r, k, v, logw, rand(H, K)]
    else:
        logw = -0.6065 * torch.sigmoid(rand(B, H, T, K)) * decay_scale
        kk = F.normalize(rand(B, H, T, K), dim=-1)
        a = torch.sigmoid(rand(B, H, T, K))
        xs = [r, logw, k, v, -kk, kk * a]
    xs.append(rand(B, H, K, K) if with_state else None)
    return [None if x is None else x.to(dtype=dtype, device=device).requires_grad_() for x in xs]


def outputs_and_grads(fn, xs, **kw):
    o, S = fn(*xs, **kw)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)
    wS = torch.randn(S.shape, generator=g, dtype=S.dtype).to(S.device)
    loss = (o * wo).sum() + (S * wS).sum()
    grads = torch.autograd.grad(loss, [x for x in xs if x is not None])
    return [o.detach(), S.detach(), *grads]


FNS = {
    6: (wkv6_ref, wkv6_chunked, wkv6_recurrent, wkv6),
    7: (wkv7_ref, wkv7_chunked, wkv7_recurrent, wkv7),
}
CASES = [(v, T, s, 1.0) for v in (6, 7) for T in (16, 21, 1) for s in (False, True)]
# Decays too fast for the factored intra-chunk scores: the pairwise fallback.
CASES += [(6, 21, True, FAST_DECAY[6]), (7, 21, True, FAST_DECAY[7])]
IDS_FP32 = ["rwkv6-factored", "rwkv7-factored", "rwkv6-pairwise", "rwkv7-pairwise"]
IDS = [
    f"rwkv{v}-T{T}-{'state' if s else 'zero_state'}{'-fast_decay' if d > 1 else ''}" for v, T, s, d in CASES
]


@pytest.mark.parametrize("version,T,with_state,decay_scale", CASES, ids=IDS)
def test_chunked_equals_reference(version, T, with_state, decay_scale):
    """Outputs, final state and every input gradient, fp64, chunk 8 (T=16 on the grid, 21 off it)."""
    ref, chunked, _, _ = FNS[version]
    xs = inputs(version, T, with_state, decay_scale=decay_scale)
    want = outputs_and_grads(ref, xs)
    got = outputs_and_grads(chunked, xs, chunk_size=8)
    for name, a, b in zip(["o", "S", *[f"grad{i}" for i in range(len(want) - 2)]], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("version", [6, 7], ids=["rwkv6", "rwkv7"])
def test_recurrent_and_dispatch_equal_reference(version):
    ref, chunked, recurrent, dispatch = FNS[version]
    xs = inputs(version, 13, with_state=True)
    want = outputs_and_grads(ref, xs)
    for got in (outputs_and_grads(recurrent, xs), outputs_and_grads(dispatch, xs, backend="auto")):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("version", [6, 7], ids=["rwkv6", "rwkv7"])
def test_state_carries_across_calls(version):
    """Running two halves with the first half's final state equals one call (generation prefill)."""
    _, chunked, _, _ = FNS[version]
    xs = [None if x is None else x.detach() for x in inputs(version, 20, with_state=True)]
    o, S = chunked(*xs, chunk_size=8)
    n_time = 4 if version == 6 else 6  # RWKV-6's u (after r, k, v, logw) has no time axis
    first = [x[:, :, :11] for x in xs[:n_time]] + xs[n_time:-1]
    second = [x[:, :, 11:] for x in xs[:n_time]] + xs[n_time:-1]
    o1, S1 = chunked(*first, xs[-1], chunk_size=8)
    o2, S2 = chunked(*second, S1, chunk_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o)
    torch.testing.assert_close(S2, S)


@pytest.mark.parametrize(
    "version,decay_scale", [(6, 1.0), (7, 3.0), (6, FAST_DECAY[6]), (7, FAST_DECAY[7])], ids=IDS_FP32
)
def test_fp32_is_accurate_and_finite(version, decay_scale):
    """In fp32, factored and pairwise intra-chunk scores stay as close to the reference as fp32
    allows, also with decays down to log w = -e^8 (RWKV-6) or -36 (RWKV-7) per step, where a
    difference of large cumulative sums would lose the slowly decaying channels' precision."""
    xs = inputs(version, 40, with_state=False, dtype=torch.float32, decay_scale=decay_scale)
    ref, chunked, _, _ = FNS[version]
    (o, S), (o_ref, S_ref) = chunked(*xs, chunk_size=16), ref(*xs)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-4)


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        wkv6(*inputs(6, 4, False), backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="flash-linear-attention installed")
def test_cuda_backend_without_fla_names_the_extra():
    with pytest.raises(ImportError, match=r"harness\[cuda\]"):
        wkv7(*inputs(7, 4, False), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("version", [6, 7], ids=["rwkv6", "rwkv7"])
def test_fla_backend_equals_reference(version):
    pytest.importorskip("fla", reason="needs flash-linear-attention (extra `cuda`)")
    ref, _, _, dispatch = FNS[version]
    xs = inputs(version, 100, with_state=True, dtype=torch.float32, device="cuda")
    want = outputs_and_grads(ref, xs)
    got = outputs_and_grads(dispatch, xs, backend="cuda")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


# flash-linear-attention, faked on CPU (tests/ops/fake_kernels.py): what the harness hands it.


def test_pick_backend(monkeypatch):
    fake_kernels.install(monkeypatch)
    assert wkv.pick_backend("auto", torch.zeros(1), 6) == "torch"
    assert kernels._found == {}  # CPU tensors never import fla
    assert wkv.pick_backend("auto", fake_kernels.fake_cuda_tensor(), 7) == "cuda"
    assert wkv.pick_backend("auto", fake_kernels.fake_cuda_tensor(torch.float64), 7) == "torch"
    with pytest.raises(ValueError, match="CUDA tensors"):
        wkv.pick_backend("cuda", torch.zeros(1), 7)


def test_auto_falls_back_when_fla_does_not_import(monkeypatch, caplog):
    fake_kernels.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv6", None)  # e.g. a triton it cannot import
    x = fake_kernels.fake_cuda_tensor()
    with caplog.at_level(logging.WARNING, logger="harness.kernels"):
        for _ in range(2):
            assert wkv.pick_backend("auto", x, 6) == "torch"
    [record] = caplog.records
    assert "fla is installed but fla.ops.rwkv6 does not load" in record.getMessage()
    with pytest.raises(ImportError, match=r"harness\[cuda\]"):
        wkv.pick_backend("cuda", x, 6)


@pytest.mark.parametrize("version", [6, 7], ids=["rwkv6", "rwkv7"])
def test_fla_call_gets_one_dtype(monkeypatch, version):
    """As under bf16 autocast: r, k, v (and a, b) in bf16 from the projections, the decay and u in
    fp32. fla gets one dtype, and its output and state match the reference."""
    calls = fake_kernels.install(monkeypatch)
    xs = inputs(version, 12, with_state=True, dtype=torch.float32)
    fp32 = {6: {3, 4, 5}, 7: {1, 6}}[version]  # logw, u, state / logw, state
    xs = [
        x.detach().to(torch.float32 if i in fp32 else torch.bfloat16).requires_grad_()
        for i, x in enumerate(xs)
    ]
    o, S = (wkv._wkv6_fla if version == 6 else wkv._wkv7_fla)(*xs)
    assert len(calls) == 1 and set(calls[0]["dtypes"]) == {torch.bfloat16}
    o_ref, S_ref = FNS[version][0](*xs)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=5e-2, atol=5e-2)  # inputs rounded to bf16
    torch.testing.assert_close(S, S_ref, rtol=5e-2, atol=5e-2)
    (o.float().sum() + S.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == x.dtype for x in xs)


def test_a_known_decay_bound_spares_the_chunk_check_its_read(monkeypatch):
    """RWKV-7's model passes log w >= -e^-0.5: the chunked path then reads nothing from the device
    (a host sync on CUDA) and computes exactly what the checked path computes."""
    xs = inputs(7, 40, with_state=True)
    checked = outputs_and_grads(wkv7_chunked, xs, chunk_size=16)

    def no_read(self):
        raise AssertionError("the chunked WKV read a tensor's value")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_read)
    bounded = outputs_and_grads(wkv7_chunked, xs, chunk_size=16, min_log_decay=-0.6066)
    for a, b in zip(checked, bounded, strict=True):
        assert torch.equal(a, b)
