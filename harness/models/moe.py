"""Sparse Mixture-of-Experts on the Transformer++ backbone.

One family, variants as config fields and presets (conf/model/):
- `mixtral` (Jiang et al. 2024): top-2 of 8 SwiGLU experts, softmax over the chosen 2, dropless.
- `switch` (Fedus et al. 2021): top-1, output scaled by the router probability, capacity factor
  1.25 with token dropping, MoE every other layer, load-balancing loss.
- `noisy_topk` (Shazeer et al. 2017): noisy top-k gating with a learned noise scale, and the
  importance/load CV^2 loss.
- `expert_choice` (Zhou et al. 2022): each expert picks its top-C tokens of a sequence.
- `deepseek` (Dai et al. 2024, DeepSeekMoE): fine-grained experts (d_ff / 4 wide) plus one
  always-on shared expert, softmax then top-k without renormalisation.
- `loss_free` (Wang et al. 2024): no auxiliary loss; a per-expert bias on the scores that choose the
  experts (not on the gate values) is moved each training step towards the mean load.
- `deepseek_v3` (DeepSeek-V3's MoE layer): sigmoid affinities normalised over the chosen k, the
  loss-free bias, fine-grained and shared experts as in `deepseek`.
The routers, capacity rule and aux losses live in `harness.ops.dispatch`; router math is fp32.

Causality. Token-choice routing decides per token, and the capacity rule serves a sequence in
position order (see `harness.ops.dispatch`), so those models are causal. Expert choice ranks the
tokens of a whole sequence for each expert, so a future token can push a past one out of an
expert: it is not a causal language model. Its config derives `causal=False`, which makes a run
refuse to start unless `allow_noncausal=true`, and the results are marked comparable=false.

Deliberate deviations: capacity is per sequence (not per batch) so a token's routing never depends
on other sequences in the batch; the Switch loss is applied to top-k routers with f_i counting all
k choices; a noisy router draws noise only in training mode.

Aux losses go in `last_aux` already weighted ("load_balance", "z_loss", "cv_loss"); per-layer
routing statistics are stacked by `MoELM` into the metrics "expert_load" (MoE layers x experts,
each row sums to the experts per token), "dropped_frac", "router_entropy" and "slab_fill" (routed
assignments / rows of a slab padded to the largest expert load: the useful fraction of what the
padded layout computes; the grouped layouts compute no padding. It is also mean load / max load, a
measure of balance). They stay on the device as tensors: the training loop decides when to read them.

Host syncs. A forward+backward in training mode waits for the GPU nowhere on the default CUDA
layout: routing, capacity and metrics use static shapes only (dropped assignments are marked, not
removed; see `harness.ops.dispatch`). `backend` picks the expert layout, and with it the syncs:
- "auto" (= "torch"): on CPU "grouped"; on CUDA "grouped_mm" where torch's grouped GEMM kernel runs
  (bf16 autocast on SM 9.0 or 10.x, dims divisible by 8), no sync; otherwise "padded".
- "grouped": one sync per MoE layer (the expert counts size each expert's matmuls).
- "padded": none under a capacity (expert choice, or capacity_factor > 0: the slab height is
  B * C); dropless, two per layer (the largest expert load and the most slab rows of one token).
- "grouped_mm": none on the kernel above; elsewhere torch copies the offsets to the host once per
  matmul (fp32 or fp16 matmuls, other GPUs), and on CPU it loops over the experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import dist
from harness.layers import (
    LM,
    MLP,
    Block,
    CausalSelfAttention,
    LMOutput,
    attention_flops,
    embedding_params,
    head_flops,
    mlp_flops,
    mlp_params,
    norm_params,
)
from harness.models.dense import DenseConfig
from harness.ops import dispatch, kernels


@dataclass(kw_only=True)
class MoEConfig(DenseConfig):
    family: str = "moe"
    n_experts: int = 8
    top_k: int = 2  # experts per token; for expert choice, the average (Zhou et al.'s c)
    router: str = (
        "topk_softmax"  # topk_softmax | softmax_topk | switch | noisy_topk | sigmoid_topk | expert_choice
    )
    router_renorm: bool = False  # softmax_topk: renormalise the kept k probabilities to sum to 1
    capacity_factor: float = 0.0  # 0: dropless (token choice); expert choice uses 1.0 when 0
    d_expert: int = 0  # expert hidden width; 0: d_ff // expert_granularity
    expert_granularity: int = 1  # DeepSeekMoE fine-grained segmentation factor m
    n_shared_experts: int = 0  # always-on experts, each d_expert wide
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0; others keep the dense SwiGLU
    load_balance_weight: float = 0.01  # Switch loss (Fedus et al. use 1e-2)
    z_loss_weight: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    cv_loss_weight: float = 0.0  # importance + load CV^2 (Shazeer et al. use 0.1)
    # loss-free balancing (Wang et al. 2024): per-expert selection bias, moved by this much per
    # training-mode forward (one per optimizer step in harness-train) towards the mean load (they
    # use 1e-3); 0: off
    balance_bias_rate: float = 0.0
    # expert-sorted dispatch layout (ops/dispatch.py): "auto" (= "torch"): grouped on CPU, the
    # grouped GEMM on CUDA where it needs no host sync, else padded bmm; or "grouped", "padded",
    # "grouped_mm" (torch's grouped GEMM) to force one. The module docstring lists the host syncs.
    backend: str = "auto"
    causal: bool = True  # derived from the router; any value given is replaced

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlp != "swiglu":
            raise ValueError(f"MoE experts are SwiGLU; model.mlp must be 'swiglu', got {self.mlp!r}")
        if self.router not in dispatch.ROUTERS:
            raise ValueError(
                f"model.router must be one of {', '.join(dispatch.ROUTERS)}, got {self.router!r}"
            )
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"need n_experts >= 1 and 1 <= top_k <= n_experts, got n_experts={self.n_experts}, top_k={self.top_k}"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"the switch router is top-1; got top_k={self.top_k}")
        if self.capacity_factor < 0:
            raise ValueError(f"model.capacity_factor must be >= 0 (0: dropless), got {self.capacity_factor}")
        if self.expert_granularity < 1 or self.n_shared_experts < 0 or self.d_expert < 0:
            raise ValueError("model.expert_granularity must be >= 1, n_shared_experts and d_expert >= 0")
        if not 1 <= self.moe_every <= self.n_layers:
            raise ValueError(
                f"model.moe_every must be in [1, n_layers={self.n_layers}], got {self.moe_every}"
            )
        for f in ("load_balance_weight", "z_loss_weight", "cv_loss_weight", "balance_bias_rate"):
            if getattr(self, f) < 0:
                raise ValueError(f"model.{f} must be >= 0, got {getattr(self, f)}")
        if self.balance_bias_rate > 0 and self.router not in dispatch.BIASED_ROUTERS:
            raise ValueError(
                f"model.balance_bias_rate needs a token-choice router ({', '.join(dispatch.BIASED_ROUTERS)}), "
                f"got {self.router!r}"
            )
        if self.backend not in ("torch", *dispatch.LAYOUTS):
            raise ValueError(
                f"model.backend for MoE must be one of torch, {', '.join(dispatch.LAYOUTS)}, got {self.backend!r}"
            )
        if self.d_expert == 0:
            self.d_expert = max(1, self.d_ff // self.expert_granularity)
        if self.backend == "grouped_mm":  # bf16 is the strictest dtype it may run in (autocast)
            dispatch.check_grouped_mm(self.d_model, self.d_expert, torch.bfloat16)
        self.causal = self.router != "expert_choice"

    def is_moe(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers // self.moe_every


class MoEMLP(nn.Module):
    """Router + routed SwiGLU experts (+ shared experts): the channel mixer of an MoE layer."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fe = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.router = nn.Linear(D, E, bias=False)
        self.noise = nn.Linear(D, E, bias=False) if cfg.router == "noisy_topk" else None
        self.w_up = nn.Parameter(torch.randn(E, D, 2 * Fe) * cfg.init_std)  # gate | up, side by side
        self.w_down = nn.Parameter(torch.randn(E, Fe, D) * cfg.init_std / math.sqrt(2 * cfg.n_layers))
        shared = cfg.n_shared_experts * Fe  # k shared experts of width F are one SwiGLU of width kF
        self.shared = MLP(D, shared, "swiglu", bias=False) if shared else None
        # A buffer: checkpoints carry it, so a resumed run routes the same. It takes the module's dtype;
        # harness-train keeps fp32 parameters (bf16 only through autocast), where 1e-3 steps are exact
        # enough. A model cast to bf16 would round them away once |bias| >= 0.5.
        if cfg.balance_bias_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        self.pending_load_E: torch.Tensor | None = None  # this optimizer step's load, all micro batches
        self.reference = False  # tests flip this to the per-expert loop
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        with torch.autocast(x_ND.device.type, enabled=False):  # router math in fp32
            xf = x_ND.float()
            logits_NE = F.linear(xf, self.router.weight.float())
            noise_std = None
            if self.noise is not None and self.training:
                noise_std = F.softplus(F.linear(xf, self.noise.weight.float()))
            r = dispatch.route(
                logits_NE, cfg.router, cfg.top_k, B, cfg.capacity_factor, cfg.router_renorm, noise_std,
                self.expert_bias,
            )  # fmt: skip
            if self.expert_bias is not None and self.training:  # hard counts before capacity
                load = r["load_E"].detach()
                self.pending_load_E = load if self.pending_load_E is None else self.pending_load_E + load
        routed = (x_ND, self.w_up, self.w_down, r["tok_A"], r["exp_A"], r["gate_A"])
        if self.reference:
            kernels.note("moe", "expert_mlp", "loop (reference)")
            y_ND = dispatch.expert_mlp_ref(*routed)
        else:
            layout = dispatch.pick_layout("auto" if cfg.backend == "torch" else cfg.backend, *routed[:3])
            bound = dispatch.load_bound(cfg.router, T, B, cfg.n_experts, cfg.top_k, cfg.capacity_factor)
            static = " (slab of B C rows: capacity)" if layout == "padded" and bound is not None else ""
            kernels.note("moe", "expert_mlp", layout + static)
            y_ND = dispatch.expert_mlp(*routed, layout=layout, max_load=bound)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)

        aux = {}
        if cfg.load_balance_weight > 0:
            # f counts every rank's choices (a global-batch balance, as one process would see)
            aux["load_balance"] = cfg.load_balance_weight * dispatch.load_balance_loss(
                r["probs_NE"], r["chosen_NE"], reduce=dist.sum_over_ranks if self.training else None
            )
        if cfg.z_loss_weight > 0:
            aux["z_loss"] = cfg.z_loss_weight * dispatch.z_loss(logits_NE)
        if cfg.cv_loss_weight > 0:
            aux["cv_loss"] = cfg.cv_loss_weight * dispatch.importance_load_loss(
                r["gates_NE"], r["load_E"], reduce=dist.sum_over_ranks_with_grad if self.training else None
            )
        self.last_aux = aux
        with torch.no_grad():  # routing statistics: metrics only
            p = r["probs_NE"]
            E = cfg.n_experts
            # kept assignments per expert, into a fixed-size tensor (bincount's length depends on
            # the data, a host sync on CUDA); bin E collects the dropped ones
            exp_A = r["exp_A"]
            counts_E = exp_A.new_zeros(E + 1).scatter_add_(0, exp_A, torch.ones_like(exp_A))[:E]
            self.last_stats = {
                "expert_load": r["chosen_NE"].sum(0) / (B * T),
                "dropped_frac": r["dropped_frac"].detach(),
                "router_entropy": -(p * p.clamp_min(1e-20).log()).sum(-1).mean(),
                "slab_fill": counts_E.sum() / (E * counts_E.max().clamp_min(1)),
            }
        return y_ND.view(B, T, D)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Wang et al. 2024, Algorithm 1: b_i += u * sign(mean load - load_i), from the choices
        before capacity of the whole global batch (every micro batch, every rank), so all ranks
        hold the same bias and it moves as in one process. The new bias routes the next step: a
        token's routing never depends on later tokens of its own batch, so the model stays causal."""
        if self.pending_load_E is None:
            return
        load_E = dist.sum_over_ranks(self.pending_load_E)
        self.expert_bias += self.cfg.balance_bias_rate * torch.sign(load_E.mean() - load_E)
        self.pending_load_E = None


