"""Causal softmax attention.

Shape legend: B batch, H heads, T time (queries), S time (keys), D head dim.
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
