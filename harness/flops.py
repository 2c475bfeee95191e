"""FLOP and parameter accounting: sums the named parts each family reports for its config.

Conventions: a multiply-add is 2 FLOPs; only matmul-like work is counted (norms, activations and
other elementwise work are left out, as in Kaplan et al. 2020 and Hoffmann et al. 2022). Training
FLOPs per token = forward x 3 (the backward pass computes gradients for both the input and the
weights of every matmul). Attention scores charge every query all `seq_len` keys by default;
`causal_half=True` charges the average (seq_len + 1) / 2 keys a causal query sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.layers import LMConfig
from harness.models import get_family

EMBEDDING_PARTS = ("embedding", "pos_embedding", "head")


@dataclass(frozen=True)
class Counts:
    forward_parts: dict[str, int]
    forward: int  # per token
    train: int  # per token, forward + backward
    six_n: int  # 6 x active non-embedding parameters: the usual approximation, for comparison
    params_total: int
    params_nonembed: int
    params_active: int  # parameters touched per token (differs from total for MoE)

    def as_dict(self) -> dict[str, int]:
        return {
            "flops_fwd_per_token": self.forward,
            "flops_per_token": self.train,
            "flops_6n_per_token": self.six_n,
            "params_total": self.params_total,
            "params_nonembed": self.params_nonembed,
            "params_active": self.params_active,
        }


def param_counts(cfg: LMConfig) -> dict[str, int]:
    fam = get_family(cfg.family)
    parts = fam.param_count(cfg)
    total = sum(parts.values())
    nonembed = total - sum(parts.get(k, 0) for k in EMBEDDING_PARTS)
    inactive = fam.inactive_params(cfg) if fam.inactive_params else 0
    return {"params_total": total, "params_nonembed": nonembed, "params_active": total - inactive}


def forward_flops(cfg: LMConfig, seq_len: int | None = None, causal_half: bool = False) -> dict[str, int]:
    fam = get_family(cfg.family)
    return fam.flops_per_token(cfg, seq_len or cfg.seq_len, causal_half=causal_half)


def count(cfg: LMConfig, seq_len: int | None = None, causal_half: bool = False) -> Counts:
    parts = forward_flops(cfg, seq_len, causal_half)
    fwd = sum(parts.values())
    p = param_counts(cfg)
    active_nonembed = p["params_nonembed"] - (p["params_total"] - p["params_active"])
    return Counts(
        forward_parts=parts,
        forward=fwd,
        train=3 * fwd,
        six_n=6 * active_nonembed,
        params_total=p["params_total"],
        params_nonembed=p["params_nonembed"],
        params_active=p["params_active"],
    )