class MoELM(LM):
    """The shared backbone, plus per-layer routing statistics stacked into the output metrics.
    A training loop calls `after_optimizer_step()` after each optimizer step (harness-train does)."""

    def after_optimizer_step(self) -> None:
        for m in self.modules():
            if isinstance(m, MoEMLP):
                m.after_optimizer_step()

    def forward(self, idx_BT: torch.Tensor) -> LMOutput:
        out = super().forward(idx_BT)
        moes = [m for m in self.modules() if isinstance(m, MoEMLP)]
        for key in ("expert_load", "dropped_frac", "router_entropy", "slab_fill"):
            out.metrics[key] = torch.stack([m.last_stats[key].float() for m in moes])
        return out


def build(cfg: MoEConfig) -> MoELM:
    def make_block(i: int) -> Block:
        attn = CausalSelfAttention(
            cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.seq_len, cfg.pos == "rope", cfg.bias
        )
        mixer = MoEMLP(cfg) if cfg.is_moe(i) else MLP(cfg.d_model, cfg.d_ff, "swiglu", cfg.bias)
        return Block(cfg.d_model, cfg.norm, attn, mixer, cfg.bias)

    return MoELM(cfg, make_block, learned_pos=cfg.pos == "learned")


def experts_per_token(cfg: MoEConfig, seq_len: int) -> float:
    """Routed experts a token passes through on average: top_k, or E * C / T for expert choice."""
    if cfg.router == "expert_choice":
        C = min(seq_len, dispatch.capacity(seq_len, cfg.n_experts, cfg.top_k, cfg.capacity_factor or 1.0))
        return cfg.n_experts * C / seq_len
    return float(cfg.top_k)


