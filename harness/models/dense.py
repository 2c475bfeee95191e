"""Dense Transformers: GPT-2 style (Radford et al. 2019) and Transformer++ (Llama style, Touvron et al. 2023).

GPT-2: learned absolute positions, LayerNorm with biases, GELU MLP with d_ff = 4 d_model.
Transformer++: rotary positions, RMSNorm, SwiGLU MLP, no biases.
Both are pre-norm with causal attention through `scaled_dot_product_attention`.
Deliberate deviation: both tie the head to the token embedding by default (vocab 256 makes the
difference negligible, and it keeps parameter counts comparable across families).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(kw_only=True)
class DenseConfig(LMConfig):
    family: str = "llama"
    n_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 0  # 0: 4 d_model (gelu) or the Llama rule 8/3 d_model rounded up to a multiple of 16
    mlp: str = "swiglu"  # "gelu" | "swiglu"
    pos: str = "rope"  # "rope" | "learned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_heads < 1:
            raise ValueError(f"model.n_heads must be >= 1, got {self.n_heads}")
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 16 * -(-8 * self.d_model // 3 // 16)
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos not in ("rope", "learned"):
            raise ValueError(f"model.pos must be 'rope' or 'learned', got {self.pos!r}")


@dataclass(kw_only=True)
class GPT2Config(DenseConfig):
    family: str = "gpt2"
    norm: str = "layer"
    bias: bool = True
    mlp: str = "gelu"
    pos: str = "learned"


def build(cfg: DenseConfig) -> LM:
    def make_block(i: int) -> Block:
        attn = CausalSelfAttention(
            cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.seq_len, cfg.pos == "rope", cfg.bias
        )
        return Block(cfg.d_model, cfg.norm, attn, MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias), cfg.bias)

    return LM(cfg, make_block, learned_pos=cfg.pos == "learned")


def param_count(cfg: DenseConfig) -> dict[str, int]:
    inner = cfg.n_heads * cfg.head_dim
    per_layer = {
        "attn": 4 * cfg.d_model * inner + ((3 * inner + cfg.d_model) if cfg.bias else 0),
        "mlp": mlp_params(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias),
        "norms": 2 * norm_params(cfg.norm, cfg.d_model, cfg.bias),
    }
    parts = {k: v * cfg.n_layers for k, v in per_layer.items()}
    parts.update(embedding_params(cfg, learned_pos=cfg.pos == "learned"))
    return parts


def flops_per_token(cfg: DenseConfig, seq_len: int, causal_half: bool = False) -> dict[str, int]:
    """Forward matmul FLOPs per token, by part (norms and elementwise work are not counted)."""
    attn = attention_flops(cfg.d_model, cfg.n_heads, cfg.head_dim, seq_len, causal_half)
    return {
        "attn_proj": cfg.n_layers * attn["attn_proj"],
        "attn_scores": cfg.n_layers * attn["attn_scores"],
        "mlp": cfg.n_layers * mlp_flops(cfg.d_model, cfg.d_ff, cfg.mlp),
        "head": head_flops(cfg),
    }
