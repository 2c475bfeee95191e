"""Fast scans against their sequential references: outputs, final states and every gradient, in fp64,
at lengths on and off the chunk grid."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from harness.ops import native, scan
from tests.ops import fake_kernels

native_available = pytest.mark.skipif(
    native.load("selective_scan", torch.float64) is None,
    reason="the native CPU kernel did not build here (no C compiler, or HARNESS_NATIVE=0)",
)
ssd_native_available = pytest.mark.skipif(
    native.load("ssd_scan", torch.float64) is None,
    reason="the native CPU kernel did not build here (no C compiler, or HARNESS_NATIVE=0)",
)

# (batch, T, chunk): on the grid, off it, shorter than one chunk, a single step.
SHAPES = [(2, 32, 8), (2, 37, 8), (1, 5, 8), (2, 1, 4), (1, 24, 1)]
IDS = [f"B{b}-T{t}-L{c}" for b, t, c in SHAPES]


def _selective_inputs(B: int, T: int, D: int = 6, N: int = 4, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return [
        r(B, T, D),  # u
        F.softplus(r(B, T, D) - 1),  # delta > 0
        -torch.rand(D, N, generator=g, dtype=dtype) * 4 - 0.1,  # A < 0
        r(B, T, N),
        r(B, T, N),
        r(D),
        r(B, D, N),  # h0
    ]


def _ssd_inputs(
    B: int, T: int, H: int = 3, P: int = 4, N: int = 5, dtype=torch.float64
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return [
        r(B, T, H, P),
        F.softplus(r(B, T, H) - 1),
        -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.1,
        r(B, T, N),
        r(B, T, N),
        r(H),
        r(B, H, P, N),
    ]


# Every fast path with its sequential reference and an input maker; the C kernels skip where they
# did not build.
SCANS = [
    pytest.param(scan.selective_scan, scan.selective_scan_ref, _selective_inputs, id="mamba1"),
    pytest.param(
        scan.selective_scan_native,
        scan.selective_scan_ref,
        _selective_inputs,
        marks=native_available,
        id="mamba1-native",
    ),
    pytest.param(scan.ssd_scan, scan.ssd_scan_ref, _ssd_inputs, id="mamba2"),
    pytest.param(
        scan.ssd_scan_native, scan.ssd_scan_ref, _ssd_inputs, marks=ssd_native_available, id="mamba2-native"
    ),
]
NATIVE_SCANS = [p for p in SCANS if p.id.endswith("-native")]


def _outputs_and_grads(fn, inputs, chunk: int, with_h0: bool):
    leaves = [t.clone().requires_grad_() for t in inputs]
    args = leaves if with_h0 else leaves[:-1]
    y, h = fn(*args, chunk_size=chunk)
    # Random cotangents so every gradient path (output and final state) is exercised.
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (
        h * torch.randn(h.shape, generator=g, dtype=h.dtype)
    ).sum()
    loss.backward()
    return y, h, [a.grad for a in args]


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("B,T,chunk", SHAPES, ids=IDS)
@pytest.mark.parametrize("fast,ref,make", SCANS)
def test_fast_equals_reference(fast, ref, make, B, T, chunk, with_h0):
    inputs = make(B, T)
    y, h, grads = _outputs_and_grads(fast, inputs, chunk, with_h0)
    y_ref, h_ref, grads_ref = _outputs_and_grads(ref, inputs, chunk, with_h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8, msg=lambda m, i=i: f"input {i}: {m}")


@pytest.mark.parametrize("fast,ref,make", SCANS)
def test_split_sequence_resumes_from_state(fast, ref, make):
    """Scanning [0, 20) then [20, 45) from the carried state equals scanning [0, 45) at once."""
    x, dt, A, Bm, Cm, D, _ = make(2, 45)
    y, h = fast(x, dt, A, Bm, Cm, D, chunk_size=8)
    y1, h1 = fast(x[:, :20], dt[:, :20], A, Bm[:, :20], Cm[:, :20], D, chunk_size=8)
    y2, h2 = fast(x[:, 20:], dt[:, 20:], A, Bm[:, 20:], Cm[:, 20:], D, h1, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


@pytest.mark.parametrize("fast,ref,make", SCANS)
def test_fp32_long_decay_stays_finite(fast, ref, make):
    """Large Delta drives cumulative log-decays far below exp's fp32 range within one chunk; the fast
    paths must neither overflow nor lose the reference's answer."""
    x, dt, A, Bm, Cm, D, _ = (t.float() for t in make(1, 64))
    dt = dt * 50
    y, h = fast(x, dt, A, Bm, Cm, D, chunk_size=64)
    y_ref, h_ref = ref(x, dt, A, Bm, Cm, D)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_half_inputs_compute_in_fp32():
    x, dt, A, Bm, Cm, D, _ = _ssd_inputs(1, 16)
    y, h = scan.ssd_scan(x.bfloat16(), dt.bfloat16(), A.float(), Bm.bfloat16(), Cm.bfloat16(), D.float())
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_pick_backend_on_cpu(monkeypatch):
    x = torch.zeros(1)
    assert scan.pick_backend("auto", x) == "torch"
    assert scan.pick_backend("torch", x, native_kernel="selective_scan") == "torch"
    with pytest.raises(ValueError, match="CUDA tensors"):
        scan.pick_backend("cuda", x)
    with pytest.raises(ValueError, match="unknown scan backend"):
        scan.pick_backend("triton", x)
    with pytest.raises(ValueError, match="kernel name"):
        scan.pick_backend("native", x)
    # Without a kernel "auto" falls back to PyTorch, and an explicit "native" says why it cannot run.
    monkeypatch.setenv("HARNESS_NATIVE", "0")
    native.load.cache_clear()
    try:
        assert scan.pick_backend("auto", x, native_kernel="selective_scan") == "torch"
        with pytest.raises(RuntimeError, match="could not build"):
            scan.pick_backend("native", x, native_kernel="selective_scan")
    finally:
        native.load.cache_clear()


