"""Selective state-space scans: Mamba-1's selective scan and Mamba-2's SSD.

Shape legend: B batch, T time, D channels (Mamba-1 d_inner), N state size, H heads, P head dim,
K chunks, L chunk length (T padded up to K * L), S a second time index inside a chunk, R the
(K, B, H) blocks flattened into one batch of matrices.

Each fast path has a `_ref` twin with the same arguments and return values (output, final state;
the state is None when `final_state=False`, which lets training skip computing it), written as
the papers write the recurrence: an fp32 loop over time. Only tests and benchmarks call
the `_ref`s; models pick a backend with `pick_backend`. Both also have a C kernel for the CPU
(`selective_scan_native`, `ssd_scan_native`; sources in `csrc/`), built at first use.

Mamba-1 (Gu & Dao 2023, Alg. 2), per channel d and state n, with Delta already through softplus:
    h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t u_t,     y_t = C_t . h_t + D u_t
Mamba-2 (Dao & Gu 2024, SSD), per head, with a scalar decay a_t = exp(dt_t A_h):
    h_t = a_t h_{t-1} + dt_t x_t B_t^T  (P x N),       y_t = h_t C_t + D_h x_t
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.ops import kernels, native


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scans accumulate over thousands of steps: never in half precision; fp64 stays fp64 for tests.
    return torch.promote_types(dtype, torch.float32)


# What mamba-ssm must load for each scan on CUDA. Mamba-1 needs its compiled extension
# (selective_scan_cuda), which a mamba-ssm wheel can lack: a source build skips it unless asked
# to, and one built for another torch fails to load. Mamba-2's SSD kernels are Triton.
_CUDA_MODULES = {
    "selective_scan": ("selective_scan_cuda", "mamba_ssm.ops.selective_scan_interface"),
    "ssd_scan": ("mamba_ssm.ops.triton.ssd_combined",),
}
_CUDA_HINT = (
    "the Mamba scans run in PyTorch. To use mamba-ssm's kernels, reinstall it with its CUDA "
    "extension built for this torch: pip install --no-build-isolation --force-reinstall mamba-ssm "
    "(from source: MAMBA_KEEP_CUDA_BUILD=TRUE)"
)
# The dtypes mamba-ssm's kernels take for their per-token inputs.
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_kernel(scan_name: str | None) -> bool:
    """Whether mamba-ssm's kernel for `scan_name` (None: both scans) imports, compiled part included."""
    names = _CUDA_MODULES[scan_name] if scan_name else tuple(m for ms in _CUDA_MODULES.values() for m in ms)
    return all(kernels.find(m, "mamba_ssm", _CUDA_HINT) is not None for m in names)


def pick_backend(backend: str, x: torch.Tensor, native_kernel: str | None = None) -> str:
    """ "torch" | "native" | "cuda". "auto" takes the mamba-ssm kernels for CUDA tensors of a dtype
    they take (fp32, fp16, bf16) when they load; on CPU the compiled C kernel `native_kernel`
    (csrc/<name>.c, also the scan's name) when the scan has one and it builds; otherwise the
    PyTorch path. A mamba-ssm that is installed but does not load warns once and falls back."""
    if backend not in ("torch", "native", "cuda", "auto"):
        raise ValueError(f"unknown scan backend {backend!r} (torch, native, cuda, auto)")
    if backend == "torch":
        return "torch"
    if backend == "native":
        if native_kernel is None:
            raise ValueError("backend='native' needs the scan's C kernel name (native_kernel)")
        if x.device.type != "cpu":
            raise ValueError("backend='native' is a CPU kernel; use backend='auto' or 'cuda' on a GPU")
        if native.load(native_kernel, _compute_dtype(x.dtype)) is None:
            raise RuntimeError(
                "backend='native' could not build its C kernel (see the warning above; needs a C compiler, "
                "and HARNESS_NATIVE unset or 1)"
            )
        return "native"
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors; use backend='auto' or 'torch' on CPU")
        if x.dtype not in _CUDA_DTYPES:
            raise ValueError(f"backend='cuda': mamba-ssm's kernels take fp32, fp16 or bf16, not {x.dtype}")
        if not _cuda_kernel(native_kernel):
            raise ImportError(
                "backend='cuda' needs the mamba-ssm kernels (see any warning above): "
                "pip install -e '.[cuda]' on a CUDA machine"
            )
        return "cuda"
    if not x.is_cuda:
        if native_kernel and x.device.type == "cpu" and native.load(native_kernel, _compute_dtype(x.dtype)):
            return "native"
        return "torch"
    return "cuda" if x.dtype in _CUDA_DTYPES and _cuda_kernel(native_kernel) else "torch"


# ---------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ---------------------------------------------------------------------------------------------