def _expert_params(cfg: MoEConfig) -> int:
    return 3 * cfg.d_model * cfg.d_expert


def param_count(cfg: MoEConfig) -> dict[str, int]:
    inner = cfg.n_heads * cfg.head_dim
    n_moe, n_dense = cfg.n_moe_layers, cfg.n_layers - cfg.n_moe_layers
    routers = 2 if cfg.router == "noisy_topk" else 1
    shared = cfg.n_shared_experts * cfg.d_expert
    parts = {
        "attn": cfg.n_layers * (4 * cfg.d_model * inner + ((3 * inner + cfg.d_model) if cfg.bias else 0)),
        "mlp": n_dense * mlp_params(cfg.d_model, cfg.d_ff, "swiglu", cfg.bias),
        "moe_router": n_moe * routers * cfg.d_model * cfg.n_experts,
        "moe_experts": n_moe * cfg.n_experts * _expert_params(cfg),
        "moe_shared": n_moe * (mlp_params(cfg.d_model, shared, "swiglu", False) if shared else 0),
        "norms": cfg.n_layers * 2 * norm_params(cfg.norm, cfg.d_model, cfg.bias),
    }
    parts.update(embedding_params(cfg, learned_pos=cfg.pos == "learned"))
    return parts


def inactive_params(cfg: MoEConfig) -> int:
    """Parameters of the routed experts a token is not sent to (averaged for expert choice)."""
    unused = cfg.n_experts - experts_per_token(cfg, cfg.seq_len)
    return round(cfg.n_moe_layers * unused * _expert_params(cfg))


