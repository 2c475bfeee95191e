"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch") and RWKV-7 "Goose" (Peng et al. 2025).

Both fill the shared block's slots with a time mix (sequence mixer) and a channel mix, with
LayerNorm as RWKV uses. RWKV-6: data-dependent token shift (ddlerp, a LoRA over the shifted
difference), data-dependent per-channel decay, bonus u, a K x V state per head, GroupNorm over
heads, SiLU output gate; channel mix with squared ReLU and a sigmoid receptance gate. RWKV-7: the
generalised delta rule S_t = S_{t-1}(diag(w_t) - k^_t^T (a_t k^_t)) + v_t^T k~_t with in-context
learning rate a_t, decay w_t = exp(-e^-0.5 sigmoid(.)), value residual to the first layer's v,
plain lerp token shift, a bonus (r . k . rho) v, sigmoid LoRA gate; channel mix without a gate.
Initialisation of the mixing, decay and LoRA parameters follows the papers' reference code.

Backends: "auto" runs flash-linear-attention's chunked kernels on CUDA when it imports, otherwise
the chunked PyTorch form of `harness.ops.wkv`; the first forward logs which
(`harness.ops.kernels.note`). Blocks compile with torch.compile: the fla call runs between compiled
graphs, and the PyTorch form reads one scalar per call to pick its intra-chunk scores (each a
graph break).

Deliberate deviations: no extra LayerNorm after the embedding (`ln0`), and the shared backbone's
init for the linear projections, so all families start from the same embedding/linear init.
`bias` adds biases to the LayerNorms only; RWKV's linears have none.

FLOPs: the projections and LoRAs are matmuls and are counted exactly. The WKV recurrence is counted
as `ew_wkv`, the multiply-adds of the sequential recurrence per token; the counted model is pointed
at `wkv*_ref`, which has no matmuls (`reference` attribute). The chunked form the model trains with
does more work than the recurrence (about 2 L K more multiply-adds per token and head for the
intra-chunk scores) in fewer, larger operations; `ew_wkv` charges the recurrence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.layers import LM, Block, LMConfig, embedding_params, head_flops, norm_params
from harness.ops import kernels
from harness.ops.wkv import (
    BACKENDS,
    pick_backend,
    wkv6,
    wkv6_recurrent,
    wkv6_ref,
    wkv7,
    wkv7_recurrent,
    wkv7_ref,
)

_KERNELS = {"torch": "torch (chunked)", "cuda": "flash-linear-attention"}  # for kernels.note