@native_available
@ssd_native_available
def test_auto_takes_the_native_kernel_on_cpu():
    assert scan.pick_backend("auto", torch.zeros(1), native_kernel="selective_scan") == "native"
    assert scan.pick_backend("auto", torch.zeros(1), native_kernel="ssd_scan") == "native"


@native_available
@pytest.mark.parametrize(
    "D,N", [(48, 16), (40, 32), (16, 20), (7, 3)], ids=["D48-N16", "D40-N32", "D16-N20", "D7-N3"]
)
def test_native_fp32_matches_fp64_reference(D, N):
    """The fp32 build has its own exp and, where AVX-512 is, a vectorised tile sum for dB and dC
    (whole 16-state tiles; the rest take the plain loop): both checked against the fp64 loop."""
    inputs = _selective_inputs(2, 70, D=D, N=N)
    g = torch.Generator().manual_seed(D * 100 + N)
    gy = torch.randn(2, 70, D, generator=g, dtype=torch.float64)
    gh = torch.randn(2, D, N, generator=g, dtype=torch.float64)
    results = []
    for fn, dtype in ((scan.selective_scan_ref, torch.float64), (scan.selective_scan_native, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        y, h = fn(*leaves, chunk_size=32)
        ((y * gy.to(dtype)).sum() + (h * gh.to(dtype)).sum()).backward()
        results.append([y, h, *(t.grad for t in leaves)])
    names = ["y", "h", "du", "ddelta", "dA", "dB", "dC", "dD", "dh0"]
    for name, a, b in zip(names, results[1], results[0], strict=True):
        err = float((a.double() - b).abs().max() / b.abs().max())
        # dA and dD are sums over all (b, t) of terms that largely cancel: fp32 rounding shows more
        # there (worst seen over 30 random draws: 1.2e-6; fp32 rounding itself is 6e-8).
        assert err < (1e-5 if name in ("dA", "dD") else 2e-6), f"{name}: relative error {err:.1e}"


@ssd_native_available
@pytest.mark.parametrize("P", [64, 24], ids=["P64", "P24"])
@pytest.mark.parametrize("N", [16, 20, 64], ids=["N16", "N20", "N64"])
def test_native_ssd_fp32_matches_fp64_reference(N, P):
    """The fp32 build against the fp64 loop: its own exp, the AVX-512 tile sums for dB and dC
    (whole 16-state tiles; N 20 leaves a tail), and channel blocks of 16 (P 24 leaves a partial one).
    dA and dD (one number per head) sum thousands of terms that largely cancel, so fp32 rounding
    is larger relative to them: over 40 draws the native kernel's worst was 5.6e-6 there, the
    chunked PyTorch path's 1.5e-5."""
    inputs = _ssd_inputs(2, 70, H=2, P=P, N=N)
    g = torch.Generator().manual_seed(N + P)
    gy = torch.randn(2, 70, 2, P, generator=g, dtype=torch.float64)
    gh = torch.randn(2, 2, P, N, generator=g, dtype=torch.float64)
    results = []
    for fn, dtype in ((scan.ssd_scan_ref, torch.float64), (scan.ssd_scan_native, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        y, h = fn(*leaves, chunk_size=32)
        ((y * gy.to(dtype)).sum() + (h * gh.to(dtype)).sum()).backward()
        results.append([y, h, *(t.grad for t in leaves)])
    names = ["y", "h", "dx", "dt", "dA", "dB", "dC", "dD", "dh0"]
    for name, a, b in zip(names, results[1], results[0], strict=True):
        err = float((a.detach().double() - b).abs().max() / b.abs().max())
        assert err < (5e-5 if name in ("dA", "dD") else 2e-6), f"{name}: relative error {err:.1e}"


def test_auto_falls_back_with_cuda_hidden(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scan.pick_backend("auto", torch.zeros(1)) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 100], ids=["T64", "T100"])
def test_cuda_kernels_match_torch(T):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("mamba_ssm", reason="needs the cuda extra (mamba-ssm)")
    cases = [
        (
            scan.selective_scan_cuda,
            scan.selective_scan,
            _selective_inputs(2, T, D=64, N=16, dtype=torch.float32),
        ),
        (scan.ssd_scan_cuda, scan.ssd_scan, _ssd_inputs(2, T, H=4, P=64, N=16, dtype=torch.float32)),
    ]
    for cuda_fn, torch_fn, inputs in cases:
        inputs = [t.cuda() for t in inputs[:-1]]
        y, h = cuda_fn(*inputs, chunk_size=64)
        y_t, h_t = torch_fn(*inputs, chunk_size=64)
        torch.testing.assert_close(y, y_t, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(h.float(), h_t, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fast,ref,make", SCANS)
@pytest.mark.parametrize("T", [8, 19], ids=["T8-one-chunk", "T19-three-chunks"])
def test_without_final_state(fast, ref, make, T):
    """final_state=False (what the models use) skips the state but not any output term."""
    inputs = make(2, T)
    y, h = fast(*inputs, chunk_size=8, final_state=False)
    y_ref, _ = ref(*inputs)
    assert h is None
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("fast,ref,make", NATIVE_SCANS)
def test_native_refuses_double_backward(fast, ref, make):
    """The C backward builds no graph: a second derivative must fail loudly, not come out as zero."""
    leaves = [t.clone().requires_grad_() for t in make(2, 12)]
    y, _ = fast(*leaves, chunk_size=8)
    (gu,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        # plus a term with its own graph: without the guard, the scan's part would silently vanish
        (gu.square().sum() + leaves[0].pow(3).sum()).backward()


@pytest.mark.parametrize("fast,ref,make", NATIVE_SCANS)
def test_native_broadcasts_like_the_reference_and_rejects_bad_shapes(fast, ref, make):
    x, dt, A, Bm, Cm, D, h0 = make(2, 12)
    Bm1 = Bm[:1]  # one B for the whole batch: the reference broadcasts it
    torch.testing.assert_close(fast(x, dt, A, Bm1, Cm, D, h0)[0], ref(x, dt, A, Bm1, Cm, D, h0)[0])
    with pytest.raises(ValueError, match=r"argument \d has shape"):
        fast(x, dt, A, torch.cat([Bm, Bm], -1), Cm, D, h0)  # more states than A or C: would read past C


# mamba-ssm's kernels, faked on CPU (tests/ops/fake_kernels.py): what the harness hands them.


def test_auto_falls_back_when_mamba_ssm_lacks_its_compiled_extension(monkeypatch, caplog):
    fake_kernels.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # a wheel built without it
    x = fake_kernels.fake_cuda_tensor()
    with caplog.at_level(logging.WARNING, logger="harness.kernels"):
        for _ in range(2):
            assert scan.pick_backend("auto", x, native_kernel="selective_scan") == "torch"
    [record] = caplog.records  # once, naming the missing module and the fix
    assert "selective_scan_cuda does not load" in record.getMessage()
    assert "MAMBA_KEEP_CUDA_BUILD" in record.getMessage()
    with pytest.raises(ImportError, match=r"\.\[cuda\]"):
        scan.pick_backend("cuda", x, native_kernel="selective_scan")
    # Mamba-2's kernels are Triton and do not need the extension.
    assert scan.pick_backend("auto", x, native_kernel="ssd_scan") == "cuda"


def test_auto_takes_mamba_ssm_for_the_dtypes_it_takes(monkeypatch):
    fake_kernels.install(monkeypatch)
    for name in ("selective_scan", "ssd_scan", None):
        assert scan.pick_backend("auto", fake_kernels.fake_cuda_tensor(), native_kernel=name) == "cuda"
    fp64 = fake_kernels.fake_cuda_tensor(torch.float64)
    assert scan.pick_backend("auto", fp64, native_kernel="selective_scan") == "torch"
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        scan.pick_backend("cuda", fp64, native_kernel="selective_scan")


@pytest.mark.parametrize(
    "cuda_fn,ref,make",
    [
        (scan.selective_scan_cuda, scan.selective_scan_ref, _selective_inputs),
        (scan.ssd_scan_cuda, scan.ssd_scan_ref, _ssd_inputs),
    ],
    ids=["mamba1", "mamba2"],
)
def test_cuda_wrappers_hand_the_kernels_one_dtype(monkeypatch, cuda_fn, ref, make):
    """As under bf16 autocast: the activations in bf16, delta (softplus) and the parameters in fp32."""
    calls = fake_kernels.install(monkeypatch)
    x, dt, A, Bm, Cm, D, _ = make(2, 12, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x.bfloat16(), dt, A, Bm.bfloat16(), Cm.bfloat16(), D)]
    y, h = cuda_fn(*leaves, chunk_size=8)
    assert len(calls) == 1 and set(calls[0]["dtypes"]) == {torch.bfloat16}
    y_ref, h_ref = ref(*leaves)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)  # delta rounded to bf16
    torch.testing.assert_close(h, h_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in leaves)
