"""The WKV recurrences of RWKV-6 (Peng et al. 2024) and RWKV-7 (Peng et al. 2025).

Shape legend: B batch, H heads, T time, L chunk length, N number of chunks, K key (= receptance)
dim, V value dim (K = V = head size in RWKV), C channels.

RWKV-6 (paper eq. for wkv_t; state S is K x V, key-major as the paper writes k^T v):
    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),    S_t = diag(w_t) S_{t-1} + k_t^T v_t
RWKV-7 (paper eq. 15-17; state S is V x K, as the paper writes v^T k):
    S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,    o_t = S_t r_t^T
Decays enter every function as `logw` = log(w_t) <= 0, so no function takes a log of a decay.

Three forms per version, same arguments, same return values `(o, final state)`:
- `wkv*_ref`: the paper's loop over time in fp32, written with elementwise products and sums (no
  matmuls, so FlopCounterMode sees none of the recurrence; its cost is the `ew_wkv` FLOP part).
- `wkv*_recurrent`: the same loop at the input dtype, for step-by-step generation.
- `wkv*_chunked`: the chunked parallel form for training on any device. Within a chunk of L steps
  the pairwise decays prod_{s<j<=t} w_j enter as matmuls of factors centred on the chunk's middle,
  which stay in range while a chunk's total log-decay is above -60 (always, for RWKV-7's decay);
  past that, the pairwise decays are formed as an (L, L, K) tensor of non-positive exponents.
  Chunks are joined by a loop over the T / L chunk states: one elementwise update (RWKV-6) or one
  (V x K) @ (K x K) product (RWKV-7) per chunk. Measured on 1 CPU thread, B 2, C 256, head 64,
  T 1024, forward+backward: ~100x (RWKV-6) and ~12x (RWKV-7) the reference loop
  (benchmarks/bench_wkv.py).
`wkv6` / `wkv7` take a backend: "torch" (chunked), "cuda" (flash-linear-attention, extra `cuda`)
or "auto" (`pick_backend`: fla on CUDA tensors when it imports, otherwise chunked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.ops import kernels

BACKENDS = ("torch", "cuda", "auto")
_FLA_HINT = (
    "RWKV runs the chunked PyTorch WKV. To use flash-linear-attention's kernels, install a version "
    "that imports with this torch and triton: pip install -e '.[cuda]'"
)
# The dtypes flash-linear-attention's Triton kernels take.
_FLA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend must be one of {BACKENDS}, got {backend!r}")


def pick_backend(backend: str, x: torch.Tensor, version: int) -> str:
    """ "torch" (chunked) | "cuda" (flash-linear-attention). "auto" takes fla for CUDA tensors of
    fp32, fp16 or bf16 when its `fla.ops.rwkv<version>` imports; an fla that is installed but does
    not import warns once and falls back."""
    _check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto" and not (x.is_cuda and x.dtype in _FLA_DTYPES):
        return "torch"
    found = kernels.find(f"fla.ops.rwkv{version}", "fla", _FLA_HINT) is not None
    if backend == "auto":
        return "cuda" if found else "torch"
    if not found:
        raise ImportError("backend='cuda' needs flash-linear-attention: pip install 'harness[cuda]'")
    if not (x.is_cuda and x.dtype in _FLA_DTYPES):
        raise ValueError(
            f"backend='cuda' needs CUDA tensors of fp32, fp16 or bf16, got {x.dtype} on {x.device}"
        )
    return "cuda"


def _fla_inputs(*xs: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, T, .) -> fla's layout (B, T, H, .), all in the first input's dtype. fla's kernels
    combine their inputs in matmuls and are tested with all in one dtype; under autocast r, k, v
    come out of bf16 matmuls while the decays and u are fp32."""
    dt = xs[0].dtype
    return [x.to(dt).transpose(1, 2) for x in xs]


# Intra-chunk scores sum_c x_tc y_sc prod_{s<j<=t} w_jc are fastest factored around the chunk's
# middle m, as matmuls of x_t e^{cb_t - m} and y_s e^{m - cb_s} (measured 3-10x faster on CPU than
# forming the (L, L, K) pairwise decays). Every factor, and every product, masked ones included,
# stays below e^{|total log-decay of the chunk|}; beyond this limit the pairwise form is used, as
# fp32/bf16 end at e^88. RWKV-7's decay (log w > -0.61) keeps a 64-step chunk within 39; RWKV-6's
# is unbounded but starts near -0.1 per step.
_FACTOR_LIMIT = 60.0


