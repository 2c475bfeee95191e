"""Sparse Mixture-of-Experts routing and dispatch.

Shape legend: B batch, T time, N tokens (B*T), D d_model, E experts, K experts per token (top_k),
C expert capacity (slots per expert per sequence), F expert hidden width, H = 2F (gate and up
projections of a SwiGLU expert, stored side by side), A routed (token, expert) assignments.

Routing produces a flat list of assignments `(tok_A, exp_A, gate_A)`: token `tok_A[a]` goes to
expert `exp_A[a]` and its output is scaled by `gate_A[a]`. Every router (token choice, expert
choice, with or without capacity) reduces to this list, so one dispatch serves them all:

    y[t] = sum over a with tok_A[a] = t of gate_A[a] * Expert_{exp_A[a]}(x[t])     (Shazeer et al. 2017, eq. 1)

`expert_mlp` (fast: sort by expert, then one of three layouts, see `default_layout`) and
`expert_mlp_ref` (the loop above, one expert at a time) compute the same thing. `capacity_keep`
decides which assignments fit into an expert's capacity; `capacity_keep_ref` is its loop twin.

Static shapes. `route` returns lists whose length depends only on the shapes (N K for token
choice, B E C for expert choice), never on the routing: selecting the kept assignments would size a
tensor from data, which on CUDA waits for the GPU (a host sync) in every MoE layer. A dropped
assignment stays in the list with the expert index E, meaning no expert, and gate 0. Host syncs
that remain, by layout: "grouped" reads the expert counts (one per call; CPU only, where a sync
costs nothing); "padded" reads the slab height and the most rows one token reads (two), unless the
caller passes `max_load`, a static bound such as capacity gives; "grouped_mm" none, where its
CUDA kernel runs (bf16 on SM 9.0 or 10.x: elsewhere torch's own fallback copies the offsets to
the host).

Capacity priority rule: within one sequence, assignments are served in position order (token t
before t+1), and a token's first choice before its second. An expert accepts assignments until it
holds C of them; later ones are dropped and the token keeps only its residual for that choice.
Because the rule looks only at earlier positions, dropping stays causal. (Priority by router
score, "batch prioritized routing", would let a future token evict a past one.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOKEN_ROUTERS = ("topk_softmax", "softmax_topk", "switch", "noisy_topk", "sigmoid_topk")
ROUTERS = (*TOKEN_ROUTERS, "expert_choice")
BIASED_ROUTERS = ("topk_softmax", "softmax_topk", "switch", "sigmoid_topk")  # may take a loss-free bias
LAYOUTS = ("auto", "grouped", "padded", "grouped_mm")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def capacity(tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert for a group of `tokens` tokens (Fedus et al. 2021): cf * tokens * k / E."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / n_experts))


def capacity_keep(exp_BTK: torch.Tensor, n_experts: int, cap: int) -> torch.Tensor:
    """Which assignments fit, under the position-order priority rule (module docstring)."""
    B, T, K = exp_BTK.shape
    exp_BA = exp_BTK.reshape(B, T * K)  # assignments in (t, k) order
    # a comparison, not F.one_hot: one_hot checks the class range with .item() on CPU
    onehot_BAE = exp_BA[..., None] == torch.arange(n_experts, device=exp_BA.device)
    seen_BAE = onehot_BAE.cumsum(1, dtype=torch.int32)
    pos_BA = seen_BAE.gather(-1, exp_BA[..., None]).squeeze(-1) - 1  # rank of each assignment at its expert
    return (pos_BA < cap).view(B, T, K)


def load_bound(
    router: str, tokens: int, batch: int, n_experts: int, top_k: int, capacity_factor: float
) -> int | None:
    """The most assignments `route` can give one expert over `batch` sequences of `tokens` tokens:
    B C under a capacity (expert choice always has one, and fills it), None when dropless."""
    if router == "expert_choice":
        return batch * min(tokens, capacity(tokens, n_experts, top_k, capacity_factor or 1.0))
    if capacity_factor > 0:
        return batch * capacity(tokens, n_experts, top_k, capacity_factor)
    return None


def capacity_keep_ref(exp_BTK: torch.Tensor, n_experts: int, cap: int) -> torch.Tensor:
    B, T, K = exp_BTK.shape
    keep = torch.zeros(B, T, K, dtype=torch.bool)
    for b in range(B):
        used = [0] * n_experts
        for t in range(T):
            for k in range(K):
                e = int(exp_BTK[b, t, k])
                if used[e] < cap:
                    keep[b, t, k] = True
                    used[e] += 1
    return keep.to(exp_BTK.device)


def _swiglu(h_XH: torch.Tensor) -> torch.Tensor:
    g, u = h_XH.chunk(2, dim=-1)
    return F.silu(g) * u


class _RowGather(torch.autograd.Function):
    """out[m] = sum_j src[fwd_MJ[m, j]], where index S (one past the last row) reads a zero row.

    The backward is the same operation with the transposed table `bwd_SJ` (for each source row,
    the output rows that read it), so both directions are plain gathers. Autograd's own backward of
    an index gather is a scatter-add, which on CPU was the largest cost of the whole dispatch
    (about a third of forward+backward time at 8 experts)."""

    @staticmethod
    def forward(ctx, src_SD: torch.Tensor, fwd_MJ: torch.Tensor, bwd_SJ: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bwd_SJ)
        return _gather_sum(src_SD, fwd_MJ)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        (bwd_SJ,) = ctx.saved_tensors
        return _gather_sum(grad_MD.contiguous(), bwd_SJ), None, None


def _gather_sum(src_SD: torch.Tensor, idx_MJ: torch.Tensor) -> torch.Tensor:
    pad = torch.cat([src_SD, src_SD.new_zeros(1, src_SD.shape[1])])
    if idx_MJ.shape[1] == 1:
        return pad.index_select(0, idx_MJ[:, 0])
    return pad.index_select(0, idx_MJ.reshape(-1)).view(*idx_MJ.shape, -1).sum(1)


def _inverse_table(rows_A: torch.Tensor, n_rows: int, vals_A: torch.Tensor, pad: int) -> torch.Tensor:
    """(n_rows, J) table listing, for each row, the `vals_A` of the assignments in it (pad elsewhere)."""
    order = torch.argsort(rows_A, stable=True)
    rows_s, vals_s = rows_A[order], vals_A[order]
    counts = torch.bincount(rows_s, minlength=n_rows)
    J = max(1, int(counts.max()))
    rank = torch.arange(rows_s.numel(), device=rows_s.device) - (counts.cumsum(0) - counts)[rows_s]
    table = torch.full((n_rows, J), pad, dtype=torch.long, device=rows_s.device)
    table[rows_s, rank] = vals_s
    return table


def expert_mlp(
    x_ND: torch.Tensor,
    w_up_EDH: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tok_A: torch.Tensor,
    exp_A: torch.Tensor,
    gate_A: torch.Tensor,
    layout: str = "auto",
    max_load: int | None = None,
) -> torch.Tensor:
    """Fast dispatch. `layout` "grouped" runs each expert's matmuls on its contiguous segment of the
    expert-sorted assignments, with a hand-written backward; "padded" packs the segments into a
    zero-padded (E, L, D) slab and runs batched matmuls, a few large kernels instead of 6 E small
    ones; "grouped_mm" runs the segments through `torch.nn.functional.grouped_mm` (CUTLASS grouped
    GEMM on CUDA), with no padding. "auto" is `default_layout`. `max_load`, if given, must bound
    every expert's assignments (`load_bound`): the padded slab then has that static height. An
    assignment with exp_A = E (dropped) reaches no expert. All three are tested against the loop
    on CPU; on CUDA by the tests marked gpu."""
    ct = _compute_dtype(x_ND, w_up_EDH, w_down_EFD)
    layout = pick_layout(layout, x_ND, w_up_EDH, w_down_EFD)
    E, F_, D = w_down_EFD.shape
    if layout == "grouped_mm":
        check_grouped_mm(D, F_, ct)
    if tok_A.numel() == 0:
        return torch.zeros_like(x_ND) + 0 * (w_up_EDH.sum() + w_down_EFD.sum())  # keep grads defined
    if layout == "padded":
        return _expert_mlp_padded(x_ND, w_up_EDH, w_down_EFD, tok_A, exp_A, gate_A, max_load)
    if layout == "grouped_mm":
        return _expert_mlp_grouped_mm(x_ND, w_up_EDH, w_down_EFD, tok_A, exp_A, gate_A, ct)
    counts = torch.bincount(exp_A, minlength=E).tolist()[:E]  # the one host sync; [E] counts the dropped
    order_A = torch.argsort(exp_A, stable=True)[: sum(counts)]
    if not order_A.numel():
        return expert_mlp(x_ND, w_up_EDH, w_down_EFD, tok_A[:0], exp_A[:0], gate_A[:0], layout)
    return _GroupedExperts.apply(x_ND, w_up_EDH, w_down_EFD, gate_A[order_A], tok_A[order_A], counts, ct)


def _compute_dtype(x_ND: torch.Tensor, w_up_EDH: torch.Tensor, w_down_EFD: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's, else the inputs' promoted dtype."""
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x_ND.dtype, torch.promote_types(w_up_EDH.dtype, w_down_EFD.dtype))


