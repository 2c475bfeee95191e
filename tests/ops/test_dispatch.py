import math

import pytest
import torch

from harness.ops import dispatch

ROUTER_CASES = [
    ("topk_softmax", 2, 0.0),
    ("topk_softmax", 2, 1.0),
    ("softmax_topk", 3, 0.0),
    ("switch", 1, 1.25),
    ("noisy_topk", 2, 0.0),
    ("sigmoid_topk", 2, 0.0),
    ("sigmoid_topk", 3, 1.0),
    ("expert_choice", 2, 1.0),
]


def _routed(router, top_k, cf, B=2, T=13, E=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w_r = torch.randn(D, E, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(B * T, E, generator=g, dtype=torch.float64) + 0.1 if router == "noisy_topk" else None
    torch.manual_seed(seed)
    r = dispatch.route(x @ w_r, router, top_k, B, cf, renorm=router == "softmax_topk", noise_std_NE=noise)
    return x, w_r, r


LAYOUTS = ("grouped", "padded", "padded_static", "grouped_mm")


def _fast(layout):
    if layout == "padded_static":  # the slab height from a bound, not the data: every assignment
        return lambda *args: dispatch.expert_mlp(*args, layout="padded", max_load=args[3].numel())
    if layout == "grouped_mm":  # no fp64 kernel: run fp32 inside, hand fp64 back to the test
        return lambda x, wu, wd, tok, exp, gate: dispatch.expert_mlp(
            x.float(), wu.float(), wd.float(), tok, exp, gate.float(), layout=layout
        ).to(x.dtype)
    return lambda *args: dispatch.expert_mlp(*args, layout=layout)


def _tol(layout):
    """fp64 paths agree with the loop to rounding; grouped_mm to fp32 rounding."""
    return {"rtol": 1e-4, "atol": 1e-5} if layout == "grouped_mm" else {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("router,top_k,cf", ROUTER_CASES, ids=[f"{r}-k{k}-cf{c}" for r, k, c in ROUTER_CASES])
def test_fast_dispatch_matches_loop(router, top_k, cf, layout):
    E, D, Fe = 5, 8, 8
    g = torch.Generator().manual_seed(1)
    w_up = torch.randn(E, D, 2 * Fe, generator=g, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(E, Fe, D, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = None
    outs, grads = [], []
    for fn in (_fast(layout), dispatch.expert_mlp_ref):
        x, w_r, r = _routed(router, top_k, cf, E=E, D=D)
        y = fn(x, w_up, w_down, r["tok_A"], r["exp_A"], r["gate_A"])
        leaves = (x, w_r, w_up, w_down)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), leaves))
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], **_tol(layout))
    for name, a, b in zip(("x", "router", "w_up", "w_down"), *grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(layout), msg=f"grad {name}")


def _assignments(N, E, A, used, seed):
    """A random assignments to the experts in `used` only; a token may appear several times."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, N, (A,), generator=g)
    exp = torch.tensor(used)[torch.randint(0, len(used), (A,), generator=g)]
    gate = torch.rand(A, generator=g, dtype=torch.float64).requires_grad_()
    return tok, exp, gate


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "E,used",
    [(6, [0, 2, 5]), (4, [3]), (7, [1, 2, 3, 4, 5, 6]), (6, [0, 2, 6])],
    ids=["gaps", "one-expert", "first-empty", "dropped-beside-empty-last"],
)
def test_fast_dispatch_with_empty_experts(E, used, layout):
    """Experts that receive no token: zero weight gradients, and every other gradient (x, both
    weights, gates) equal to the loop's, in fp64. Expert index E marks a dropped assignment: with a
    non-zero gate it still adds nothing and its gate gets no gradient (grouped_mm runs those rows in
    the last group, here an otherwise empty expert)."""
    N, D, Fe = 11, 8, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(E, D, 2 * Fe, generator=g, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(E, Fe, D, generator=g, dtype=torch.float64, requires_grad=True)
    tok, exp, gate = _assignments(N, E, 17, used, seed=3)
    w_y = torch.randn(N, D, generator=g, dtype=torch.float64)
    res = []
    for fn in (_fast(layout), dispatch.expert_mlp_ref):
        y = fn(x, w_up, w_down, tok, exp, gate)
        res.append((y, *torch.autograd.grad((y * w_y).sum(), (x, w_up, w_down, gate))))
    for name, a, b in zip(("y", "x", "w_up", "w_down", "gate"), *res, strict=True):
        torch.testing.assert_close(a, b, **_tol(layout), msg=name)
    empty = [e for e in range(E) if e not in used]
    assert torch.all(res[0][2][empty] == 0) and torch.all(res[0][3][empty] == 0)
    assert torch.all(res[0][4][exp == E] == 0) and torch.all(res[0][4][exp < E] != 0)


def test_grouped_dispatch_gradcheck():
    """The hand-written backward against finite differences, independent of the reference."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tok, exp, gate = _assignments(7, 3, 10, [0, 2], seed=8)
    fn = _fast("grouped")
    assert torch.autograd.gradcheck(lambda *a: fn(*a[:3], tok, exp, a[3]), (x, w_up, w_down, gate))


