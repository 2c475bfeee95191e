"""Blocks shared by two or more families, and the one backbone they all use.

Every family is `embed -> n_layers x Block(sequence mixer, channel mixer) -> norm -> head`; families
differ only in what fills the two mixer slots, so a comparison measures the mixer rather than
incidental differences in embedding, norms or init.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.ops.attention import (
    causal_attention,
    causal_attention_ref,
    rotary_qkv_,
    rotary_qkv_ref,
    split_heads,
)


@dataclass(kw_only=True)
class LMConfig:
    """Fields every family shares. Families subclass this and add their own (R4 vocabulary)."""

    family: str
    name: str = ""  # label used in tables and plots; defaults to the family
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    norm: str = "rms"  # "rms" | "layer"
    bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.family
        for f in ("vocab_size", "seq_len", "d_model", "n_layers"):
            if getattr(self, f) < 1:
                raise ValueError(f"model.{f} must be >= 1, got {getattr(self, f)}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"model.norm must be 'rms' or 'layer', got {self.norm!r}")


@dataclass
class LMOutput:
    """What every model returns. `aux_losses` are already weighted and are added to the LM loss;
    `metrics` are logged only (e.g. routing statistics)."""

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class _RMSNormFn(torch.autograd.Function):
    """y = x * rstd * w with rstd = (mean(x^2) + eps)^-1/2 over the last dim (C wide), with the
    backward written out: with p = g * x and s = p @ w (per row, the sum of g w x),
    dw = rstd @ p and dx = rstd * g * w - x * rstd^3 * s / C, the two reductions as matrix-vector
    products. Nine passes over the activations (three forward), where autograd through PyTorch's
    composite CPU kernel runs about twenty kernels: forward and backward 2-3x faster at 2048 x 256."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, rstd, weight = ctx.saved_tensors
        C = x.shape[-1]
        g_NC, x_NC, rstd_N1 = g.reshape(-1, C), x.reshape(-1, C), rstd.reshape(-1, 1)  # N = all rows
        p_NC = g_NC * x_NC
        dw = rstd_N1.squeeze(1) @ p_NC
        coef_N1 = rstd_N1.pow(3).mul_((p_NC @ weight).unsqueeze(1)).div_(-C)
        dx = torch.mul(g_NC, weight).mul_(rstd_N1).addcmul_(x_NC, coef_N1)
        return dx.view_as(x), dw, None


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and state dict) with the hand-written backward above where
    PyTorch has no fused one: on CPU, fp32 or fp64 input and weight of one dtype. Equal to it up to
    rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = (
            x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and x.dtype in (torch.float32, torch.float64)
        )
        if not fast or torch.compiler.is_compiling():  # compiled, the composite is fused anyway
            return super().forward(x)
        return _RMSNormFn.apply(
            x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        )


def make_norm(kind: str, d: int, bias: bool = False) -> nn.Module:
    if kind == "rms":
        return RMSNorm(d, eps=1e-6)
    return nn.LayerNorm(d, bias=bias)


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer 2020, as in Llama)."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", bias: bool = False):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.w_gate = nn.Linear(d_model, d_ff, bias=bias)
        elif kind != "gelu":
            raise ValueError(f"unknown mlp kind {kind!r} (gelu, swiglu)")
        self.w_in = nn.Linear(d_model, d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)
        self.w_out.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w_out(F.silu(self.w_gate(x)) * self.w_in(x))
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


def mlp_flops(d_model: int, d_ff: int, kind: str) -> int:
    """Forward matmul FLOPs per token of `MLP` (a multiply-add is 2 FLOPs)."""
    return 2 * d_model * d_ff * (3 if kind == "swiglu" else 2)