def pick_layout(layout: str, x_ND: torch.Tensor, w_up_EDH: torch.Tensor, w_down_EFD: torch.Tensor) -> str:
    """The layout `expert_mlp` runs on these inputs: `layout`, with "auto" resolved by `default_layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    _, F_, D = w_down_EFD.shape
    return default_layout(x_ND.device, _compute_dtype(x_ND, w_up_EDH, w_down_EFD), D, F_)


def default_layout(device: torch.device, dtype: torch.dtype, d_model: int, d_expert: int) -> str:
    """The layout "auto" runs for matmuls in `dtype`: "grouped" on CPU (fastest there, and a host
    sync costs nothing); elsewhere "grouped_mm" where torch's grouped GEMM kernel runs without a
    host sync (it has one, and the matmuls are bf16 on SM 9.0 or 10.x, in 16-byte rows), else
    "padded"."""
    if device.type == "cpu":
        return "grouped"
    if device.type == "cuda" and grouped_mm_is_sync_free(device, dtype, d_model, d_expert):
        return "grouped_mm"
    return "padded"


def grouped_mm_is_sync_free(device: torch.device, dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    """Whether `F.grouped_mm` runs its CUTLASS kernel here. torch 2.13 takes that path for bf16 on
    SM 9.0 and 10.x only; any other case loops over groups after copying the offsets to the host."""
    if not hasattr(F, "grouped_mm") or dtype != torch.bfloat16 or d_model % 8 or d_expert % 8:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) == (9, 0) or major == 10


def check_grouped_mm(d_model: int, d_expert: int, dtype: torch.dtype) -> None:
    """grouped_mm's limits (torch 2.13): the function itself, fp32, bf16 or fp16 operands (CUDA
    kernels: bf16), every row a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        raise ValueError(
            f"the grouped_mm dispatch needs torch.nn.functional.grouped_mm, which torch {torch.__version__} "
            "lacks; use the grouped or padded layout, or a newer torch"
        )
    if dtype not in GROUPED_MM_DTYPES:
        raise ValueError(f"the grouped_mm dispatch needs fp32, bf16 or fp16 matmuls, got {dtype}")
    row = 16 // dtype.itemsize
    if d_model % row or d_expert % row:
        raise ValueError(
            f"the grouped_mm dispatch needs d_model and d_expert divisible by {row} in {dtype} "
            f"(16-byte rows), got d_model={d_model}, d_expert={d_expert}"
        )