def test_grouped_dispatch_when_x_needs_no_grad():
    x = torch.randn(9, 8, dtype=torch.float64)
    w_up = torch.randn(3, 8, 10, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    tok, exp, gate = _assignments(9, 3, 14, [0, 2], seed=6)
    res = []
    for fn in (_fast("grouped"), dispatch.expert_mlp_ref):
        y = fn(x, w_up, w_down, tok, exp, gate)
        res.append((y, *torch.autograd.grad(y.square().sum(), (w_up, w_down, gate))))
    for name, a, b in zip(("y", "w_up", "w_down", "gate"), *res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_dispatch_without_assignments(layout):
    x = torch.randn(3, 4, requires_grad=True)
    w_up, w_down = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)
    none, gate = torch.zeros(0, dtype=torch.long), torch.zeros(0, requires_grad=True)
    y = _fast(layout)(x, w_up, w_down, none, none, gate)
    assert torch.all(y == 0)
    grads = torch.autograd.grad(y.sum(), (x, w_up, w_down), allow_unused=True)
    assert all(gr is None or torch.all(gr == 0) for gr in grads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_dispatch_under_bf16_autocast(layout):
    """Under autocast both paths run bf16 matmuls and return, and differentiate into, fp32."""
    N, E, D, Fe = 24, 4, 16, 8
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w_up = torch.randn(E, D, 2 * Fe, generator=g).div(4).requires_grad_()
    w_down = torch.randn(E, Fe, D, generator=g).div(4).requires_grad_()
    tok, exp, gate = _assignments(N, E, 40, [0, 1, 3], seed=5)
    gate = gate.detach().float().requires_grad_()
    res = []
    for fn in (_fast(layout), dispatch.expert_mlp_ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w_up, w_down, tok, exp, gate)
        assert y.dtype == torch.float32
        res.append((y, *torch.autograd.grad(y.square().sum(), (x, w_up, w_down, gate))))
    for name, a, b in zip(("y", "x", "w_up", "w_down", "gate"), *res, strict=True):
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.detach().abs().max()), msg=name)


def test_unknown_layout_raises():
    with pytest.raises(ValueError, match="layout"):
        dispatch.expert_mlp(
            torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(1, 1, 2), *[torch.zeros(0)] * 3, "x"
        )


def test_unrouted_tokens_get_zero_output():
    """A token with no kept assignment contributes nothing: the block leaves its residual as is."""
    x = torch.randn(4, 3, dtype=torch.float64)
    w_up, w_down = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    tok, exp, gate = torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([0.5, 1.0], dtype=torch.float64)
    for fn in (_fast("grouped"), _fast("padded"), dispatch.expert_mlp_ref):
        y = fn(x, w_up, w_down, tok, exp, gate)
        assert torch.all(y[[1, 3]] == 0) and torch.all(y[[0, 2]] != 0)


@pytest.mark.parametrize(
    "D,Fe,dtype,match",
    [
        (8, 6, torch.float32, "divisible by 4"),
        (12, 8, torch.bfloat16, "divisible by 8"),
        (8, 8, torch.float64, "fp32"),
    ],
)
def test_grouped_mm_refuses_what_its_kernel_cannot_run(D, Fe, dtype, match):
    """Unaligned rows or fp64 fail with the reason, before any matmul (even with no assignments)."""
    w_up, w_down = torch.zeros(2, D, 2 * Fe, dtype=dtype), torch.zeros(2, Fe, D, dtype=dtype)
    none = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        dispatch.expert_mlp(
            torch.zeros(3, D, dtype=dtype), w_up, w_down, none, none, none.to(dtype), "grouped_mm"
        )