def mlp_params(d_model: int, d_ff: int, kind: str, bias: bool) -> int:
    n_in = 2 if kind == "swiglu" else 1
    return n_in * (d_model * d_ff + (d_ff if bias else 0)) + d_ff * d_model + (d_model if bias else 0)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_TF = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_TF.cos().float(), angles_TF.sin().float()


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, seq_len: int, rope: bool, bias: bool):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.proj.is_residual_out = True
        self.rope = rope
        if rope:
            cos, sin = rope_tables(seq_len, head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reference = False  # tests flip this to use the explicit rotary and masked-softmax paths

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        qkv = self.qkv(x_BTC)
        if self.rope:
            rope = rotary_qkv_ref if self.reference else rotary_qkv_
            q, k, v = rope(qkv, self.rope_cos, self.rope_sin, self.n_heads)  # each (B, H, T, D)
        else:
            q, k, v = split_heads(qkv, self.n_heads)
        attn = causal_attention_ref if self.reference else causal_attention
        y = attn(q, k, v).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)


def attention_flops(
    d_model: int, n_heads: int, head_dim: int, seq_len: int, causal_half: bool
) -> dict[str, int]:
    """Forward FLOPs per token of `CausalSelfAttention`.

    Scores (q k^T) and the weighted sum (p v) each cost 2 * n_heads * head_dim per (query, key) pair.
    By default every query is charged all `seq_len` keys, as the fused kernel's FLOP counter and
    Hoffmann et al. 2022 count; `causal_half=True` charges the (seq_len + 1) / 2 keys a query
    actually sees on average.
    """
    inner = n_heads * head_dim
    keys = (seq_len + 1) / 2 if causal_half else seq_len
    return {
        "attn_proj": 2 * d_model * 3 * inner + 2 * inner * d_model,
        "attn_scores": int(round(2 * 2 * inner * keys)),
    }


class Block(nn.Module):
    """Pre-norm residual block: x + seq_mixer(norm(x)), then x + channel_mixer(norm(x)).
    A family without a channel mixer (Mamba) passes None."""

    def __init__(
        self,
        d_model: int,
        norm: str,
        seq_mixer: nn.Module,
        channel_mixer: nn.Module | None,
        bias: bool = False,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, bias)
        self.seq_mixer = seq_mixer
        self.norm2 = make_norm(norm, d_model, bias) if channel_mixer is not None else None
        self.channel_mixer = channel_mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.seq_mixer(self.norm1(x))
        if self.channel_mixer is not None:
            x = x + self.channel_mixer(self.norm2(x))
        return x


class LM(nn.Module):
    """Token embedding (+ optional learned positions) -> blocks -> final norm -> head.

    Mixers that produce auxiliary losses or metrics store them as dicts in `last_aux` /
    `last_metrics` during forward; the backbone collects them into `LMOutput`.
    """

    def __init__(self, cfg: LMConfig, make_block: Callable[[int], nn.Module], learned_pos: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if learned_pos else None
        self.blocks = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            # GPT-2: residual output projections scaled by 1/sqrt(2 n_layers) so the residual
            # stream's variance does not grow with depth.
            s = std / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "is_residual_out", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def forward(self, idx_BT: torch.Tensor) -> LMOutput:
        T = idx_BT.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.tok_emb(idx_BT)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx_BT.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm_f(x))
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for m in self.modules():
            # the instance dict, not getattr: a miss on nn.Module raises and catches an
            # AttributeError inside, twice per module: 15% of forward and backward at d_model 32
            state = vars(m)
            for k, v in state.get("last_aux", {}).items():
                aux[k] = aux.get(k, 0) + v
            for k, v in state.get("last_metrics", {}).items():
                metrics[k] = v
        return LMOutput(logits=logits, aux_losses=aux, metrics=metrics)


def embedding_params(cfg: LMConfig, learned_pos: bool = False) -> dict[str, int]:
    """Parameter counts of the parts `LM` adds around the blocks."""
    parts = {
        "embedding": cfg.vocab_size * cfg.d_model,
        "pos_embedding": cfg.seq_len * cfg.d_model if learned_pos else 0,
        "head": 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model,
        "final_norm": norm_params(cfg.norm, cfg.d_model, cfg.bias),
    }
    return parts


def norm_params(kind: str, d: int, bias: bool) -> int:
    return d if kind == "rms" else d * (2 if bias else 1)


def head_flops(cfg: LMConfig) -> int:
    return 2 * cfg.d_model * cfg.vocab_size
