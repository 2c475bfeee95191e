"""A minimal GPT-2 in the manner of karpathy/nanoGPT's model.py: the yardstick `bench_train.py`
holds the `gpt2` family to.

Written to compute exactly what `harness.models.dense` builds for `family: gpt2`, so that a speed
gap measures overhead, not a different model:
- learned positions, pre-norm LayerNorm with biases (eps 1e-5), biases on every linear but the head;
- one fused q/k/v projection, `scaled_dot_product_attention(is_causal=True)`;
- GELU with the tanh approximation (GPT-2's; nanoGPT's `nn.GELU()` uses the exact erf, which
  would be a different function and, on CPU, a different cost);
- the head tied to the token embedding, N(0, 0.02) init with residual outputs at 0.02 / sqrt(2 L);
- no dropout modules: the harness has none, and nanoGPT's are identities at p = 0 anyway;
- the vocabulary is not padded to a multiple of 64 (the harness's 256 bytes already is).
It returns logits for every position; the loss is computed outside, the same way for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TwinConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256


class SelfAttention(nn.Module):
    def __init__(self, c: TwinConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, c: TwinConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Layer(nn.Module):
    def __init__(self, c: TwinConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = FeedForward(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TwinGPT(nn.Module):
    def __init__(self, c: TwinConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Layer(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer in self.h:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def twin_of(cfg) -> TwinGPT:
    """The twin at a `gpt2` config's shape; refuses a config the twin does not compute the same."""
    if cfg.family != "gpt2" or cfg.mlp != "gelu" or cfg.pos != "learned" or cfg.norm != "layer":
        raise ValueError(f"the nanoGPT twin only mirrors the gpt2 family's defaults, got {cfg}")
    if not cfg.bias or not cfg.tie_embeddings or cfg.d_ff != 4 * cfg.d_model:
        raise ValueError("the nanoGPT twin has biases, a tied head and d_ff = 4 d_model")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ValueError("the nanoGPT twin has n_heads * head_dim = d_model")
    return TwinGPT(TwinConfig(cfg.vocab_size, cfg.seq_len, cfg.n_layers, cfg.n_heads, cfg.d_model))
