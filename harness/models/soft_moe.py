"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts") and a causal variant.

Backbone: Transformer++ (RoPE attention, RMSNorm, no biases). Soft MoE replaces the MLP in every
`moe_every`-th layer; the other layers keep a dense MLP of the expert's width. Experts are SwiGLU or
GELU MLPs as wide as the dense MLP they replace (the paper's choice).

variant="original" (NOT causal; for reference and for non-LM use). As published: with n experts and
p slots per expert there are S = n p slot parameters phi_j. Logits = l2norm(x_t) . (scale *
l2norm(phi_j)) with a learned scalar `scale` (init 1). Dispatch weights are a softmax over the
tokens of the whole sequence for each slot; slot j (expert j // p) is the weighted mix of the
tokens; combine weights are a softmax over all S slots for each token. Every slot mixes the whole
sequence, so position t sees the future: `causal` is False, a training run refuses it unless
allow_noncausal=true, and its results are flagged not comparable.

variant="sliding" (causal; our design). Slots are staggered in time: one slot is anchored at every
position a. It uses slot parameter j = a mod L (L = chunk_size = n p) and expert a mod n, and
dispatches from the L tokens (a - L, a] only, with the softmax normalised over that window (the
prefix, for a < L - 1). Token t combines the L slot outputs anchored in (t - L, t], with a softmax
over them of its logits against their slot parameters. Any L consecutive anchors carry each slot
parameter exactly once, so once t >= L - 1 a token's combine softmax runs over all S = L slot
parameters, exactly as in the original with a group of L tokens. Slot a depends on tokens <= a and
output t on slots <= t, so the layer is strictly autoregressive, and nothing crosses the batch.

Why this design: a layer whose compute per token is one expert evaluation can give the current
token's own content to an expert only through the O(1) slots anchored at its own position (any slot
it reads must close at or before t, any slot holding x_t must close at or after t). Segment-delayed
designs (slots for segment g built from segments < g, as in Lory's routing) never let x_t itself
reach an expert; cumulative prefix-normalised slots evaluated per token cost n p experts per token.
Staggering one slot per position keeps (a) one expert evaluation per token, independent of n, as the
original has with S = T; (b) the current token in the slot anchored at it (its dispatch can weight x_t
fully); (c) every expert reachable from every token, with a routing delay: a token chosen by expert
e is processed at the next anchor of e (at most n - 1 positions later) and read by later tokens.
Trade-offs: routing to a data-dependent expert is delayed by up to n - 1 tokens; slots only mix
tokens inside a window of L (attention carries longer context); the router costs ~10 L d FLOPs per
token per layer, which grows with L, not with n, so fix chunk_size when scaling n_experts.

FLOPs per token of one Soft MoE layer (multiply-add = 2), d = d_model, S = n p:
  original: logits 2 d S, dispatch 2 S d, combine 2 S d, experts (S / T) * mlp_flops(d, d_ff).
  sliding:  logits 2 d L, dispatch 4 L d, combine 4 L d, experts mlp_flops(d, d_ff). The dense
            chunked matmuls compute 2L keys per anchor of which L are in the window;
            causal_half=True charges only those (2 L d each), as attention's causal_half does.
Sizing: every width derives from d_model (head_dim = d_model / n_heads, d_ff by the Llama rule), so
a sizer that sets d_model and n_layers gets a model whose FLOPs are a dense Transformer++'s plus the
router's 10 L d per Soft MoE layer; `flops_per_token` is the number to match. Parameters grow n-fold
in the MoE layers.

Deliberate deviations: the experts have no biases (Transformer++); `inactive_params` counts all but
one expert per layer as inactive, the compute-equivalent share (each token's expert compute is one
expert when S = T), although every expert's output does reach every token through the combine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.layers import (
    LM,
    MLP,
    Block,
    CausalSelfAttention,
    LMConfig,
    attention_flops,
    embedding_params,
    head_flops,
    mlp_flops,
    mlp_params,
    norm_params,
)
from harness.ops import kernels
from harness.ops import soft_dispatch as ops

VARIANTS = ("sliding", "original")
OPS = {
    "soft": (ops.soft_dispatch, ops.soft_combine),
    "soft_ref": (ops.soft_dispatch_ref, ops.soft_combine_ref),
    "sliding": (ops.sliding_dispatch, ops.sliding_combine),
    "sliding_ref": (ops.sliding_dispatch_ref, ops.sliding_combine_ref),
}


@dataclass(kw_only=True)
class SoftMoEConfig(LMConfig):
    family: str = "soft_moe"
    variant: str = "sliding"  # "sliding" (causal) | "original" (the paper; not causal)
    causal: bool | None = None  # derived from variant; may be given only with its derived value
    n_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 0  # expert and dense-MLP width; 0: the Llama rule (swiglu) or 4 d_model (gelu)
    mlp: str = "swiglu"  # expert kind: "swiglu" | "gelu"
    n_experts: int = 8
    slots_per_expert: int = 0  # p; 0: chunk_size // n_experts (sliding), seq_len // n_experts (original)
    chunk_size: int = 0  # sliding window L = n_experts * slots_per_expert; 0: 32 (or seq_len if smaller)
    moe_every: int = 1  # Soft MoE replaces the MLP of layers i with (i + 1) % moe_every == 0
    backend: str = "auto"  # "torch" | "auto" (no fused kernel exists; both run the torch path)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {VARIANTS}, got {self.variant!r}")
        derived = self.variant != "original"
        if self.causal is not None and self.causal != derived:
            raise ValueError(
                f"model.causal is derived from model.variant: variant={self.variant!r} is "
                f"{'causal' if derived else 'not causal'}; leave causal unset"
            )
        self.causal = derived
        if self.bias:
            raise ValueError(
                "soft_moe uses the Transformer++ backbone, which has no biases (model.bias=false)"
            )
        if self.n_heads < 1 or self.n_experts < 1 or self.moe_every < 1:
            raise ValueError("model.n_heads, model.n_experts and model.moe_every must be >= 1")
        if self.moe_every > self.n_layers:  # else the model has no Soft MoE layer: a plain Transformer++
            raise ValueError(
                f"model.moe_every={self.moe_every} exceeds n_layers={self.n_layers}: no Soft MoE layer"
            )
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 16 * -(-8 * self.d_model // 3 // 16)
        if self.backend not in ("torch", "auto"):
            raise ValueError(
                f"model.backend must be 'torch' or 'auto' (soft_moe has no fused kernel), got {self.backend!r}"
            )
        if self.slots_per_expert < 0 or self.chunk_size < 0:
            raise ValueError("model.slots_per_expert and model.chunk_size must be >= 0 (0: derived)")
        n = self.n_experts
        if self.variant == "original":
            if self.chunk_size:
                raise ValueError(
                    "model.chunk_size is used only by variant=sliding; the original mixes the whole sequence"
                )
            self.slots_per_expert = self.slots_per_expert or max(1, self.seq_len // n)
            return
        if self.chunk_size == 0:
            self.chunk_size = n * self.slots_per_expert if self.slots_per_expert else min(32, self.seq_len)
        if self.slots_per_expert == 0:
            self.slots_per_expert = self.chunk_size // n
        if self.slots_per_expert < 1 or self.chunk_size != n * self.slots_per_expert:
            raise ValueError(
                f"variant=sliding needs chunk_size = n_experts * slots_per_expert, got chunk_size="
                f"{self.chunk_size}, n_experts={n}, slots_per_expert={self.slots_per_expert}"
            )
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"model.seq_len={self.seq_len} must be a multiple of chunk_size={self.chunk_size}"
            )

    @property
    def n_slots(self) -> int:
        return self.n_experts * self.slots_per_expert

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0


class Experts(nn.Module):
    """n independent MLPs with stacked weights, so all experts run as one batched matmul."""

    def __init__(self, n: int, d_model: int, d_ff: int, kind: str, std: float, out_std: float):
        super().__init__()
        self.kind = kind
        self.w_in = nn.Parameter(torch.randn(n, d_model, d_ff) * std)
        self.w_gate = nn.Parameter(torch.randn(n, d_model, d_ff) * std) if kind == "swiglu" else None
        self.w_out = nn.Parameter(torch.randn(n, d_ff, d_model) * out_std)

    def forward(self, x_GND: torch.Tensor) -> torch.Tensor:
        """x_GND: G groups of one slot per expert (expert on dim N) -> (G, N, D)."""
        h = torch.einsum("gnd,ndf->gnf", x_GND, self.w_in)
        if self.w_gate is not None:
            h = F.silu(torch.einsum("gnd,ndf->gnf", x_GND, self.w_gate)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        return torch.einsum("gnf,nfd->gnd", h, self.w_out)


class SoftMoE(nn.Module):
    """Channel mixer: router (normalised logits), dispatch, experts, combine."""

    def __init__(self, cfg: SoftMoEConfig, layer: int):
        super().__init__()
        self.variant, self.n, self.p, self.layer = cfg.variant, cfg.n_experts, cfg.slots_per_expert, layer
        # Slot parameters are l2-normalised in forward, so only their direction matters at init.
        self.phi = nn.Parameter(torch.randn(cfg.d_model, cfg.n_slots))
        self.scale = nn.Parameter(torch.ones(()))
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.mlp, cfg.init_std, out_std)
        self.naive = False  # tests: route through the *_ref loops
        self.last_metrics: dict[str, torch.Tensor] = {}

    def router_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # Paper sec. 2.3: normalise tokens and slot parameters, then a learned scale, so the logits
        # stay bounded (|logit| <= scale) whatever the residual stream's norm.
        x_hat = x_BTD * torch.rsqrt(x_BTD.pow(2).sum(-1, keepdim=True) + 1e-6)
        phi_hat = self.scale * self.phi * torch.rsqrt(self.phi.pow(2).sum(0, keepdim=True) + 1e-6)
        return x_hat @ phi_hat.to(x_hat.dtype)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        logits = self.router_logits(x_BTD)
        kind = ("soft" if self.variant == "original" else "sliding") + ("_ref" if self.naive else "")
        kernels.note("soft_moe", f"{self.variant} dispatch", "loop (reference)" if self.naive else "torch")
        dispatch, combine = OPS[kind]
        slots = dispatch(x_BTD, logits)
        if self.variant == "original":
            # slot j = e p + q belongs to expert e = j // p (the paper's (n, p) layout); (B, S, D) -> (B p, n, D)
            slots_GND = slots.view(B, self.n, self.p, D).transpose(1, 2).reshape(B * self.p, self.n, D)
            ys = self.experts(slots_GND).reshape(B, self.p, self.n, D).transpose(1, 2).reshape(B, -1, D)
        else:
            # the slot anchored at position a goes to expert a mod n (n divides L); (B, T, D) -> (B T / n, n, D)
            Tp = -(-T // self.n) * self.n
            slots_GND = F.pad(slots, (0, 0, 0, Tp - T)).view(B * Tp // self.n, self.n, D)
            ys = self.experts(slots_GND).reshape(B, Tp, D)[:, :T]
        out = combine(ys, logits)
        self.last_metrics = {f"soft_moe/l{self.layer}_scale": self.scale.detach()}
        return out


def build(cfg: SoftMoEConfig) -> LM:
    def make_block(i: int) -> Block:
        attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.seq_len, True, False)
        mixer = SoftMoE(cfg, i) if cfg.is_moe_layer(i) else MLP(cfg.d_model, cfg.d_ff, cfg.mlp)
        return Block(cfg.d_model, cfg.norm, attn, mixer)

    return LM(cfg, make_block)


def _n_moe(cfg: SoftMoEConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def param_count(cfg: SoftMoEConfig) -> dict[str, int]:
    inner = cfg.n_heads * cfg.head_dim
    n_moe = _n_moe(cfg)
    expert = mlp_params(cfg.d_model, cfg.d_ff, cfg.mlp, False)
    parts = {
        "attn": cfg.n_layers * 4 * cfg.d_model * inner,
        "mlp": (cfg.n_layers - n_moe) * expert,
        "experts": n_moe * cfg.n_experts * expert,
        "router": n_moe * (cfg.d_model * cfg.n_slots + 1),
        "norms": cfg.n_layers * 2 * norm_params(cfg.norm, cfg.d_model, False),
    }
    parts.update(embedding_params(cfg))
    return parts


def inactive_params(cfg: SoftMoEConfig) -> int:
    return _n_moe(cfg) * (cfg.n_experts - 1) * mlp_params(cfg.d_model, cfg.d_ff, cfg.mlp, False)


def flops_per_token(cfg: SoftMoEConfig, seq_len: int, causal_half: bool = False) -> dict[str, int]:
    """Forward matmul FLOPs per token by part (see the module docstring for the formulas)."""
    attn = attention_flops(cfg.d_model, cfg.n_heads, cfg.head_dim, seq_len, causal_half)
    n_moe = _n_moe(cfg)
    d, S, expert = cfg.d_model, cfg.n_slots, mlp_flops(cfg.d_model, cfg.d_ff, cfg.mlp)
    if cfg.variant == "original":
        mix = 2 * S * d
        experts = round(S * expert / seq_len)
    else:
        mix = (2 if causal_half else 4) * S * d
        experts = expert
    return {
        "attn_proj": cfg.n_layers * attn["attn_proj"],
        "attn_scores": cfg.n_layers * attn["attn_scores"],
        "mlp": (cfg.n_layers - n_moe) * expert,
        "soft_moe_router": n_moe * 2 * d * S,
        "soft_moe_dispatch": n_moe * mix,
        "soft_moe_combine": n_moe * mix,
        "soft_moe_experts": n_moe * experts,
        "head": head_flops(cfg),
    }