def _factorisable(cb_BHNLK: torch.Tensor, min_log_decay: float | None = None) -> bool:
    """Whether every chunk's total log-decay stays within the limit. A per-step lower bound the
    caller knows (RWKV-7's decay has one by construction) decides it without reading the device;
    otherwise the check reads one value, a host sync on CUDA."""
    if min_log_decay is not None and cb_BHNLK.shape[-2] * min_log_decay > -_FACTOR_LIMIT:
        return True
    return bool(cb_BHNLK[..., -1, :].min() > -_FACTOR_LIMIT)


def _pad_to_chunks(L: int, *xs_BHTD: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pads time to a multiple of L: zero r, k, v, a, b and zero log-decay (w = 1) leave the
    outputs and the final state of the real steps unchanged."""
    T = xs_BHTD[0].shape[2]
    pad = -T % L
    return [F.pad(x, (0, 0, 0, pad)) if pad else x for x in xs_BHTD]


def _cumulative(lw_BHNLK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Within each chunk: inclusive and exclusive prefix sums of the log-decay, and the suffix sum
    after each step (decay from s to the chunk's end). Each is a sum of only its own terms: forming
    one as a difference of two others loses all precision in fp32 once a fast-decaying step has
    pushed the prefix sum to -1e3 or below."""
    cb = lw_BHNLK.cumsum(-2)
    cbx = F.pad(cb[..., :-1, :], (0, 0, 1, 0))
    tail = F.pad(lw_BHNLK.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))
    return cb, cbx, tail