def test_capacity_drops_by_position_order():
    # One sequence, 5 tokens, top-2 of 3 experts, 2 slots each. Served in order (t0 k0, t0 k1, t1 k0, ...):
    # e0 fills at t1, e1 at t1, e2 at t3, so t2's and t3's first choices and both of t4's are dropped.
    exp = torch.tensor([[[0, 1], [0, 1], [0, 2], [1, 2], [2, 0]]])
    want = torch.tensor([[[1, 1], [1, 1], [0, 1], [0, 1], [0, 0]]], dtype=torch.bool)
    assert torch.equal(dispatch.capacity_keep(exp, 3, 2), want)
    assert torch.equal(dispatch.capacity_keep_ref(exp, 3, 2), want)


def test_capacity_keep_matches_loop_on_random_routing():
    exp = torch.randint(0, 6, (3, 40, 2))
    for cap in (1, 5, 13, 80):
        assert torch.equal(dispatch.capacity_keep(exp, 6, cap), dispatch.capacity_keep_ref(exp, 6, cap))


def test_route_drops_exactly_the_capacity_rule():
    logits = torch.randn(2 * 16, 4)
    r = dispatch.route(logits, "topk_softmax", 2, 2, capacity_factor=0.5)
    cap = dispatch.capacity(16, 4, 2, 0.5)
    assert cap == 4
    top = logits.topk(2, -1).indices
    keep = dispatch.capacity_keep_ref(top.view(2, 16, 2), 4, cap).view(-1)
    assert keep.sum() < keep.numel()  # some are dropped
    # Static shapes: every (token, choice) stays in (t, k) order; a dropped one has expert E and gate 0.
    assert torch.equal(r["tok_A"], torch.arange(32).repeat_interleave(2))
    assert torch.equal(r["exp_A"], torch.where(keep, top.view(-1), 4))
    assert torch.all((r["gate_A"] == 0) == ~keep)
    assert float(r["dropped_frac"]) == pytest.approx(1 - keep.float().mean().item())
    per_seq_expert = torch.bincount(r["exp_A"][keep] + 4 * (r["tok_A"][keep] // 16), minlength=8)
    assert int(per_seq_expert.max()) == cap


def test_load_bound_bounds_every_expert():
    """`max_load` for the padded layout: a bound on any expert's kept assignments, met exactly
    when an expert fills its capacity in every sequence."""
    B, T, E = 3, 16, 4
    logits = torch.randn(B * T, E)
    logits[:, 0] += 10  # every token's first choice is expert 0
    for router, k, cf in [("switch", 1, 1.0), ("topk_softmax", 2, 0.5), ("expert_choice", 2, 0.0)]:
        r = dispatch.route(logits, router, k, B, cf)
        bound = dispatch.load_bound(router, T, B, E, k, cf)
        assert int(torch.bincount(r["exp_A"], minlength=E + 1)[:E].max()) == bound
    assert dispatch.load_bound("topk_softmax", T, B, E, 2, 0.0) is None


def test_router_gates():
    logits = torch.randn(10, 6)
    probs = logits.softmax(-1)
    top = dispatch.route(logits, "topk_softmax", 2, 1)
    torch.testing.assert_close(top["gates_NE"].sum(-1), torch.ones(10))
    sw = dispatch.route(logits, "switch", 1, 1)
    torch.testing.assert_close(sw["gate_A"], probs.max(-1).values)
    st = dispatch.route(logits, "softmax_topk", 3, 1)
    torch.testing.assert_close(st["gate_A"].view(10, 3), probs.topk(3, -1).values)
    rn = dispatch.route(logits, "softmax_topk", 3, 1, renorm=True)
    torch.testing.assert_close(rn["gates_NE"].sum(-1), torch.ones(10))
    noiseless = dispatch.route(logits, "noisy_topk", 2, 1)
    torch.testing.assert_close(noiseless["gates_NE"], top["gates_NE"])
    ec = dispatch.route(logits, "expert_choice", 2, 2, capacity_factor=1.0)  # 2 sequences of 5
    C = dispatch.capacity(5, 6, 2, 1.0)
    assert torch.equal(torch.bincount(ec["exp_A"], minlength=6), torch.full((6,), 2 * C))
    for b in range(2):  # each expert takes its C highest-scoring tokens of each sequence
        sel = (ec["tok_A"] // 5) == b
        for e in range(6):
            toks = ec["tok_A"][sel & (ec["exp_A"] == e)] - 5 * b
            assert set(toks.tolist()) == set(probs[5 * b : 5 * b + 5, e].topk(C).indices.tolist())


def test_load_balance_loss_closed_form():
    # 4 tokens, 2 experts, top-1: tokens 0-2 pick expert 0, token 3 picks expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    chosen = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    f, P = [3 / 4, 1 / 4], [(0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4]
    want = 2 * (f[0] * P[0] + f[1] * P[1])
    assert float(dispatch.load_balance_loss(probs, chosen)) == pytest.approx(want)
    # Top-2 of 3: f counts all 2N choices.
    chosen2 = torch.tensor([[1.0, 1, 0], [1, 0, 1]])
    probs2 = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    want2 = 3 * (0.5 * 0.55 + 0.25 * 0.2 + 0.25 * 0.25)
    assert float(dispatch.load_balance_loss(probs2, chosen2)) == pytest.approx(want2)


def test_load_balance_loss_minimum_at_uniform():
    E, N = 8, 64
    uniform = torch.full((N, E), 1 / E)
    chosen = torch.zeros(N, E).scatter(1, torch.arange(N)[:, None] % E, 1.0)
    assert float(dispatch.load_balance_loss(uniform, chosen)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # when routing follows the probabilities (f = P) the loss is E |f|^2 >= 1
        p_E = torch.rand(E, generator=g).softmax(0)
        probs = p_E.expand(N, E)
        loss = dispatch.load_balance_loss(probs, p_E.expand(N, E))
        assert float(loss) == pytest.approx(E * float((p_E**2).sum()))
        assert float(loss) > 1.0


def test_z_loss_and_cv_closed_forms():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert float(dispatch.z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    assert float(dispatch.cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(1 / 4)
    assert float(dispatch.cv_squared(torch.ones(5))) == pytest.approx(0.0)


def test_noisy_load_estimate_is_differentiable():
    logits = torch.randn(20, 4, requires_grad=True)
    noise = torch.full((20, 4), 0.5, requires_grad=True)
    r = dispatch.route(logits, "noisy_topk", 2, 1, noise_std_NE=noise)
    assert float(r["load_E"].detach().sum()) == pytest.approx(2 * 20, rel=0.5)
    (gl, gn) = torch.autograd.grad(dispatch.importance_load_loss(r["gates_NE"], r["load_E"]), (logits, noise))
    assert gl.abs().sum() > 0 and gn.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_dispatch_on_cuda(layout):
    """On a GPU, under bf16 autocast as training runs: each layout equals the loop, and experts that
    got no token get exactly zero weight gradients (pytorch/pytorch#172439: grouped_mm on B200)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    N, E, D, Fe, used = 64, 6, 32, 16, [0, 2, 5]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N, D, generator=g).cuda().requires_grad_()
    w_up = (torch.randn(E, D, 2 * Fe, generator=g) / 4).cuda().requires_grad_()
    w_down = (torch.randn(E, Fe, D, generator=g) / 4).cuda().requires_grad_()
    tok, exp, gate = (t.cuda() for t in _assignments(N, E, 100, used, seed=10))
    gate = gate.detach().float().requires_grad_()
    res = []
    for fn in (_fast(layout), dispatch.expert_mlp_ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, w_up, w_down, tok, exp, gate)
        res.append((y, *torch.autograd.grad(y.square().sum(), (x, w_up, w_down, gate))))
    for name, a, b in zip(("y", "x", "w_up", "w_down", "gate"), *res, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.detach().abs().max()), msg=name)
    empty = [e for e in range(E) if e not in used]
    assert torch.all(res[0][2][empty] == 0) and torch.all(res[0][3][empty] == 0)


def test_default_layout(monkeypatch):
    """ "auto" runs grouped on CPU; on CUDA grouped_mm only where its kernel needs no host sync
    (bf16, SM 9.0 or 10.x, 16-byte rows, the function present), else padded."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert dispatch.default_layout(cpu, torch.bfloat16, 32, 64) == "grouped"
    assert dispatch.default_layout(cuda, torch.bfloat16, 32, 64) == "grouped_mm"
    assert dispatch.default_layout(cuda, torch.float32, 32, 64) == "padded"  # torch's fallback loop syncs
    assert dispatch.default_layout(cuda, torch.bfloat16, 36, 64) == "padded"  # rows not 16-byte aligned
    for cap, want in [
        ((10, 0), "grouped_mm"),
        ((10, 3), "grouped_mm"),
        ((8, 0), "padded"),
        ((12, 0), "padded"),
    ]:
        capability[0] = cap
        assert dispatch.default_layout(cuda, torch.bfloat16, 32, 64) == want, cap
    capability[0] = (9, 0)
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    assert dispatch.default_layout(cuda, torch.bfloat16, 32, 64) == "padded"
    with pytest.raises(ValueError, match="lacks"):
        dispatch.expert_mlp(
            torch.zeros(2, 8),
            torch.zeros(2, 8, 16),
            torch.zeros(2, 8, 8),
            *[torch.zeros(0)] * 3,
            "grouped_mm",
        )