def selective_scan_step(
    h_BDN: torch.Tensor,
    u_BD: torch.Tensor,
    delta_BD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BN: torch.Tensor,
    C_BN: torch.Tensor,
    D_D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (zero-order hold for A, Euler for B, as in the paper)."""
    dA_BDN = torch.exp(delta_BD[..., None] * A_DN)
    dB_BDN = delta_BD[..., None] * B_BN[:, None, :]
    h_BDN = dA_BDN * h_BDN + dB_BDN * u_BD[..., None]
    y_BD = (h_BDN * C_BN[:, None, :]).sum(-1) + D_D * u_BD
    return y_BD, h_BDN


def selective_scan_ref(
    u_BTD: torch.Tensor,
    delta_BTD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_D: torch.Tensor,
    h0_BDN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential reference: one `selective_scan_step` per time step. `chunk_size` is unused."""
    dt = _compute_dtype(u_BTD.dtype)
    Bsz, T, D = u_BTD.shape
    h = torch.zeros(Bsz, D, A_DN.shape[1], dtype=dt, device=u_BTD.device) if h0_BDN is None else h0_BDN.to(dt)
    A, D_ = A_DN.to(dt), D_D.to(dt)
    # unbind rather than x[:, t]: the backward of each index op allocates a zero gradient the size
    # of the whole sequence, which would make the reference quadratic in T.
    ys = []
    for u, delta, Bt, Ct in zip(*(x.to(dt).unbind(1) for x in (u_BTD, delta_BTD, B_BTN, C_BTN)), strict=True):
        y, h = selective_scan_step(h, u, delta, A, Bt, Ct, D_)
        ys.append(y)
    return torch.stack(ys, 1).to(u_BTD.dtype), (h if final_state else None)


def _block_states(u_BTD, delta_BTD, A_DN, B_BTN, h_BDN):
    """States h_t of one time block from its start state, in place in one (B, Tb, D, N) buffer."""
    dA_BTDN = torch.exp(delta_BTD[..., None] * A_DN)
    h_BTDN = (delta_BTD * u_BTD)[..., None] * B_BTN[:, :, None, :]
    h_BTDN[:, 0].addcmul_(dA_BTDN[:, 0], h_BDN)
    for t in range(1, h_BTDN.shape[1]):
        h_BTDN[:, t].addcmul_(dA_BTDN[:, t], h_BTDN[:, t - 1])
    return h_BTDN, dA_BTDN


class _SelectiveScan(torch.autograd.Function):
    """Time-blocked sequential scan with a hand-written backward that recomputes the states.

    Mamba-1's decay differs per (channel, state), so the scan has no matmul form: on CPU its cost
    is passes over (B, T, D, N) tensors plus per-step dispatch. Measured at B 2, T 1024, D 512,
    N 16, one thread: a chunked two-level scan under autograd took 1.46 s forward+backward against
    0.29 s for the reference loop (autograd keeps and re-reads many full-size intermediates), and
    whole-sequence (B, T, D, N) buffers lost to page faults and cache misses. So time is cut into
    blocks of `block` steps, small enough to stay in cache; within a block the
    recurrence is one in-place `addcmul_` per step. Only block-start states are saved; the
    backward recomputes each block's states, as the mamba-ssm kernel does. All reductions are
    products and sums, not matmuls, so FlopCounterMode sees none of this ("ew_scan").
    """

    @staticmethod
    def forward(ctx, u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN, block):
        T = u_BTD.shape[1]
        y_BTD = torch.empty_like(u_BTD)
        h_BDN, starts = h0_BDN, []
        for s in range(0, T, block):
            e = min(s + block, T)
            starts.append(h_BDN)
            h_BTDN, _ = _block_states(u_BTD[:, s:e], delta_BTD[:, s:e], A_DN, B_BTN[:, s:e], h_BDN)
            y_BTD[:, s:e] = (h_BTDN * C_BTN[:, s:e, None, :]).sum(-1)
            h_BDN = h_BTDN[:, -1].clone()
        y_BTD.addcmul_(D_D, u_BTD)
        ctx.block = block
        ctx.save_for_backward(u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, torch.stack(starts, 1))
        return y_BTD, h_BDN

    @staticmethod
    def backward(ctx, gy_BTD, gh_BDN):
        u, delta, A, Bm, Cm, D, starts_BKDN = ctx.saved_tensors
        T, block = u.shape[1], ctx.block
        if gy_BTD is None:
            gy_BTD = torch.zeros_like(u)
        gu, gdelta, gB, gC = (torch.empty_like(t) for t in (u, delta, Bm, Cm))
        gA = torch.zeros_like(A)
        # dL/dh at the end of the current block, arriving from the later blocks.
        g_carry = torch.zeros_like(starts_BKDN[:, 0]) if gh_BDN is None else gh_BDN.clone()
        for k in reversed(range(starts_BKDN.shape[1])):
            s, e = k * block, min((k + 1) * block, T)
            h_start = starts_BKDN[:, k]
            h_BTDN, dA_BTDN = _block_states(u[:, s:e], delta[:, s:e], A, Bm[:, s:e], h_start)
            # g_t = dL/dh_t: from y_t directly and from h_{t+1} through the decay (a reverse scan).
            g_BTDN = gy_BTD[:, s:e, :, None] * Cm[:, s:e, None, :]
            g_BTDN[:, -1].add_(g_carry)
            for t in range(e - s - 2, -1, -1):
                g_BTDN[:, t].addcmul_(dA_BTDN[:, t + 1], g_BTDN[:, t + 1])
            g_carry = dA_BTDN[:, 0] * g_BTDN[:, 0]
            # dL/d(Delta A) = g_t h_{t-1} exp(Delta A), built in place in the dA buffer.
            w_BTDN = dA_BTDN.mul_(g_BTDN)
            w_BTDN[:, 1:].mul_(h_BTDN[:, :-1])
            w_BTDN[:, 0].mul_(h_start)
            gdelta[:, s:e] = (w_BTDN * A).sum(-1)
            gA += (w_BTDN * delta[:, s:e, :, None]).sum((0, 1))
            gdu = (g_BTDN * Bm[:, s:e, None, :]).sum(-1)
            gB[:, s:e] = (g_BTDN * (delta[:, s:e] * u[:, s:e])[..., None]).sum(2)
            gC[:, s:e] = (h_BTDN * gy_BTD[:, s:e, :, None]).sum(2)
            gu[:, s:e] = gdu * delta[:, s:e]
            gdelta[:, s:e] += gdu * u[:, s:e]
        gu.addcmul_(D, gy_BTD)
        gD = (gy_BTD * u).sum((0, 1))
        return gu, gdelta, gA, gB, gC, gD, g_carry, None


def selective_scan(
    u_BTD: torch.Tensor,
    delta_BTD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_D: torch.Tensor,
    h0_BDN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU fast path: `_SelectiveScan`, with time blocks of `chunk_size` steps."""
    dt = _compute_dtype(u_BTD.dtype)
    Bsz, T, D = u_BTD.shape
    N = A_DN.shape[1]
    if h0_BDN is None:
        h0_BDN = torch.zeros(Bsz, D, N, dtype=dt, device=u_BTD.device)
    args = (t.to(dt) for t in (u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN))
    with torch.autocast(u_BTD.device.type, enabled=False):  # as in ssd_scan: widened, never bf16
        y_BTD, h_BDN = _SelectiveScan.apply(*args, max(1, chunk_size))
    return y_BTD.to(u_BTD.dtype), (h_BDN if final_state else None)


class _SelectiveScanNative(torch.autograd.Function):
    """The fused C kernel of `csrc/selective_scan.c`: forward keeps the state at the start of
    every `block` steps, backward recomputes each block's states (as `_SelectiveScan` does), but
    one pass per step over (D, N) in registers instead of ~20 passes over (B, T, D, N) tensors."""

    @staticmethod
    def forward(ctx, lib, u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN, block, want_grad):
        Bsz, T, D = u_BTD.shape
        N = A_DN.shape[1]
        K = -(-T // block)
        y_BTD = torch.empty_like(u_BTD)
        h_BDN = torch.empty_like(h0_BDN)
        starts_BKDN = u_BTD.new_empty(Bsz, K, D, N) if want_grad else None
        ins = [native.ptr(t) for t in (u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN)]
        outs = [native.ptr(t) for t in (y_BTD, h_BDN, starts_BKDN)]
        native.check(lib.scan_fwd(torch.get_num_threads(), Bsz, T, D, N, block, *ins, *outs))
        ctx.lib, ctx.block = lib, block
        if want_grad:
            ctx.save_for_backward(u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, starts_BKDN)
        return y_BTD, h_BDN

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients come from C, with no graph
    def backward(ctx, gy_BTD, gh_BDN):
        u, delta, A, Bm, Cm, D_D, starts = ctx.saved_tensors
        Bsz, T, D = u.shape
        N, threads = A.shape[1], torch.get_num_threads()
        gy_BTD = torch.zeros_like(u) if gy_BTD is None else gy_BTD.contiguous()
        gh_BDN = None if gh_BDN is None else gh_BDN.contiguous()
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gA_BDN, gh0_BDN, gD_BD = u.new_empty(Bsz, D, N), u.new_empty(Bsz, D, N), u.new_empty(Bsz, D)
        gB_PBTN, gC_PBTN = u.new_zeros(threads, Bsz, T, N), u.new_zeros(threads, Bsz, T, N)
        args = [native.ptr(t) for t in (u, delta, A, Bm, Cm, D_D, starts, gy_BTD, gh_BDN)]
        args += [native.ptr(t) for t in (gu, gdelta, gA_BDN, gB_PBTN, gC_PBTN, gD_BD, gh0_BDN)]
        native.check(ctx.lib.scan_bwd(threads, Bsz, T, D, N, ctx.block, *args))
        return (
            None,
            gu,
            gdelta,
            gA_BDN.sum(0),
            gB_PBTN.sum(0),
            gC_PBTN.sum(0),
            gD_BD.sum(0),
            gh0_BDN,
            None,
            None,
        )


def _full_size(tensors, shapes, dtype: torch.dtype, name: str) -> list[torch.Tensor]:
    """Each argument widened, broadcast to its full shape (as the PyTorch twins accept) and made
    contiguous: the C kernels index raw memory, so a wrong shape must fail here, not read past a
    buffer."""
    out = []
    for i, (t, shape) in enumerate(zip(tensors, shapes, strict=True)):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: argument {i} is on {t.device}; the C kernels run on CPU tensors")
        try:
            out.append(t.to(dtype).expand(shape).contiguous())
        except RuntimeError as e:
            raise ValueError(f"{name}: argument {i} has shape {tuple(t.shape)}, expected {shape}") from e
    return out


def _apply_native(fn: type[torch.autograd.Function], lib, args: list[torch.Tensor], chunk_size: int):
    """Run a native scan Function on widened, full-size arguments. Autocast off, as in ssd_scan; the
    block-start states are kept only when a backward can follow."""
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    with torch.autocast("cpu", enabled=False):
        return fn.apply(lib, *args, max(1, chunk_size), want_grad)


def selective_scan_native(
    u_BTD: torch.Tensor,
    delta_BTD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_D: torch.Tensor,
    h0_BDN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU fast path in C (`harness.ops.native`); the PyTorch `selective_scan` where no compiler is."""
    dt = _compute_dtype(u_BTD.dtype)
    lib = native.load("selective_scan", dt) if u_BTD.device.type == "cpu" else None
    if lib is None:
        return selective_scan(u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN, chunk_size, final_state)
    Bsz, T, D = u_BTD.shape
    N = A_DN.shape[-1]
    if h0_BDN is None:
        h0_BDN = torch.zeros(Bsz, D, N, dtype=dt)
    shapes = [(Bsz, T, D), (Bsz, T, D), (D, N), (Bsz, T, N), (Bsz, T, N), (D,), (Bsz, D, N)]
    args = _full_size(
        (u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN), shapes, dt, "selective_scan_native"
    )
    y_BTD, h_BDN = _apply_native(_SelectiveScanNative, lib, args, chunk_size)
    return y_BTD.to(u_BTD.dtype), (h_BDN if final_state else None)


@torch.compiler.disable  # a compiled extension dynamo cannot trace: runs between compiled graphs
def selective_scan_cuda(
    u_BTD: torch.Tensor,
    delta_BTD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_D: torch.Tensor,
    h0_BDN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mamba-ssm's fused selective-scan kernel (channels-first layout). It takes no initial
    state, so a call with one runs the torch path instead.

    The kernel takes u, delta, B and C in one dtype (fp32, fp16 or bf16) and A, D in fp32, and
    computes in fp32; mixed dtypes fail its checks. Under autocast softplus gives an fp32 delta
    beside a bf16 u, so delta, B and C are cast to u's dtype (mamba-ssm's own Mamba module passes
    its delta in that dtype too)."""
    if h0_BDN is not None:
        return selective_scan(u_BTD, delta_BTD, A_DN, B_BTN, C_BTN, D_D, h0_BDN, chunk_size, final_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    in_dtype = u_BTD.dtype
    if in_dtype not in _CUDA_DTYPES:
        raise ValueError(f"selective_scan_cuda takes fp32, fp16 or bf16 inputs, not {in_dtype}")
    u_BDT, delta_BDT, B_BNT, C_BNT = (
        t.to(in_dtype).transpose(1, 2).contiguous() for t in (u_BTD, delta_BTD, B_BTN, C_BTN)
    )
    out = selective_scan_fn(
        u_BDT, delta_BDT, A_DN.float(), B_BNT, C_BNT, D_D.float(), return_last_state=final_state
    )
    y_BDT, h_BDN = out if final_state else (out, None)
    return y_BDT.transpose(1, 2).to(in_dtype), h_BDN


# ---------------------------------------------------------------------------------------------
# Mamba-2 SSD
# ---------------------------------------------------------------------------------------------


def ssd_step(
    h_BHPN: torch.Tensor,
    x_BHP: torch.Tensor,
    dt_BH: torch.Tensor,
    A_H: torch.Tensor,
    B_BN: torch.Tensor,
    C_BN: torch.Tensor,
    D_H: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the SSD recurrence: a scalar decay per head, a rank-1 state update."""
    a_BH = torch.exp(dt_BH * A_H)
    upd_BHPN = (dt_BH[..., None] * x_BHP)[..., None] * B_BN[:, None, None, :]
    h_BHPN = a_BH[..., None, None] * h_BHPN + upd_BHPN
    y_BHP = (h_BHPN * C_BN[:, None, None, :]).sum(-1) + D_H[:, None] * x_BHP
    return y_BHP, h_BHPN


def ssd_scan_ref(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_H: torch.Tensor,
    h0_BHPN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential reference: one `ssd_step` per time step. `chunk_size` is unused."""
    dt = _compute_dtype(x_BTHP.dtype)
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.shape[-1]
    h = torch.zeros(Bsz, H, P, N, dtype=dt, device=x_BTHP.device) if h0_BHPN is None else h0_BHPN.to(dt)
    A, D_ = A_H.to(dt), D_H.to(dt)
    ys = []  # unbind rather than x[:, t]: see selective_scan_ref
    for x, dtv, Bt, Ct in zip(*(v.to(dt).unbind(1) for v in (x_BTHP, dt_BTH, B_BTN, C_BTN)), strict=True):
        y, h = ssd_step(h, x, dtv, A, Bt, Ct, D_)
        ys.append(y)
    return torch.stack(ys, 1).to(x_BTHP.dtype), (h if final_state else None)


class _SSD(torch.autograd.Function):
    """Chunked SSD with a hand-written backward.

    Measured at B 2, T 1024, H 8, P 64, N 16, chunk 64, two threads: the autograd version spent
    more time in broadcast-mul backwards, zero-fills, cats and layout copies than in its matmuls.
    Here the chunked tensors live in a (K, B, H, L, P) layout: each diagonal block is one batched
    matmul with no copy, and "chunks 0..K-2" or "chunks 1..K-1" are contiguous slices, so the
    state terms accumulate into the (L, P) buffers by `baddbmm` instead of through a product
    buffer and an elementwise pass. The per-position decays of the state terms ride on the
    (L, N) operands B and C, a quarter of the size of the (L, P) ones. The backward does exactly
    the transposed matmuls of the forward (two per forward matmul, as autograd would), so
    FlopCounterMode still sees training as three forwards. Nothing is exponentiated above zero:
    segment sums are masked before exp, the other decays are <= 1.
    Forward+backward at that shape: 16.1 ms -> 12.2 ms -> 9.0 ms (chunk 64), 8.6 ms (chunk 32).
    """

    @staticmethod
    def forward(ctx, x_BKLHP, dt_BKLH, A_H, B_BKLN, C_BKLN, D_H, h0_BHPN, final_state):
        Bsz, K, L, H, P = x_BKLHP.shape
        N = B_BKLN.shape[-1]
        opts = dict(dtype=x_BKLHP.dtype, device=x_BKLHP.device)
        dt_KBHL = dt_BKLH.permute(1, 0, 3, 2)
        B_KBLN, C_KBLN = (t.transpose(0, 1).contiguous() for t in (B_BKLN, C_BKLN))
        xd_KBHLP = torch.empty(K, Bsz, H, L, P, **opts)
        torch.mul(x_BKLHP.permute(1, 0, 3, 2, 4), dt_KBHL[..., None], out=xd_KBHLP)
        acum_KBHL = torch.cumsum(dt_KBHL * A_H[:, None], dim=-1).contiguous()

        # Diagonal blocks: y_l = sum_{s<=l} exp(acum_l - acum_s) (C_l . B_s) dt_s x_s. The mask goes
        # on before exp: above the diagonal the difference is positive and could overflow. exp of
        # an argument whose result would be subnormal (or of -inf) takes a slow path, 4-10x the
        # time of the whole pass: such arguments are raised to `low` and their results set to 0
        # afterwards, which moves no entry by more than exp(low), a few thousand times the
        # smallest normal number.
        low = math.log(torch.finfo(x_BKLHP.dtype).tiny) + 8.0
        # The mask is added as 0 / -inf: an in-place add is ~8x faster than masked_fill_ here.
        mask_LS = torch.full((L, L), float("-inf"), dtype=x_BKLHP.dtype, device=x_BKLHP.device).triu_(1)
        E_KBHLS = (acum_KBHL[..., :, None] - acum_KBHL[..., None, :]).add_(mask_LS)
        E_KBHLS.clamp_min_(low).exp_()
        torch.threshold_(E_KBHLS, 1.5 * math.exp(low), 0.0)
        CB_KBLS = C_KBLN @ B_KBLN.transpose(-1, -2)
        M_KBHLS = E_KBHLS * CB_KBLS[:, :, None]
        y_KBHLP = M_KBHLS @ xd_KBHLP

        # Chunk-final states (each from a zero start), carried across chunks. The last chunk's state
        # only serves as the final state, and chunk 0 reads a carried state only when h0 is given:
        # skipping both when unneeded keeps training at exactly three forwards of matmuls.
        n_states = K if final_state else K - 1
        first = 1 if h0_BHPN is None else 0
        starts_KBHPN = torch.empty(n_states + 1, Bsz, H, P, N, **opts)
        if h0_BHPN is None:
            starts_KBHPN[0].zero_()
        else:
            starts_KBHPN[0].copy_(h0_BHPN)
        Bd_KBHLN = to_end_KBHL = Cd_KBHLN = ea_KBHL = None
        if n_states > 0:
            to_end_KBHL = torch.exp(acum_KBHL[:n_states, ..., -1:] - acum_KBHL[:n_states])
            Bd_KBHLN = B_KBLN[:n_states, :, None] * to_end_KBHL[..., None]
            st_KBHPN = xd_KBHLP[:n_states].transpose(-1, -2) @ Bd_KBHLN
            dec_KBH11 = torch.exp(acum_KBHL[:n_states, ..., -1])[..., None, None]
            for k in range(n_states):
                torch.addcmul(st_KBHPN[k], dec_KBH11[k], starts_KBHPN[k], out=starts_KBHPN[k + 1])

        # Off-diagonal part: the carried state read by C_l, decayed from the chunk start to l.
        # baddbmm's out= form: FlopCounterMode does not count the in-place baddbmm_.
        if K > first:
            ea_KBHL = torch.exp(acum_KBHL[first:])
            Cd_KBHLN = C_KBLN[first:, :, None] * ea_KBHL[..., None]
            y_RLP = y_KBHLP[first:].view(-1, L, P)
            st_RNP = starts_KBHPN[first:K].view(-1, P, N).transpose(1, 2)
            torch.baddbmm(y_RLP, Cd_KBHLN.view(-1, L, N), st_RNP, out=y_RLP)
        y_BKLHP = torch.empty_like(x_BKLHP)
        torch.addcmul(y_KBHLP.permute(1, 0, 3, 2, 4), x_BKLHP, D_H[:, None], out=y_BKLHP)

        ctx.first, ctx.n_states, ctx.final_state = first, n_states, final_state
        ctx.has_h0 = h0_BHPN is not None
        # E and M are kept rather than recomputed: each is a pass over a freshly allocated buffer,
        # and on CPU first-touch page faults make that cost about as much as the product itself.
        ctx.save_for_backward(
            x_BKLHP,
            dt_BKLH,
            A_H,
            B_KBLN,
            C_KBLN,
            D_H,
            xd_KBHLP,
            acum_KBHL,
            E_KBHLS,
            M_KBHLS,
            CB_KBLS,
            starts_KBHPN,
            Bd_KBHLN,
            to_end_KBHL,
            Cd_KBHLN,
            ea_KBHL,
        )
        return y_BKLHP, starts_KBHPN[n_states].clone()

    @staticmethod
    def backward(ctx, gy_BKLHP, gh_BHPN):
        x_BKLHP, dt_BKLH, A_H, B_KBLN, C_KBLN, D_H, xd_KBHLP, acum_KBHL = ctx.saved_tensors[:8]
        E_KBHLS, M_KBHLS, CB_KBLS, starts_KBHPN, Bd_KBHLN, to_end_KBHL, Cd_KBHLN, ea_KBHL = ctx.saved_tensors[
            8:
        ]
        first, n_states, final_state = ctx.first, ctx.n_states, ctx.final_state
        Bsz, K, L, H, P = x_BKLHP.shape
        N = B_KBLN.shape[-1]
        if gy_BKLHP is None:
            gy_BKLHP = torch.zeros_like(x_BKLHP)
        gy_KBHLP = torch.empty_like(xd_KBHLP)
        gy_KBHLP.copy_(gy_BKLHP.permute(1, 0, 3, 2, 4))

        # Diagonal blocks (y = M xd with M = E * CB, E = exp(acum_l - acum_s) masked). gM is spent
        # before gxd is made, so both live in one buffer: a fresh buffer costs its first-touch page
        # faults, several times the price of the pass that fills it.
        R = K * Bsz * H
        work = torch.empty(R * L * max(L, P), dtype=x_BKLHP.dtype, device=x_BKLHP.device)
        gM_RLS = torch.bmm(
            gy_KBHLP.view(R, L, P),
            xd_KBHLP.view(R, L, P).transpose(1, 2),
            out=work[: R * L * L].view(R, L, L),
        )
        gseg_KBHLS = gM_RLS.view_as(E_KBHLS).mul_(E_KBHLS)
        gCB_KBLS = gseg_KBHLS.sum(2)
        gseg_KBHLS.mul_(CB_KBLS[:, :, None])
        gacum_KBHL = gseg_KBHLS.sum(-1).sub_(gseg_KBHLS.sum(-2))
        gxd_RLP = torch.bmm(
            M_KBHLS.view(R, L, L).transpose(1, 2), gy_KBHLP.view(R, L, P), out=work[: R * L * P].view(R, L, P)
        )
        gxd_KBHLP = gxd_RLP.view_as(xd_KBHLP)
        gC_KBLN = gCB_KBLS @ B_KBLN
        gB_KBLN = gCB_KBLS.transpose(-1, -2) @ C_KBLN

        # Off-diagonal part: y_l += (exp(acum_l) C_l) . start_k.
        G_direct = {}
        if K > first:
            gCd_KBHLN = gy_KBHLP[first:] @ starts_KBHPN[first:K]
            gC_KBLN[first:] += (gCd_KBHLN * ea_KBHL[..., None]).sum(2)
            gacum_KBHL[first:] += (gCd_KBHLN * Cd_KBHLN).sum(-1)
            gstart_KBHNP = Cd_KBHLN.transpose(-1, -2) @ gy_KBHLP[first:]
            G_direct = dict(zip(range(first, K), gstart_KBHNP.transpose(-1, -2).unbind(0), strict=True))

        # Carried states, in reverse: starts[k + 1] = dec_k starts[k] + st_k.
        G = gh_BHPN if (final_state and gh_BHPN is not None) else torch.zeros_like(starts_KBHPN[0])
        G = G + G_direct[n_states] if n_states in G_direct else G
        if n_states > 0:
            gst_KBHPN = torch.empty_like(starts_KBHPN[:n_states])
            dec_KBH = torch.exp(acum_KBHL[:n_states, ..., -1])
            dec_KBH11 = dec_KBH[..., None, None]
            for k in reversed(range(n_states)):
                gst_KBHPN[k] = G
                if k in G_direct:
                    G = torch.addcmul(G_direct[k], G, dec_KBH11[k])
                elif k > 0 or ctx.has_h0:
                    G = G * dec_KBH11[k]
            gdec_KBH = (gst_KBHPN * starts_KBHPN[:n_states]).sum((-1, -2))
            gacum_KBHL[:n_states, ..., -1] += gdec_KBH * dec_KBH

            # st = xd^T Bd with Bd = B * exp(acum_end - acum_l).
            gBd_KBHLN = xd_KBHLP[:n_states] @ gst_KBHPN
            gxd_RLP = gxd_KBHLP[:n_states].view(-1, L, P)
            gst_RNP = gst_KBHPN.view(-1, P, N).transpose(1, 2)
            torch.baddbmm(gxd_RLP, Bd_KBHLN.view(-1, L, N), gst_RNP, out=gxd_RLP)
            gB_KBLN[:n_states] += (gBd_KBHLN * to_end_KBHL[..., None]).sum(2)
            gte_KBHL = (gBd_KBHLN * Bd_KBHLN).sum(-1)
            gacum_KBHL[:n_states, ..., -1] += gte_KBHL.sum(-1)
            gacum_KBHL[:n_states] -= gte_KBHL
        gh0 = G if ctx.has_h0 else None

        # acum = cumsum(dt A) within the chunk: its gradient is a reverse cumsum.
        ga_KBHL = gacum_KBHL.flip(-1).cumsum(-1).flip(-1)
        dt_KBHL = dt_BKLH.permute(1, 0, 3, 2)
        # gx before gdt, so that gdt's and gD's products can overwrite gxd and the gy copy in place.
        x_KBHLP = x_BKLHP.permute(1, 0, 3, 2, 4)
        gx_BKLHP = torch.empty_like(x_BKLHP)
        torch.mul(gy_BKLHP, D_H[:, None], out=gx_BKLHP)
        gx_BKLHP.addcmul_(gxd_KBHLP.permute(1, 0, 3, 2, 4), dt_BKLH[..., None])
        gdt_KBHL = gxd_KBHLP.mul_(x_KBHLP).sum(-1).addcmul_(ga_KBHL, A_H[:, None])
        gA_H = (ga_KBHL * dt_KBHL).sum((0, 1, 3))
        gD_H = gy_KBHLP.mul_(x_KBHLP).sum((0, 1, 3, 4))
        gB_BKLN, gC_BKLN = gB_KBLN.transpose(0, 1), gC_KBLN.transpose(0, 1)
        return gx_BKLHP, gdt_KBHL.permute(1, 0, 3, 2), gA_H, gB_BKLN, gC_BKLN, gD_H, gh0, None


def ssd_scan(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_H: torch.Tensor,
    h0_BHPN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked SSD (Dao & Gu 2024, Sec. 6): within a chunk the output is a masked, decayed
    attention-like product (matmuls); chunk-final states pass between chunks by a K-step loop.
    See `_SSD`.

    The four matmuls are what `harness.models.mamba.flops_per_token` counts as "ssd": per padded
    token 2LN for C B^T and 2LHP for the diagonal blocks; per token of chunks 0..K-2, 2HPN for the
    chunk states and 2HPN for reading them in chunks 1..K-1 (h0=None, final_state=False).
    """
    dt = _compute_dtype(x_BTHP.dtype)
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.shape[-1]
    L = max(1, min(chunk_size, T))
    K = -(-T // L)
    pad = K * L - T
    x, dtv, Bm, Cm = (t.to(dt) for t in (x_BTHP, dt_BTH, B_BTN, C_BTN))
    if pad:
        # dt = 0 on the padding: decay 1 and no input, so the final state passes through unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dtv, Bm, Cm = (F.pad(t, (0, 0, 0, pad)) for t in (dtv, Bm, Cm))
    h0 = None if h0_BHPN is None else h0_BHPN.to(dt)
    # Autocast off: the inputs are already widened, and autocast would run the forward's matmuls in
    # bf16 while the hand-written backward (outside autocast) differentiates the fp32 function.
    with torch.autocast(x.device.type, enabled=False):
        y_BKLHP, h_BHPN = _SSD.apply(
            x.view(Bsz, K, L, H, P),
            dtv.view(Bsz, K, L, H),
            A_H.to(dt),
            Bm.view(Bsz, K, L, N),
            Cm.view(Bsz, K, L, N),
            D_H.to(dt),
            h0,
            final_state,
        )
    y_BTHP = y_BKLHP.view(Bsz, K * L, H, P)[:, :T]
    return y_BTHP.to(x_BTHP.dtype), (h_BHPN if final_state else None)


class _SSDNative(torch.autograd.Function):
    """The fused C kernel of `csrc/ssd_scan.c`: the recurrence, one (b, h, channel block) per task,
    with the state at the start of every `block` steps kept for the backward, which recomputes each
    block's states (as `_SelectiveScanNative` does)."""

    @staticmethod
    def forward(ctx, lib, x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, D_H, h0_BHPN, block, want_grad):
        Bsz, T, H, P = x_BTHP.shape
        N = B_BTN.shape[-1]
        K = -(-T // block)
        y_BTHP = torch.empty_like(x_BTHP)
        h_BHPN = torch.empty_like(h0_BHPN)
        starts_BKHPN = x_BTHP.new_empty(Bsz, K, H, P, N) if want_grad else None
        ins = [native.ptr(t) for t in (x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, D_H, h0_BHPN)]
        outs = [native.ptr(t) for t in (y_BTHP, h_BHPN, starts_BKHPN)]
        native.check(lib.ssd_fwd(torch.get_num_threads(), Bsz, T, H, P, N, block, *ins, *outs))
        ctx.lib, ctx.block = lib, block
        if want_grad:
            ctx.save_for_backward(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, D_H, starts_BKHPN)
        return y_BTHP, h_BHPN

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients come from C, with no graph
    def backward(ctx, gy_BTHP, gh_BHPN):
        x, dt, A, Bm, Cm, D_H, starts = ctx.saved_tensors
        Bsz, T, H, P = x.shape
        N, threads = Bm.shape[-1], torch.get_num_threads()
        J = -(-P // ctx.lib.ssd_lanes())  # channel blocks per head, one task each
        gy_BTHP = torch.zeros_like(x) if gy_BTHP is None else gy_BTHP.contiguous()
        gh_BHPN = None if gh_BHPN is None else gh_BHPN.contiguous()
        gx, gh0_BHPN = torch.empty_like(x), torch.empty_like(starts[:, 0])
        gdt_BHJT, gA_BHJ, gD_BHJ = x.new_empty(Bsz, H, J, T), x.new_empty(Bsz, H, J), x.new_empty(Bsz, H, J)
        gB_PBTN, gC_PBTN = x.new_zeros(threads, Bsz, T, N), x.new_zeros(threads, Bsz, T, N)
        args = [native.ptr(t) for t in (x, dt, A, Bm, Cm, D_H, starts, gy_BTHP, gh_BHPN)]
        args += [native.ptr(t) for t in (gx, gdt_BHJT, gA_BHJ, gB_PBTN, gC_PBTN, gD_BHJ, gh0_BHPN)]
        native.check(ctx.lib.ssd_bwd(threads, Bsz, T, H, P, N, ctx.block, *args))
        return (
            None,
            gx,
            gdt_BHJT.sum(2).transpose(1, 2),
            gA_BHJ.sum((0, 2)),
            gB_PBTN.sum(0),
            gC_PBTN.sum(0),
            gD_BHJ.sum((0, 2)),
            gh0_BHPN,
            None,
            None,
        )


def ssd_scan_native(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_H: torch.Tensor,
    h0_BHPN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU fast path in C (`harness.ops.native`): the SSD recurrence step by step, with states kept
    every `chunk_size` steps for the backward. The PyTorch `ssd_scan` where no compiler is."""
    dt = _compute_dtype(x_BTHP.dtype)
    lib = native.load("ssd_scan", dt) if x_BTHP.device.type == "cpu" else None
    if lib is None:
        return ssd_scan(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, D_H, h0_BHPN, chunk_size, final_state)
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.shape[-1]
    if h0_BHPN is None:
        h0_BHPN = torch.zeros(Bsz, H, P, N, dtype=dt)
    shapes = [(Bsz, T, H, P), (Bsz, T, H), (H,), (Bsz, T, N), (Bsz, T, N), (H,), (Bsz, H, P, N)]
    args = _full_size((x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, D_H, h0_BHPN), shapes, dt, "ssd_scan_native")
    y_BTHP, h_BHPN = _apply_native(_SSDNative, lib, args, chunk_size)
    return y_BTHP.to(x_BTHP.dtype), (h_BHPN if final_state else None)


@torch.compiler.disable  # Triton kernels with autotune hooks: run between compiled graphs
def ssd_scan_cuda(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_H: torch.Tensor,
    h0_BHPN: torch.Tensor | None = None,
    chunk_size: int = 64,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mamba-ssm's Triton SSD kernels (one group of B and C shared by all heads).

    Their matmuls take x, B and C in one dtype (fp32, fp16 or bf16), so B and C are cast to x's;
    dt, A, D and the initial state go in fp32, which the kernels read in fp32 anyway (under
    autocast dt + dt_bias is already fp32)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    in_dtype = x_BTHP.dtype
    if in_dtype not in _CUDA_DTYPES:
        raise ValueError(f"ssd_scan_cuda takes fp32, fp16 or bf16 inputs, not {in_dtype}")
    out = mamba_chunk_scan_combined(
        x_BTHP,
        dt_BTH.float(),
        A_H.float(),
        B_BTN.to(in_dtype)[:, :, None, :],
        C_BTN.to(in_dtype)[:, :, None, :],
        chunk_size,
        D=D_H.float(),
        initial_states=None if h0_BHPN is None else h0_BHPN.float(),
        return_final_states=final_state,
    )
    return out if final_state else (out, None)