def _pairwise_decay(lw_BHNLK: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """prod_{s<j<=t} w_j (inclusive) or prod_{s<j<t} w_j (strict) for s < t, 1 on the diagonal when
    inclusive, 0 elsewhere: (B, H, N, L_t, L_s, K). The log is summed per pair, not differenced
    from prefix sums (see `_cumulative`), and masked before exp, where the upper triangle would
    overflow."""
    L = lw_BHNLK.shape[-2]
    after_JS = torch.ones(L, L, dtype=torch.bool, device=lw_BHNLK.device).tril(-1)
    P = (lw_BHNLK.unsqueeze(-2) * after_JS[..., None]).cumsum(-3)
    if not inclusive:
        P = F.pad(P[..., :-1, :, :], (0, 0, 0, 0, 1, 0))
    keep_TS = torch.ones(L, L, dtype=torch.bool, device=lw_BHNLK.device).tril(0 if inclusive else -1)
    return torch.where(keep_TS[..., None], P, float("-inf")).exp()


# ---------------------------------------------------------------------------------------------
# RWKV-6
# ---------------------------------------------------------------------------------------------


def wkv6_ref(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV=None):
    """RWKV-6 as the paper writes it: one step at a time, in fp32 (fp64 inputs stay fp64)."""
    B, H, T, K = r_BHTK.shape
    V = v_BHTV.shape[-1]
    dt = torch.promote_types(r_BHTK.dtype, torch.float32)
    r, k, v, w = (x.to(dt) for x in (r_BHTK, k_BHTK, v_BHTV, logw_BHTK.to(dt).exp()))
    u = u_HK.to(dt)[None, :, :, None]
    S = torch.zeros(B, H, K, V, dtype=dt, device=r.device) if s0_BHKV is None else s0_BHKV.to(dt)
    out = []
    for t in range(T):
        kv_BHKV = k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((r[:, :, t, :, None] * (S + u * kv_BHKV)).sum(-2))
        S = w[:, :, t, :, None] * S + kv_BHKV
    return torch.stack(out, 2).to(r_BHTK.dtype), S


def wkv6_recurrent(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV=None):
    """The recurrence at the input dtype (generation, one token at a time). Twin: `wkv6_ref`."""
    B, H, T, K = r_BHTK.shape
    S = r_BHTK.new_zeros(B, H, K, v_BHTV.shape[-1]) if s0_BHKV is None else s0_BHKV
    w_BHTK, out = logw_BHTK.exp(), []
    for t in range(T):
        r, k, v = r_BHTK[:, :, t], k_BHTK[:, :, t], v_BHTV[:, :, t]
        out.append((r[..., None, :] @ S).squeeze(-2) + (r * u_HK * k).sum(-1, keepdim=True) * v)
        S = w_BHTK[:, :, t, :, None] * S + k[..., :, None] * v[..., None, :]
    return torch.stack(out, 2), S


def _widened(fn, *tensors, **options):
    """Runs a chunked form in fp32 (fp64 stays fp64) with autocast off, and returns the output in
    the input's dtype: cumulative log-decays and their exps lose too much in bf16, and the
    triangular solve has no bf16 kernel."""
    x = tensors[0]
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        o, S = fn(*(t if t is None else t.to(dt) for t in tensors), **options)
    return o.to(x.dtype), S


def wkv6_chunked(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV=None, chunk_size: int = 32):
    """Chunked form. Within a chunk, with cb the inclusive cumulative log-decay and cbx = cb - logw:
    o_t = (r_t e^{cbx_t}) S_0 + sum_{s<t} [sum_c r_tc k_sc e^{cbx_tc - cb_sc}] v_s + (r_t u k_t) v_t
    S_L = diag(e^{cb_L}) S_0 + sum_s (k_s e^{cb_L - cb_s})^T v_s
    """
    B, H, T, K = r_BHTK.shape
    V, L = v_BHTV.shape[-1], chunk_size
    r, k, v, lw = _pad_to_chunks(L, r_BHTK, k_BHTK, v_BHTV, logw_BHTK)
    N = r.shape[2] // L
    r, k, lw = (x.view(B, H, N, L, K) for x in (r, k, lw))
    v = v.view(B, H, N, L, V)
    cb, cbx, tail = _cumulative(lw)
    # Intra-chunk: decay from s (after its own step) to t - 1, for s < t.
    if _factorisable(cb):
        m = cb[..., L // 2 - 1 : L // 2, :]
        A_BHNLL = (r * (cbx - m).exp()) @ (k * (m - cb).exp()).transpose(-1, -2)
        A_BHNLL = torch.where(torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1), A_BHNLL, 0.0)
    else:
        A_BHNLL = (r.unsqueeze(-2) * k.unsqueeze(-3) * _pairwise_decay(lw, inclusive=False)).sum(-1)
    bonus_BHNL1 = (r * u_HK[None, :, None, None, :] * k).sum(-1, keepdim=True)
    o = A_BHNLL @ v + bonus_BHNL1 * v
    # Inter-chunk: each chunk's contribution to the state it hands on, then a loop over chunks.
    kdec_BHNLK = k * tail.exp()
    dS_BHNKV = kdec_BHNLK.transpose(-1, -2) @ v
    decay_BHNK = cb[..., -1, :].exp()
    S = r.new_zeros(B, H, K, V) if s0_BHKV is None else s0_BHKV.to(r.dtype)
    states = []
    # unbind, not [:, :, n]: each indexing op's backward writes a full-size zero gradient, which
    # made the loop quadratic in the number of chunks (measured: half the backward time at T=1024).
    for decay_BHK, dS in zip(decay_BHNK.unbind(2), dS_BHNKV.unbind(2), strict=True):
        states.append(S)
        S = decay_BHK[..., None] * S + dS
    S0_BHNKV = torch.stack(states, 2)
    o = o + (r * cbx.exp()) @ S0_BHNKV
    return o.reshape(B, H, N * L, V)[:, :, :T], S


def wkv6(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV=None, chunk_size: int = 32, backend: str = "auto"):
    """RWKV-6 WKV: (o_BHTV, final state S_BHKV). Twin: `wkv6_ref`."""
    if pick_backend(backend, r_BHTK, 6) == "torch":
        return _widened(wkv6_chunked, r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV, chunk_size=chunk_size)
    return _wkv6_fla(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV)


@torch.compiler.disable  # Triton kernels with autotune hooks: run between compiled graphs
def _wkv6_fla(r_BHTK, k_BHTK, v_BHTV, logw_BHTK, u_HK, s0_BHKV):
    """fla's chunk_rwkv6: takes a log decay, scales r by K^-0.5 unless told otherwise, and keeps
    its state in fp32."""
    from fla.ops.rwkv6 import chunk_rwkv6

    r, k, v, logw = _fla_inputs(r_BHTK, k_BHTK, v_BHTV, logw_BHTK)
    o_BTHV, S_BHKV = chunk_rwkv6(
        r,
        k,
        v,
        logw,
        u_HK.to(r.dtype),
        scale=1.0,
        initial_state=None if s0_BHKV is None else s0_BHKV.float(),
        output_final_state=True,
    )
    return o_BTHV.transpose(1, 2), S_BHKV


# ---------------------------------------------------------------------------------------------
# RWKV-7
# ---------------------------------------------------------------------------------------------


def wkv7_ref(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK=None):
    """RWKV-7 as the paper writes it: one step at a time, in fp32 (fp64 inputs stay fp64)."""
    B, H, T, K = r_BHTK.shape
    V = v_BHTV.shape[-1]
    dt = torch.promote_types(r_BHTK.dtype, torch.float32)
    r, k, v, a, b = (x.to(dt) for x in (r_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK))
    w = logw_BHTK.to(dt).exp()
    S = torch.zeros(B, H, V, K, dtype=dt, device=r.device) if s0_BHVK is None else s0_BHVK.to(dt)
    out = []
    for t in range(T):
        Sa_BHV1 = (S * a[:, :, t, None, :]).sum(-1, keepdim=True)
        S = (
            S * w[:, :, t, None, :]
            + Sa_BHV1 * b[:, :, t, None, :]
            + v[:, :, t, :, None] * k[:, :, t, None, :]
        )
        out.append((S * r[:, :, t, None, :]).sum(-1))
    return torch.stack(out, 2).to(r_BHTK.dtype), S


def wkv7_recurrent(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK=None):
    """The recurrence at the input dtype (generation, one token at a time). Twin: `wkv7_ref`."""
    B, H, T, K = r_BHTK.shape
    S = r_BHTK.new_zeros(B, H, v_BHTV.shape[-1], K) if s0_BHVK is None else s0_BHVK
    w_BHTK, out = logw_BHTK.exp(), []
    for t in range(T):
        Sa_BHV1 = S @ a_BHTK[:, :, t, :, None]
        S = S * w_BHTK[:, :, t, None, :] + Sa_BHV1 * b_BHTK[:, :, t, None, :]
        S = S + v_BHTV[:, :, t, :, None] * k_BHTK[:, :, t, None, :]
        out.append((S @ r_BHTK[:, :, t, :, None]).squeeze(-1))
    return torch.stack(out, 2), S


def _dplr_chunk_scores(r, lw, k, a, b, cb, cbx, min_log_decay=None):
    """The four (L x L) score matrices of a chunk, each sum_c x_tc y_sc prod_{s<j<=t'} w_jc:
    A_ab = a . D_{t-1,s} . b and A_ak (s < t), Q_b = r . D_{t,s} . b and Q_k (s <= t); the
    factored form gets all four from one (2L x K) @ (K x 2L) matmul."""
    L = lw.shape[-2]
    if _factorisable(cb, min_log_decay):
        m = cb[..., L // 2 - 1 : L // 2, :]
        inv = (m - cb).exp()
        X_BHN2LK = torch.cat([a * (cbx - m).exp(), r * (cb - m).exp()], dim=-2)
        Y_BHN2LK = torch.cat([b * inv, k * inv], dim=-2)
        P = X_BHN2LK @ Y_BHN2LK.transpose(-1, -2)
        keep_TS = torch.ones(L, L, dtype=torch.bool, device=lw.device)
        strict, incl, zero = keep_TS.tril(-1), keep_TS.tril(0), P.new_zeros(())
        A_ab, A_ak = (torch.where(strict, x, zero) for x in (P[..., :L, :L], P[..., :L, L:]))
        Q_b, Q_k = (torch.where(incl, x, zero) for x in (P[..., L:, :L], P[..., L:, L:]))
        return A_ab, A_ak, Q_b, Q_k
    ad_BHNLLK = a.unsqueeze(-2) * _pairwise_decay(lw, inclusive=False)
    rd_BHNLLK = r.unsqueeze(-2) * _pairwise_decay(lw, inclusive=True)
    return tuple((x * y.unsqueeze(-3)).sum(-1) for x in (ad_BHNLLK, rd_BHNLLK) for y in (b, k))


def wkv7_chunked(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK=None, chunk_size: int = 32,
                 min_log_decay: float | None = None):  # fmt: skip
    """Chunked form of the generalised delta rule (a WY-style solve, as in fla's chunk_dplr).

    With u_t = S_{t-1} a_t the update is S_t = S_{t-1} diag(w_t) + u_t b_t + v_t^T k_t: a gated
    linear recurrence with two key/value pairs per step, (b, u) and (k, v). Within a chunk, with
    D_ts = prod_{s<j<=t} w_j (the pairwise decay) and cbx the exclusive cumulative log-decay,
        u_t = S_0 (a_t e^{cbx_t}) + sum_{s<t} [(a_t D_{t-1,s}) . b_s] u_s + [(a_t D_{t-1,s}) . k_s] v_s,
    a unit lower-triangular system U = (I - A_ab)^{-1} (A_ak V + (a e^{cbx}) S_0^T) solved per
    chunk. Its solution is affine in S_0, so the loop over chunks carries only (L x K) @ (K x V)
    and (K x L) @ (L x V) products; everything else is batched over all chunks.
    """
    B, H, T, K = r_BHTK.shape
    V, L = v_BHTV.shape[-1], chunk_size
    r, lw, k, v, a, b = _pad_to_chunks(L, r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK)
    N = r.shape[2] // L
    r, lw, k, a, b = (x.view(B, H, N, L, K) for x in (r, lw, k, a, b))
    v = v.view(B, H, N, L, V)
    cb, cbx, tail = _cumulative(lw)
    A_ab, A_ak, Q_b, Q_k = _dplr_chunk_scores(r, lw, k, a, b, cb, cbx, min_log_decay)
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    IA_BHNLL = eye - A_ab
    rhs = torch.cat([A_ak @ v, a * cbx.exp()], dim=-1)
    sol = torch.linalg.solve_triangular(IA_BHNLL, rhs, upper=False, unitriangular=True)
    U0_BHNLV, W_BHNLK = sol.split([V, K], dim=-1)
    # What a chunk hands on: S_L = S_0 diag(e^{cb_L}) + U^T (b e^{cb_L - cb}) + V^T (k e^{cb_L - cb}).
    bdec, kdec = b * tail.exp(), k * tail.exp()
    dS_BHNVK = v.transpose(-1, -2) @ kdec
    decay_BHNK = cb[..., -1, :].exp()
    S = r.new_zeros(B, H, V, K) if s0_BHVK is None else s0_BHVK.to(r.dtype)
    states = []
    # Substituting U = U0 + W S_0^T makes each chunk one affine map S_0 -> S_0 M + C, built for all
    # chunks at once; the loop then carries a single (V x K) @ (K x K) product per chunk.
    M_BHNKK = torch.diag_embed(decay_BHNK) + W_BHNLK.transpose(-1, -2) @ bdec
    C_BHNVK = U0_BHNLV.transpose(-1, -2) @ bdec + dS_BHNVK
    for M, C in zip(M_BHNKK.unbind(2), C_BHNVK.unbind(2), strict=True):  # unbind: see wkv6_chunked
        states.append(S)
        S = S @ M + C
    S0_BHNVK = torch.stack(states, 2)
    U_BHNLV = U0_BHNLV + W_BHNLK @ S0_BHNVK.transpose(-1, -2)
    o = (r * cb.exp()) @ S0_BHNVK.transpose(-1, -2) + Q_b @ U_BHNLV + Q_k @ v
    return o.reshape(B, H, N * L, V)[:, :, :T], S


def wkv7(
    r_BHTK,
    logw_BHTK,
    k_BHTK,
    v_BHTV,
    a_BHTK,
    b_BHTK,
    s0_BHVK=None,
    chunk_size: int = 32,
    backend: str = "auto",
    min_log_decay: float | None = None,
):
    """RWKV-7 WKV: (o_BHTV, final state S_BHVK). Twin: `wkv7_ref`. `min_log_decay`, a lower bound
    on every log w the caller guarantees, spares the chunked path its read of the device."""
    if pick_backend(backend, r_BHTK, 7) == "torch":
        return _widened(wkv7_chunked, r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK,
                        chunk_size=chunk_size, min_log_decay=min_log_decay)  # fmt: skip
    return _wkv7_fla(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK)


@torch.compiler.disable  # Triton kernels with autotune hooks: run between compiled graphs
def _wkv7_fla(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK, s0_BHVK):
    """fla's chunk_rwkv7: takes a log decay and keeps its state key-major (K x V) in fp32."""
    from fla.ops.rwkv7 import chunk_rwkv7

    o_BTHV, S_BHKV = chunk_rwkv7(
        *_fla_inputs(r_BHTK, logw_BHTK, k_BHTK, v_BHTV, a_BHTK, b_BHTK),
        scale=1.0,
        initial_state=None if s0_BHVK is None else s0_BHVK.float().transpose(-1, -2).contiguous(),
        output_final_state=True,
    )
    return o_BTHV.transpose(1, 2), S_BHKV.transpose(-1, -2)
