"""Soft MoE dispatch and combine (Puigcerver et al. 2023), global and causal sliding-window.

Shape legend: B batch, T time (tokens), S slots, L window length (= slots per window = chunk_size),
C chunks of L tokens, K keys (2 L: the previous chunk and the current one), D model width.

Global (the paper, non-causal): logits (B, T, S) are shared by both steps.
  dispatch: slot s = sum_t softmax_t(logits[:, s]) x_t          (a convex mix of ALL tokens)
  combine:  out t  = sum_s softmax_s(logits[t, :]) ys_s          (a convex mix of ALL slots)

Sliding (causal): one slot is anchored at every position a and uses slot parameter j = a mod L, so
any window of L consecutive anchors holds each of the L slot parameters exactly once. Logits are
(B, T, L): logits[t, j] scores token t against slot parameter j.
  dispatch: slot a = sum_{s in (a-L, a]} softmax_s(logits[s, a mod L]) x_s
  combine:  out t  = sum_{a in (t-L, t]} softmax_a(logits[t, a mod L]) ys_a
Both softmaxes run over the tokens/anchors inside the window that exist (s, a >= 0), so slot a sees
only tokens <= a and token t reads only slots <= t: strictly causal, each sequence on its own.

The fast sliding path splits time into chunks of L: anchors of chunk c see keys in chunks c-1 and c,
so each step is one (L x 2L) masked matmul per chunk (4 L D FLOPs per token where the window needs
2 L D; the masked half is the price of dense batched matmuls instead of a gather).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(z: torch.Tensor) -> torch.Tensor:
    """At least fp32 (the refs' precision); fp64 stays fp64 so tests can compare tightly."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def soft_dispatch(x_BTD: torch.Tensor, logits_BTS: torch.Tensor) -> torch.Tensor:
    """Slots as softmax-over-tokens mixtures of all tokens: returns (B, S, D)."""
    w_BTS = logits_BTS.softmax(dim=1)
    return w_BTS.transpose(1, 2) @ x_BTD


def soft_dispatch_ref(x_BTD: torch.Tensor, logits_BTS: torch.Tensor) -> torch.Tensor:
    """Paper eq. (1): D_ij = exp(logits_ij) / sum_i' exp(logits_i'j), slot j = sum_i D_ij x_i."""
    B, T, D = x_BTD.shape
    S = logits_BTS.shape[-1]
    x, lg = _up(x_BTD), _up(logits_BTS)
    out = torch.zeros(B, S, D, dtype=x.dtype, device=x_BTD.device)
    for b in range(B):
        for j in range(S):
            e = torch.exp(lg[b, :, j] - lg[b, :, j].max())
            w = e / e.sum()
            for i in range(T):
                out[b, j] += w[i] * x[b, i]
    return out.to(x_BTD.dtype)


def soft_combine(ys_BSD: torch.Tensor, logits_BTS: torch.Tensor) -> torch.Tensor:
    """Tokens as softmax-over-slots mixtures of all slot outputs: returns (B, T, D)."""
    return logits_BTS.softmax(dim=-1) @ ys_BSD


def soft_combine_ref(ys_BSD: torch.Tensor, logits_BTS: torch.Tensor) -> torch.Tensor:
    """Paper eq. (2): C_ij = exp(logits_ij) / sum_j' exp(logits_ij'), out i = sum_j C_ij ys_j."""
    B, T, S = logits_BTS.shape
    ys, lg = _up(ys_BSD), _up(logits_BTS)
    out = torch.zeros(B, T, ys.shape[-1], dtype=ys.dtype, device=ys_BSD.device)
    for b in range(B):
        for i in range(T):
            e = torch.exp(lg[b, i] - lg[b, i].max())
            w = e / e.sum()
            for j in range(S):
                out[b, i] += w[j] * ys[b, j]
    return out.to(ys_BSD.dtype)


def _window_mask(L: int, C: int, device: torch.device) -> torch.Tensor:
    """(C, L, 2L) bool: position i of chunk c may use key k (k < L: previous chunk, k >= L: this
    chunk) iff the key lies in the window (i, i + L], and chunk -1 (padding) is never used."""
    i = torch.arange(L, device=device)[:, None]
    k = torch.arange(2 * L, device=device)[None, :]
    in_window_LK = (k > i) & (k <= i + L)
    mask_CLK = in_window_LK.expand(C, L, 2 * L).clone()
    mask_CLK[0, :, :L] = False
    return mask_CLK


def _chunks_with_previous(z_BTX: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, X) zero-padded to C chunks of L -> (this chunk (B, C, L, X), keys (B, C, 2L, X))."""
    B, T, X = z_BTX.shape
    C = -(-T // L)
    z_BCLX = F.pad(z_BTX, (0, 0, 0, C * L - T)).view(B, C, L, X)
    prev_BCLX = F.pad(z_BCLX, (0, 0, 0, 0, 1, 0))[:, :C]
    return z_BCLX, torch.cat([prev_BCLX, z_BCLX], dim=2)


def sliding_dispatch(x_BTD: torch.Tensor, logits_BTL: torch.Tensor) -> torch.Tensor:
    """Causal slots, one anchored at every position: returns (B, T, D)."""
    B, T, D = x_BTD.shape
    L = logits_BTL.shape[-1]
    _, xk_BCKD = _chunks_with_previous(x_BTD, L)
    _, lk_BCKL = _chunks_with_previous(logits_BTL, L)
    C = xk_BCKD.shape[1]
    # anchor i of chunk c has slot parameter i, so it scores key k with logits[key k, i]
    scores_BCLK = lk_BCKL.transpose(-1, -2)
    mask_CLK = _window_mask(L, C, x_BTD.device)
    w_BCLK = scores_BCLK.masked_fill(~mask_CLK, float("-inf")).softmax(dim=-1)
    return (w_BCLK @ xk_BCKD).reshape(B, C * L, D)[:, :T]


def sliding_dispatch_ref(x_BTD: torch.Tensor, logits_BTL: torch.Tensor) -> torch.Tensor:
    """Slot a = prefix-normalised softmax mix of tokens s in (a - L, a], with slot parameter a mod L."""
    B, T, D = x_BTD.shape
    L = logits_BTL.shape[-1]
    x, lg = _up(x_BTD), _up(logits_BTL)
    out = torch.zeros(B, T, D, dtype=x.dtype, device=x_BTD.device)
    for b in range(B):
        for a in range(T):
            j = a % L
            window = range(max(0, a - L + 1), a + 1)
            z = torch.stack([lg[b, s, j] for s in window])
            e = torch.exp(z - z.max())
            w = e / e.sum()
            for n, s in enumerate(window):
                out[b, a] += w[n] * x[b, s]
    return out.to(x_BTD.dtype)


def sliding_combine(ys_BTD: torch.Tensor, logits_BTL: torch.Tensor) -> torch.Tensor:
    """Token t = softmax mix of the slot outputs anchored in (t - L, t]: returns (B, T, D)."""
    B, T, D = ys_BTD.shape
    L = logits_BTL.shape[-1]
    _, yk_BCKD = _chunks_with_previous(ys_BTD, L)
    l_BCLL, _ = _chunks_with_previous(logits_BTL, L)
    C = yk_BCKD.shape[1]
    # key k (either chunk) is anchored at a position with slot parameter k mod L
    scores_BCLK = torch.cat([l_BCLL, l_BCLL], dim=-1)
    mask_CLK = _window_mask(L, C, ys_BTD.device)
    w_BCLK = scores_BCLK.masked_fill(~mask_CLK, float("-inf")).softmax(dim=-1)
    return (w_BCLK @ yk_BCKD).reshape(B, C * L, D)[:, :T]


def sliding_combine_ref(ys_BTD: torch.Tensor, logits_BTL: torch.Tensor) -> torch.Tensor:
    """Token t = softmax over anchors a in (t - L, t] of logits[t, a mod L], times slot output a."""
    B, T, D = ys_BTD.shape
    L = logits_BTL.shape[-1]
    ys, lg = _up(ys_BTD), _up(logits_BTL)
    out = torch.zeros(B, T, D, dtype=ys.dtype, device=ys_BTD.device)
    for b in range(B):
        for t in range(T):
            window = range(max(0, t - L + 1), t + 1)
            z = torch.stack([lg[b, t, a % L] for a in window])
            e = torch.exp(z - z.max())
            w = e / e.sum()
            for n, a in enumerate(window):
                out[b, t] += w[n] * ys[b, a]
    return out.to(ys_BTD.dtype)