def _lora_rank(d_model: int, factor: float, power: float) -> int:
    """The RWKV-7 reference code's rank rule, round(factor * C^power / 32) * 32, which gives 32 or 64
    at GPT-2 widths; a model too narrow for 32 gets C / 4 (at least 4)."""
    r = int(round(factor * d_model**power / 32)) * 32
    return r if r > 0 else max(4, d_model // 4)


@dataclass(kw_only=True)
class RWKVConfig(LMConfig):
    family: str = "rwkv6"
    version: int = 6  # 6 (Finch) or 7 (Goose); must agree with the family name
    norm: str = "layer"
    bias: bool = True
    head_dim: int = 0  # 0: 64, or the largest divisor of d_model below 64
    n_heads: int = 0  # 0: d_model // head_dim
    d_ff: int = 0  # 0: 3.5 d_model rounded down to 32 (RWKV-6) or 4 d_model (RWKV-7), as the papers
    mix_rank: int = 0  # RWKV-6 ddlerp LoRA (0: 32 at GPT-2 widths)
    decay_rank: int = 0  # decay LoRA (0: 64 at GPT-2 widths)
    iclr_rank: int = 0  # RWKV-7 in-context learning rate LoRA
    value_rank: int = 0  # RWKV-7 value-residual LoRA
    gate_rank: int = 0  # RWKV-7 output gate LoRA
    chunk_size: int = 32  # chunked WKV length; benchmarks/bench_wkv.py compares 16, 32, 64
    backend: str = "auto"  # "torch" | "cuda" (flash-linear-attention) | "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version not in (6, 7):
            raise ValueError(f"model.version must be 6 or 7, got {self.version}")
        if self.family != f"rwkv{self.version}":
            raise ValueError(f"model.family={self.family!r} does not match model.version={self.version}")
        C = self.d_model
        if self.n_heads < 0 or self.head_dim < 0:
            raise ValueError("model.n_heads and model.head_dim must be >= 0 (0 derives them)")
        if self.head_dim == 0:
            # The papers' head size 64, or the largest divisor of d_model below it.
            self.head_dim = C // self.n_heads if self.n_heads else max(d for d in range(1, 65) if C % d == 0)
        if self.n_heads == 0:
            self.n_heads = C // self.head_dim
        if self.n_heads * self.head_dim != C:
            raise ValueError(
                f"RWKV needs n_heads * head_dim == d_model, got {self.n_heads} x {self.head_dim} != {C}"
            )
        if self.d_ff == 0:
            self.d_ff = max(32, int(3.5 * C) // 32 * 32) if self.version == 6 else 4 * C
        if self.version == 6:
            self.mix_rank = self.mix_rank or _lora_rank(C, 1.0, 0.5)
            self.decay_rank = self.decay_rank or _lora_rank(C, 2.0, 0.5)
        else:
            self.decay_rank = self.decay_rank or _lora_rank(C, 1.8, 0.5)
            self.iclr_rank = self.iclr_rank or _lora_rank(C, 1.8, 0.5)
            self.value_rank = self.value_rank or _lora_rank(C, 1.3, 0.5)
            self.gate_rank = self.gate_rank or _lora_rank(C, 0.6, 0.8)
        for f in ("d_ff", "mix_rank", "decay_rank", "iclr_rank", "value_rank", "gate_rank"):
            if getattr(self, f) < 0:
                raise ValueError(f"model.{f} must be >= 0, got {getattr(self, f)}")
        if self.chunk_size < 1:
            raise ValueError(f"model.chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass(kw_only=True)
class RWKV7Config(RWKVConfig):
    family: str = "rwkv7"
    version: int = 7


def _shift(x_BTC: torch.Tensor, prev_BC: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} - x_t, with the previous token (or zeros) before the first."""
    prev = x_BTC.new_zeros(x_BTC[:, :1].shape) if prev_BC is None else prev_BC[:, None]
    return torch.cat([prev, x_BTC[:, :-1]], dim=1) - x_BTC


def _ramps(C: int, layer: int, n_layers: int) -> tuple[torch.Tensor, float, float]:
    """The reference code's init ramps: channel position i / C, and two depth ratios."""
    r0 = layer / max(1, n_layers - 1)  # 0 to 1
    r1 = 1.0 - layer / n_layers  # 1 to almost 0
    return torch.arange(C, dtype=torch.float32) / C, r0, r1


def _ortho(rows: int, cols: int, scale: float) -> nn.Parameter:
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))
    return nn.Parameter(w)


class TimeMix(nn.Module):
    """The RWKV time mix (sequence mixer) of either version; `mix` carries state for generation."""

    def __init__(self, cfg: RWKVConfig, layer: int, residual: _ValueResidual | None = None):
        super().__init__()
        C, H, N = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.version, self.H, self.N = cfg.version, H, N
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        self.layer, self.last_layer, self.residual = layer, layer == cfg.n_layers - 1, residual
        ddd, r0, r1 = _ramps(C, layer, cfg.n_layers)
        n = torch.arange(C, dtype=torch.float32) / max(1, C - 1)
        names = ("receptance", "key", "value", "output") + (("gate",) if cfg.version == 6 else ())
        for name in names:
            setattr(self, name, nn.Linear(C, C, bias=False))
        self.output.is_residual_out = True
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)  # the reference code's eps (1e-5 x 8^2)
        if cfg.version == 6:
            # Order of the five ddlerp targets: w, k, v, r, g.
            self.maa_x = nn.Parameter(1 - ddd**r1)
            self.maa_wkvrg = nn.Parameter(
                torch.stack(
                    [
                        1 - ddd**r1,
                        1 - ddd**r1,
                        1 - (ddd**r1 + 0.3 * r0),
                        1 - ddd ** (0.5 * r1),
                        1 - ddd ** (0.5 * r1),
                    ]
                )
            )
            self.maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.mix_rank).uniform_(-1e-4, 1e-4))
            self.maa_w2 = nn.Parameter(torch.empty(5, cfg.mix_rank, C).uniform_(-1e-4, 1e-4))
            self.decay = nn.Parameter(-6 + 5 * n ** (0.7 + 1.3 * r0))
            self.decay_w1 = nn.Parameter(torch.empty(C, cfg.decay_rank).uniform_(-1e-4, 1e-4))
            self.decay_w2 = nn.Parameter(torch.empty(cfg.decay_rank, C).uniform_(-1e-4, 1e-4))
            i = torch.arange(C)
            self.u = nn.Parameter((r0 * (1 - n) + ((i + 1) % 3 - 1) * 0.1).view(H, N))
        else:
            # Order of the six lerp targets: r, w, k, v, a, g.
            self.x_rwkvag = nn.Parameter(
                torch.stack(
                    [
                        1 - ddd ** (0.2 * r1),
                        1 - ddd ** (0.9 * r1),
                        1 - (ddd ** (0.9 * r1) + 0.4 * r0),
                        1 - (ddd ** (0.4 * r1) + 0.6 * r0),
                        1 - ddd ** (0.9 * r1),
                        1 - ddd ** (0.2 * r1),
                    ]
                )
            )
            # + 0.5 because the decay passes through -softplus(-x) - 0.5 (reference code).
            self.w0 = nn.Parameter(-7 + 5 * n ** (0.85 + r0**0.5) + 0.5)
            self.w1 = nn.Parameter(torch.zeros(C, cfg.decay_rank))
            self.w2 = _ortho(cfg.decay_rank, C, 0.1)
            self.a0 = nn.Parameter(torch.zeros(C))
            self.a1 = nn.Parameter(torch.zeros(C, cfg.iclr_rank))
            self.a2 = _ortho(cfg.iclr_rank, C, 0.1)
            if layer > 0:
                self.v0 = nn.Parameter(torch.ones(C))
                self.v1 = nn.Parameter(torch.zeros(C, cfg.value_rank))
                self.v2 = _ortho(cfg.value_rank, C, 0.1)
            self.g1 = nn.Parameter(torch.zeros(C, cfg.gate_rank))
            self.g2 = _ortho(cfg.gate_rank, C, 0.1)
            self.k_k = nn.Parameter(torch.full((C,), 0.85))
            self.k_a = nn.Parameter(torch.ones(C))
            self.r_k = nn.Parameter(torch.zeros(H, N))
        self.reference = False  # tests flip this to run the sequential `wkv*_ref`

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.mix(x_BTC, None)[0]

    def _heads(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        return x_BTC.view(B, T, self.H, self.N).transpose(1, 2)  # (B, H, T, N)

    def mix(self, x_BTC: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        B, T, C = x_BTC.shape
        xx = _shift(x_BTC, None if state is None else state["shift"])
        s0 = None if state is None else state["wkv"]
        if self.version == 6:
            xxx = x_BTC + xx * self.maa_x
            # (5, B*T, rank) @ (5, rank, C): one offset per ddlerp target.
            m = torch.tanh(xxx @ self.maa_w1).view(B * T, 5, -1).transpose(0, 1)
            m_5BTC = torch.bmm(m, self.maa_w2).view(5, B, T, C)
            xw, xk, xv, xr, xg = (x_BTC + xx * (self.maa_wkvrg[i] + m_5BTC[i]) for i in range(5))
            r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
            logw = -torch.exp(self.decay + torch.tanh(xw @ self.decay_w1) @ self.decay_w2)
            args = [self._heads(t) for t in (r, k, v, logw)] + [self.u]
            y, sT = self._wkv(args, s0, wkv6, wkv6_recurrent, wkv6_ref)
            y = self.ln_x(y.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
            y = y * F.silu(self.gate(xg))
        else:
            xr, xw, xk, xv, xa, xg = (x_BTC + xx * self.x_rwkvag[i] for i in range(6))
            r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
            logw = -math.exp(-0.5) * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
            if self.layer == 0:
                self.residual.v = v
            else:
                gate = torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
                v = v + (self.residual.v - v) * gate
                if self.last_layer:
                    self.residual.v = None  # do not keep the graph alive between steps
            a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
            kk = F.normalize((k * self.k_k).view(B, T, self.H, self.N), dim=-1).view(B, T, C)
            k = k * (1 + (a - 1) * self.k_a)
            args = [self._heads(t) for t in (r, logw, k, v, -kk, kk * a)]
            y, sT = self._wkv(args, s0, wkv7, wkv7_recurrent, wkv7_ref)
            y = self.ln_x(y.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
            bonus = (r.view(B, T, self.H, self.N) * k.view(B, T, self.H, self.N) * self.r_k).sum(-1, True)
            y = y + (bonus * v.view(B, T, self.H, self.N)).view(B, T, C)
            y = y * (torch.sigmoid(xg @ self.g1) @ self.g2)
        return self.output(y), {"shift": x_BTC[:, -1], "wkv": sT}

    def _wkv(self, args, s0, fast, recurrent, ref):
        if self.reference:
            y, sT = ref(*args, s0)
            return y.to(args[0].dtype), sT.to(args[0].dtype)
        if args[0].shape[2] == 1:
            return recurrent(*args, s0)
        backend = pick_backend(self.backend, args[0], self.version)
        kernels.note(f"rwkv{self.version}", f"wkv{self.version}", _KERNELS[backend])
        if self.version == 7:  # log w = -e^-0.5 sigmoid(.) >= -e^-0.5: the chunk check needs no read
            return fast(*args, s0, chunk_size=self.chunk_size, backend=backend, min_log_decay=-math.exp(-0.5))
        return fast(*args, s0, chunk_size=self.chunk_size, backend=backend)


class _ValueResidual:
    """Carries the first layer's v to the later layers of one RWKV-7 model (value residual)."""

    v: torch.Tensor | None = None


class ChannelMix(nn.Module):
    """Squared-ReLU channel mix; RWKV-6 gates it with sigmoid(receptance), RWKV-7 does not."""

    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        C = cfg.d_model
        ddd, _, r1 = _ramps(C, layer, cfg.n_layers)
        self.version = cfg.version
        self.key = nn.Linear(C, cfg.d_ff, bias=False)
        self.value = nn.Linear(cfg.d_ff, C, bias=False)
        self.value.is_residual_out = True
        if cfg.version == 6:
            self.maa_k = nn.Parameter(1 - ddd**r1)
            self.maa_r = nn.Parameter(1 - ddd**r1)
            self.receptance = nn.Linear(C, C, bias=False)
        else:
            self.maa_k = nn.Parameter(1 - ddd ** (r1**4))

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.mix(x_BTC, None)[0]

    def mix(self, x_BTC: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        xx = _shift(x_BTC, None if state is None else state["shift"])
        y = self.value(torch.relu(self.key(x_BTC + xx * self.maa_k)) ** 2)
        if self.version == 6:
            y = torch.sigmoid(self.receptance(x_BTC + xx * self.maa_r)) * y
        return y, {"shift": x_BTC[:, -1]}


class RWKV(LM):
    """The shared backbone plus a recurrent `step` for generation (equal to the parallel forward)."""

    def init_state(self, batch: int) -> list[dict]:
        return [{"tmix": None, "cmix": None} for _ in self.blocks]

    @torch.no_grad()
    def step(self, idx_B: torch.Tensor, state: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """One token per sequence: logits (B, V) and the new state."""
        x = self.tok_emb(idx_B)[:, None]  # (B, 1, C)
        new = []
        for block, st in zip(self.blocks, state, strict=True):
            y, tm = block.seq_mixer.mix(block.norm1(x), st["tmix"])
            x = x + y
            y, cm = block.channel_mixer.mix(block.norm2(x), st["cmix"])
            x = x + y
            new.append({"tmix": tm, "cmix": cm})
        return self.head(self.norm_f(x))[:, 0], new


def build(cfg: RWKVConfig) -> RWKV:
    residual = _ValueResidual() if cfg.version == 7 else None

    def make_block(i: int) -> Block:
        return Block(cfg.d_model, cfg.norm, TimeMix(cfg, i, residual), ChannelMix(cfg, i), cfg.bias)

    return RWKV(cfg, make_block)


def _lora_layers(cfg: RWKVConfig) -> dict[str, int]:
    """Sum over layers of the LoRA ranks (each LoRA is C x r then r x C)."""
    if cfg.version == 6:
        return {"mix": 5 * cfg.mix_rank * cfg.n_layers, "decay": cfg.decay_rank * cfg.n_layers}
    return {
        "decay": cfg.decay_rank * cfg.n_layers,
        "iclr": cfg.iclr_rank * cfg.n_layers,
        "gate": cfg.gate_rank * cfg.n_layers,
        "value": cfg.value_rank * (cfg.n_layers - 1),  # layer 0 is the value residual's source
    }


def param_count(cfg: RWKVConfig) -> dict[str, int]:
    C, F_, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    lora = 2 * C * sum(_lora_layers(cfg).values())
    if cfg.version == 6:
        # maa_x + 5 maa, decay, u, GroupNorm weight and bias; r, k, v, g, o projections.
        tmix = L * (6 * C + C + C + 2 * C + 5 * C * C)
        cmix = L * (2 * C + 2 * C * F_ + C * C)
    else:
        # 6 lerps, w0, a0, k_k, k_a, r_k, GroupNorm; r, k, v, o; v0 in layers after the first.
        tmix = L * (6 * C + 5 * C + 2 * C + 4 * C * C) + (L - 1) * C
        cmix = L * (C + 2 * C * F_)
    parts = {
        "tmix": tmix,
        "tmix_lora": lora,
        "cmix": cmix,
        "norms": 2 * L * norm_params(cfg.norm, C, cfg.bias),
    }
    parts.update(embedding_params(cfg))
    return parts


def flops_per_token(cfg: RWKVConfig, seq_len: int, causal_half: bool = False) -> dict[str, int]:
    """Forward FLOPs per token by part. `ew_wkv` is the sequential recurrence (not a matmul):
    RWKV-6 decays, adds k^T v and reads out with r, 3 multiply-adds per state entry; RWKV-7
    decays, forms S a, adds (S a) b and v^T k and reads out with r, 4.5 per state entry.
    The recurrence costs the same at every position, so `seq_len` and `causal_half` do not enter."""
    C, F_, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    state = cfg.n_heads * cfg.head_dim * cfg.head_dim
    n_proj = 5 if cfg.version == 6 else 4
    return {
        "tmix_proj": L * 2 * C * C * n_proj,
        "tmix_lora": 2 * 2 * C * sum(_lora_layers(cfg).values()),
        "cmix": L * (2 * 2 * C * F_ + (2 * C * C if cfg.version == 6 else 0)),
        "ew_wkv": L * (6 if cfg.version == 6 else 9) * state,
        "head": head_flops(cfg),
    }