def _expert_mlp_grouped_mm(x_ND, w_up_EDH, w_down_EFD, tok_A, exp_A, gate_A, ct) -> torch.Tensor:
    """Expert-sorted rows through two grouped GEMMs; autograd differentiates grouped_mm itself
    (the weight gradients are grouped GEMMs over the same offsets). The offsets come from a
    search in the sorted experts, which has a static shape: no host sync (`bincount` would sync
    on CUDA). Upstream pytorch/pytorch#172439 (open): on B200 GPUs grouped_mm gives experts with no
    tokens non-zero weight gradients; `test_fast_dispatch_on_cuda` checks for that on a GPU."""
    E = w_up_EDH.shape[0]
    order_A = torch.argsort(exp_A, stable=True)
    exp_s, tok_s, gate_s = exp_A[order_A], tok_A[order_A], gate_A[order_A]
    # Dropped rows (expert E, sorted last) ride in the last group with a zero gate: grouped_mm leaves
    # rows past the last offset unwritten, and garbage times zero can be NaN. A zero gate makes their
    # output and every gradient through them exactly zero.
    gate_s = torch.where(exp_s < E, gate_s, 0.0)
    experts = torch.arange(E, device=exp_A.device, dtype=exp_A.dtype)
    offs_E = torch.searchsorted(exp_s.clamp_max(E - 1), experts, right=True).to(torch.int32)  # group ends
    acc = torch.promote_types(x_ND.dtype, torch.float32)
    with torch.autocast(x_ND.device.type, enabled=False):
        xs_AD = x_ND.index_select(0, tok_s).to(ct)
        h_AH = F.grouped_mm(xs_AD, w_up_EDH.to(ct), offs=offs_E)
        o_AD = F.grouped_mm(_swiglu(h_AH), w_down_EFD.to(ct), offs=offs_E)
        y_ND = torch.zeros(x_ND.shape, dtype=acc, device=x_ND.device)
        y_ND = y_ND.index_add(0, tok_s, o_AD.to(acc) * gate_s.to(acc)[:, None])
    return y_ND.to(x_ND.dtype)