def flops_per_token(cfg: MoEConfig, seq_len: int, causal_half: bool = False) -> dict[str, int]:
    """Forward matmul FLOPs per token, by part: the active experts and the router, assuming no
    token is dropped. This is the training count; padding and drops are in `executed_flops_per_token`."""
    attn = attention_flops(cfg.d_model, cfg.n_heads, cfg.head_dim, seq_len, causal_half)
    n_moe, n_dense = cfg.n_moe_layers, cfg.n_layers - cfg.n_moe_layers
    routers = 2 if cfg.router == "noisy_topk" else 1  # the noise projection runs in training
    shared = cfg.n_shared_experts * cfg.d_expert
    expert = mlp_flops(cfg.d_model, cfg.d_expert, "swiglu")
    return {
        "attn_proj": cfg.n_layers * attn["attn_proj"],
        "attn_scores": cfg.n_layers * attn["attn_scores"],
        "mlp": n_dense * mlp_flops(cfg.d_model, cfg.d_ff, "swiglu"),
        "moe_router": n_moe * routers * 2 * cfg.d_model * cfg.n_experts,
        "moe_experts": round(n_moe * experts_per_token(cfg, seq_len) * expert),
        "moe_shared": n_moe * (mlp_flops(cfg.d_model, shared, "swiglu") if shared else 0),
        "head": head_flops(cfg),
    }


def executed_flops_per_token(cfg: MoEConfig, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token a static-shape implementation executes (GShard / Switch style): every
    expert computes all C capacity slots of every sequence, padding included, and dropped tokens
    compute nothing. Not part of the training count (`flops_per_token` is). Dropless token choice
    has no fixed capacity: this returns the balanced cost; the padded layout's real padding is the
    logged metric `slab_fill`. With a capacity, our padded layout runs exactly this (its slab is
    B C rows per expert) and the grouped layouts run no padding, so it is an upper bound."""
    parts = flops_per_token(cfg, seq_len)
    if cfg.router == "expert_choice" or cfg.capacity_factor > 0:
        cf = cfg.capacity_factor or 1.0
        C = dispatch.capacity(seq_len, cfg.n_experts, cfg.top_k, cf)
        if cfg.router == "expert_choice":
            C = min(seq_len, C)
        slots = cfg.n_experts * C / seq_len
        parts["moe_experts"] = round(
            cfg.n_moe_layers * slots * mlp_flops(cfg.d_model, cfg.d_expert, "swiglu")
        )
    return parts
