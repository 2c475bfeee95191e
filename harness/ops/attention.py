"""Causal softmax attention, and rotary position embeddings for its queries and keys.

Shape legend: B batch, H heads, T time (queries), S time (keys), D head dim, F = D / 2 (rotary
frequencies).
"""

import math

import torch
import torch.nn.functional as F


def causal_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """Fused path: picks flash / memory-efficient / math kernels as the device allows."""
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True)


def causal_attention_ref(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """What the fused path computes: softmax(q k^T / sqrt(D) + causal mask) v, in fp32 or wider."""
    T, S = q_BHTD.shape[-2], k_BHSD.shape[-2]
    acc = torch.promote_types(q_BHTD.dtype, torch.float32)
    scores_BHTS = (q_BHTD.to(acc) @ k_BHSD.to(acc).transpose(-1, -2)) / math.sqrt(q_BHTD.shape[-1])
    mask_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
    scores_BHTS = scores_BHTS.masked_fill(~mask_TS, float("-inf"))
    return (scores_BHTS.softmax(-1) @ v_BHSD.to(acc)).to(q_BHTD.dtype)


def _rotate(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """x * [cos, cos] + [x2, x1] * [-sin, sin]: three kernels, where the half-by-half formula of
    `rotary_ref` takes seven."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return torch.addcmul(x_BHTD * cos_TD, torch.cat([x2, x1], dim=-1), sin_TD)


class _Rotary(torch.autograd.Function):
    # The rotation is orthogonal, so its backward is the rotation by the opposite angles: three
    # kernels and no saved activations, where autograd through `rotary_ref` runs a dozen.
    @staticmethod
    def forward(ctx, x_BHTD, cos_TD, sin_TD):
        ctx.save_for_backward(cos_TD, sin_TD)
        return _rotate(x_BHTD, cos_TD, sin_TD)

    @staticmethod
    def backward(ctx, g_BHTD):
        cos_TD, sin_TD = ctx.saved_tensors
        return _rotate(g_BHTD, cos_TD, -sin_TD), None, None


def rotary(x_BHTD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Fast path of `rotary_ref` (equal up to rounding)."""
    T = x_BHTD.shape[-2]
    cos, sin = cos_TF[:T].to(x_BHTD.dtype), sin_TF[:T].to(x_BHTD.dtype)
    return _Rotary.apply(x_BHTD, torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))


def rotary_ref(x_BHTD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021), rotating the two halves of each head (GPT-NeoX layout):
    channel f and f + D/2 of position t turn by the angle t * base^(-2f/D)."""
    T = x_BHTD.shape[-2]
    cos, sin = cos_TF[:T].to(x_BHTD.dtype), sin_TF[:T].to(x_BHTD.dtype)
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