class _GroupedExperts(torch.autograd.Function):
    """y = scatter_add over sorted assignments of gate * SwiGLU_e(x[tok]), experts run on
    contiguous segments of the expert-sorted rows (a grouped matmul written as a loop of `mm`).

    Why by hand on CPU (measured at 4096 tokens, d 256, d_ff 512, top-2, 64 experts, 2 cores):
    - The reference spends much of its step outside matmuls, mostly in autograd filling a zero
      (N, D) gradient per expert for `x[tok]` and copying it. Here the backward does one gather of
      dy and one scatter-add into dx and writes weight gradients straight into (E, ...) buffers.
    - Activations are one tensor per expert, not slices of one (A, 2F) buffer: on this VM a fresh
      buffer of 32 MiB or more comes from mmap and page-faults on every step (glibc's largest
      mmap threshold), which cost ~10 ms a step per buffer in fp32. Per-expert tensors are reused
      from the heap.
    - One (n, D) x (D, 2F) matmul per expert for gate and up together. In bf16 the whole step
      measured 11% slower with two matmuls on contiguous halves of the weight, and 44% slower on
      strided halves (a prototype of this loop, 64 experts).
    - Under bf16 autocast each expert's weights are cast once in the forward and kept for the
      backward (as autocast's cache does for nn.Linear), and weight gradients are written into
      buffers of the parameters' dtype.
    - `torch.nn.functional.grouped_mm` runs on CPU in torch 2.13 but measured slower than this
      loop (fp32 77 vs 108 GFLOP/s; bf16 9.4 vs 8.2 ms for the up projection) and rejects fp64.

    Matmuls run in `ct` (the autocast dtype, else the inputs' promoted dtype); the gated combine
    accumulates in at least fp32, as the reference does."""

    @staticmethod
    def forward(ctx, x_ND, w_up_EDH, w_down_EFD, gate_A, tok_A, counts, ct):
        F_ = w_down_EFD.shape[1]
        acc = torch.promote_types(x_ND.dtype, torch.float32)
        with torch.autocast(x_ND.device.type, enabled=False):
            xs_AD = x_ND.index_select(0, tok_A).to(ct)
            A, D = xs_AD.shape
            o_AD = xs_AD.new_empty(A, D)
            per_expert = []  # (w_up, w_down, h) of each non-empty segment
            for e, s0, s1 in _segments(counts):
                w_up, w_down = w_up_EDH[e].to(ct), w_down_EFD[e].to(ct)  # views unless autocast
                h = torch.mm(xs_AD[s0:s1], w_up)
                torch.mm(F.silu(h[:, :F_]).mul_(h[:, F_:]), w_down, out=o_AD[s0:s1])
                per_expert += (w_up, w_down, h)
            y_ND = torch.zeros(x_ND.shape, dtype=acc, device=x_ND.device)
            y_ND.scatter_add_(0, tok_A[:, None].expand(A, D), o_AD.to(acc) * gate_A.to(acc)[:, None])
        ctx.save_for_backward(w_up_EDH, w_down_EFD, gate_A, tok_A, xs_AD, o_AD, *per_expert)
        ctx.counts, ctx.x_dtype = counts, x_ND.dtype
        return y_ND.to(x_ND.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):
        w_up_EDH, w_down_EFD, gate_A, tok_A, xs_AD, o_AD, *per_expert = ctx.saved_tensors
        counts, x_dt = ctx.counts, ctx.x_dtype
        F_ = w_down_EFD.shape[1]
        A, D = xs_AD.shape
        ct = xs_AD.dtype
        acc = torch.promote_types(dy_ND.dtype, torch.float32)
        dy_AD = dy_ND.index_select(0, tok_A).to(acc)
        dgate_A = (dy_AD * o_AD.to(acc)).sum(-1).to(gate_A.dtype)
        do_AD = (dy_AD * gate_A.to(acc)[:, None]).to(ct)
        del dy_AD
        dw_up, dw_down = torch.empty_like(w_up_EDH), torch.empty_like(w_down_EFD)
        for e, n in enumerate(counts):
            if not n:  # an expert with no tokens gets zero gradients
                dw_up[e].zero_()
                dw_down[e].zero_()
        need_dx = ctx.needs_input_grad[0]
        dxs_AD = xs_AD.new_empty(A, D) if need_dx else None
        for i, (e, s0, s1) in enumerate(_segments(counts)):
            w_up, w_down, h = per_expert[3 * i : 3 * i + 3]
            do, xs = do_AD[s0:s1], xs_AD[s0:s1]
            g, u = h[:, :F_], h[:, F_:]
            silu_g = F.silu(g)  # recomputed: saving act would cost another (A, F) of memory
            _mm_into((silu_g * u).t(), do, dw_down[e])
            dact = torch.mm(do, w_down.t())
            # SwiGLU backward: d act / d u = silu(g), d act / d g = u silu'(g)
            dh = torch.empty_like(h)
            torch.ops.aten.silu_backward(dact * u, g, grad_input=dh[:, :F_])
            torch.mul(silu_g, dact, out=dh[:, F_:])
            _mm_into(xs.t(), dh, dw_up[e])
            if need_dx:
                torch.mm(dh, w_up.t(), out=dxs_AD[s0:s1])
        dx_ND = None
        if need_dx:
            dx_ND = torch.zeros(dy_ND.shape, dtype=acc, device=dy_ND.device)
            dx_ND = dx_ND.scatter_add_(0, tok_A[:, None].expand(A, D), dxs_AD.to(acc)).to(x_dt)
        return dx_ND, dw_up, dw_down, dgate_A, None, None, None


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a b, straight into `out`, or through a temporary when `out` holds another dtype
    (bf16 matmuls under autocast, fp32 weight gradients)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _segments(counts: list[int]):
    """(expert, start, end) of each non-empty segment of the expert-sorted assignments."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _expert_mlp_padded(
    x_ND: torch.Tensor,
    w_up_EDH: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tok_A: torch.Tensor,
    exp_A: torch.Tensor,
    gate_A: torch.Tensor,
    max_load: int | None,
) -> torch.Tensor:
    """Sort assignments by expert, pack each expert's tokens into a padded slab (E, L, D), run the
    SwiGLU experts as two batched matmuls, and sum each token's gated rows back. Padding rows are
    zeros and cost only FLOPs. L is `max_load` when given (static shapes throughout), else the
    largest expert load, read from the data with a second sync (the most assignments of one token)
    that sizes gathers whose backward is a gather too (`_RowGather`, faster on CPU)."""
    N, D = x_ND.shape
    E = w_up_EDH.shape[0]
    dev = x_ND.device
    order_A = torch.argsort(exp_A, stable=True)
    exp_s, tok_s, gate_s = exp_A[order_A], tok_A[order_A], gate_A[order_A]
    start_E1 = torch.searchsorted(exp_s, torch.arange(E + 1, device=dev, dtype=exp_s.dtype))  # [E]: dropped
    L = max_load if max_load is not None else max(1, int((start_E1[1:] - start_E1[:-1]).max()))
    R = E * L  # slab rows; row R is a zero row, where dropped assignments point
    rank_A = torch.arange(exp_s.numel(), device=dev) - start_E1[exp_s]
    row_A = torch.where(exp_s < E, exp_s * L + rank_A, R)
    src_R = torch.full((R + 1,), N, dtype=torch.long, device=dev).scatter(0, row_A, tok_s)[:R]  # N: pad
    if max_load is not None:
        slab_RD = torch.cat([x_ND, x_ND.new_zeros(1, D)]).index_select(0, src_R)
        out_ELD = torch.bmm(_swiglu(torch.bmm(slab_RD.view(E, L, D), w_up_EDH)), w_down_EFD)
        out_AD = torch.cat([out_ELD.reshape(R, D), out_ELD.new_zeros(1, D)]).index_select(0, row_A)
        acc = torch.promote_types(x_ND.dtype, torch.float32)
        y_ND = torch.zeros(N, D, dtype=acc, device=dev)
        return y_ND.index_add(0, tok_s, out_AD.to(acc) * gate_s.to(acc)[:, None]).to(x_ND.dtype)
    rows_NJ = _inverse_table(tok_s, N, row_A, pad=R)
    slab_ELD = _RowGather.apply(x_ND, src_R[:, None], rows_NJ).view(E, L, D)
    out_ELD = torch.bmm(_swiglu(torch.bmm(slab_ELD, w_up_EDH)), w_down_EFD)
    gate_R = gate_s.new_zeros(R + 1).index_copy(0, row_A, gate_s)[:R]
    out_RD = out_ELD.reshape(R, D) * gate_R.to(out_ELD.dtype)[:, None]
    # under autocast the matmuls ran in bf16
    return _RowGather.apply(out_RD, rows_NJ, src_R[:, None]).to(x_ND.dtype)


def expert_mlp_ref(
    x_ND: torch.Tensor,
    w_up_EDH: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tok_A: torch.Tensor,
    exp_A: torch.Tensor,
    gate_A: torch.Tensor,
) -> torch.Tensor:
    """Loop over experts: each expert runs on the tokens routed to it (fp32, or fp64 if given)."""
    ct = torch.promote_types(x_ND.dtype, torch.float32)
    x = x_ND.to(ct)
    y_ND = torch.zeros_like(x)
    # unbind, not w[e]: indexing one expert per step would materialise a full-size gradient of the
    # stacked weights for every expert in the backward pass.
    for e, (w_up_DH, w_down_FD) in enumerate(
        zip(w_up_EDH.to(ct).unbind(0), w_down_EFD.to(ct).unbind(0), strict=True)
    ):
        sel = exp_A == e
        tok = tok_A[sel]
        h = x[tok] @ w_up_DH
        out = _swiglu(h) @ w_down_FD
        y_ND = y_ND.index_add(0, tok, out * gate_A[sel].to(ct)[:, None])
    return y_ND.to(x_ND.dtype)


def route(
    logits_NE: torch.Tensor,
    router: str,
    top_k: int,
    batch: int,
    capacity_factor: float = 0.0,
    renorm: bool = False,
    noise_std_NE: torch.Tensor | None = None,
    select_bias_E: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Router math in fp32. Returns the assignments (tok_A, exp_A, gate_A; a dropped one has
    exp_A = E and gate 0, so the lengths do not depend on the routing) and the routing
    statistics the aux losses and metrics need: probs_NE (softmax of the clean logits; for
    sigmoid_topk the sigmoid scores normalised to sum to 1 per token, as DeepSeek-V3's balance loss),
    chosen_NE (1 where a token chose an expert, before capacity), gates_NE (gate values, 0 where
    not chosen), load_E (Shazeer's load: smooth estimate for noisy gating, hard counts otherwise)
    and dropped_frac.

    topk_softmax (Mixtral, Jiang et al. 2024): top-k of the logits, softmax over the k chosen.
    softmax_topk (GShard / DeepSeekMoE): softmax over all experts, keep the top k, optionally renormalise.
    switch (Fedus et al. 2021): top-1 of the softmax, output scaled by that probability.
    noisy_topk (Shazeer et al. 2017): H = logits + N(0,1) * softplus(x W_noise) while training,
        KeepTopK(H, k), softmax over the kept k.
    sigmoid_topk (DeepSeek-V3, 2024): scores s = sigmoid(logits), top k of s, gates s normalised
        over the k chosen (always: `renorm` is for softmax_topk).
    expert_choice (Zhou et al. 2022): softmax over experts, then each expert takes the C tokens of
        a sequence with the highest score for it, C = cf * T * k / E. Looks across the sequence.

    select_bias_E (loss-free balancing, Wang et al. 2024; the routers in BIASED_ROUTERS): the k
    experts are the top k of affinity + bias instead, the affinity being the softmax probability
    (the sigmoid score for sigmoid_topk); gate values still come from the unbiased scores, so the
    bias steers only which experts a token visits, and no gradient flows through it.
    """
    N, E = logits_NE.shape
    T = N // batch
    logits = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32))  # fp32 at least
    if router == "sigmoid_topk":
        affinity = logits.sigmoid()
        probs = affinity / affinity.sum(-1, keepdim=True)
    else:
        affinity = probs = logits.softmax(-1)
    dev = logits.device
    if select_bias_E is not None and router not in BIASED_ROUTERS:
        raise ValueError(
            f"a selection bias needs one of the routers {', '.join(BIASED_ROUTERS)}, got {router!r}"
        )
    out: dict[str, torch.Tensor] = {"probs_NE": probs}
    if router == "expert_choice":
        C = min(T, capacity(T, E, top_k, capacity_factor or 1.0))
        scores_BET = probs.view(batch, T, E).transpose(1, 2)
        g_BEC, t_BEC = scores_BET.topk(C, dim=-1)
        tok_A = (t_BEC + torch.arange(batch, device=dev).view(batch, 1, 1) * T).reshape(-1)
        exp_A = torch.arange(E, device=dev).view(1, E, 1).expand(batch, E, C).reshape(-1)
        gate_A = g_BEC.reshape(-1)
        chosen = logits.new_zeros(batch, E, T).scatter(-1, t_BEC, 1.0).transpose(1, 2).reshape(N, E)
        out.update(tok_A=tok_A, exp_A=exp_A, gate_A=gate_A, chosen_NE=chosen)
        out["gates_NE"] = probs * chosen
        out["load_E"] = chosen.sum(0)
        out["dropped_frac"] = (chosen.sum(-1) == 0).float().mean()  # tokens no expert took
        return out
    if router == "switch" and top_k != 1:
        raise ValueError("the switch router is top-1")
    select = logits
    if router == "noisy_topk" and noise_std_NE is not None:
        noise_std_NE = noise_std_NE.to(logits.dtype)
        select = logits + torch.randn_like(logits) * noise_std_NE
    if select_bias_E is None:
        top_v_NK, exp_NK = select.topk(top_k, dim=-1)
    else:
        exp_NK = (affinity + select_bias_E.to(affinity.dtype)).topk(top_k, dim=-1).indices
        top_v_NK = logits.gather(-1, exp_NK)
    if router in ("topk_softmax", "noisy_topk"):
        gate_NK = top_v_NK.softmax(-1)
    elif router in ("softmax_topk", "switch"):
        gate_NK = probs.gather(-1, exp_NK)
        if renorm and router == "softmax_topk":
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
    elif router == "sigmoid_topk":
        gate_NK = affinity.gather(-1, exp_NK)
        gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)
    else:
        raise ValueError(f"unknown router {router!r}; known: {', '.join(ROUTERS)}")
    chosen = logits.new_zeros(N, E).scatter(1, exp_NK, 1.0)
    out["chosen_NE"] = chosen
    out["gates_NE"] = logits.new_zeros(N, E).scatter(1, exp_NK, gate_NK)
    if router == "noisy_topk" and noise_std_NE is not None and top_k < E:
        # Shazeer et al. 2017, appendix A: P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_i),
        # a differentiable estimate of how likely expert i stays in the top k under fresh noise.
        top_k1, _ = select.topk(top_k + 1, dim=-1)
        in_top = select >= top_k1[:, top_k - 1 : top_k]
        threshold = torch.where(in_top, top_k1[:, top_k : top_k + 1], top_k1[:, top_k - 1 : top_k])
        # the normal CDF written out: torch.distributions validates its argument with a host sync
        z = (logits - threshold) / noise_std_NE
        out["load_E"] = (0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(0)
    else:
        out["load_E"] = chosen.sum(0)
    tok_NK = torch.arange(N, device=dev)[:, None].expand(N, top_k)
    if capacity_factor > 0:
        cap = capacity(T, E, top_k, capacity_factor)
        keep_NK = capacity_keep(exp_NK.view(batch, T, top_k), E, cap).view(N, top_k)
        out["dropped_frac"] = 1.0 - keep_NK.float().mean()
        exp_NK = torch.where(keep_NK, exp_NK, E)  # E: dropped (module docstring, static shapes)
        gate_NK = torch.where(keep_NK, gate_NK, 0.0)
    else:
        out["dropped_frac"] = logits.new_zeros(())
    out.update(tok_A=tok_NK.reshape(-1), exp_A=exp_NK.reshape(-1), gate_A=gate_NK.reshape(-1))
    return out


def load_balance_loss(probs_NE: torch.Tensor, chosen_NE: torch.Tensor, reduce=None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_i f_i P_i with
    f_i the fraction of routing choices that picked expert i (top-k: divided by N k) and P_i the
    mean router probability of expert i. Equals 1 at uniform routing, its minimum when f = P.
    `reduce` sums the choice counts over data-parallel ranks (f carries no gradient), so the mean
    of the ranks' losses is the loss of their union."""
    E = probs_NE.shape[-1]
    counts_E = chosen_NE.sum(0).float()
    if reduce is not None:
        counts_E = reduce(counts_E.detach())
    f_E = counts_E / counts_E.sum()
    P_E = probs_NE.mean(0)
    return E * (f_E * P_E).sum()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / mean^2 (population variance), as Shazeer et al. use."""
    v = v_E.float()
    return v.var(unbiased=False) / (v.mean().square() + 1e-10)


def importance_load_loss(gates_NE: torch.Tensor, load_E: torch.Tensor, reduce=None) -> torch.Tensor:
    """Shazeer et al. 2017, eqs. 6-7 and 10: CV(Importance)^2 + CV(Load)^2, with importance the
    summed gate values per expert. `reduce` sums both over data-parallel ranks, gradients
    included, so the loss is the global batch's, as one process would see it."""
    importance_E = gates_NE.sum(0)
    if reduce is not None:
        importance_E, load_E = reduce(importance_E), reduce(load_E)
    return cv_squared(importance_E) + cv_squared(load_E)
