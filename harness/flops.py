"""FLOP and parameter accounting: sums the named parts each family reports for its config.

Conventions (every family's `flops_per_token(cfg, seq_len, causal_half)` keeps them):
- FORWARD FLOPs per token, by named part; a multiply-add is 2 FLOPs. The parts are a pure function
  of (config, seq_len): no module is built.
- Matmul-like work (projections, MLP, experts and router, attention scores and weighted sum, the
  head) is counted exactly; it is what `torch.utils.flop_counter.FlopCounterMode` sees on the model
  as built, and the tests hold every family to it within 1%.
- Parts whose name starts with `ew_` are elementwise or scan work (a selective scan, a WKV
  recurrence, gating) that FlopCounterMode does not see. They are counted in the totals but are
  not held to FlopCounterMode. Norms and activations are left out, as in Kaplan et al. 2020 and
  Hoffmann et al. 2022.
- Training FLOPs per token = 3 x forward: the backward pass computes, for every matmul, gradients
  for both its input and its weight, each as costly as the forward product.
- Attention charges every query all `seq_len` keys by default (what the fused kernel computes and
  what FlopCounterMode counts; also Hoffmann et al. 2022's convention). `causal_half=True`
  charges the (seq_len + 1) / 2 keys a causal query sees on average.
- Beside the exact count we report the usual approximation 6N (N: active non-embedding
  parameters, Kaplan et al. 2020), so users see how far apart they are at their shapes.
- Parameter parts named "embedding", "pos_embedding" and "head" are embedding parameters; all
  others are non-embedding. Active parameters (MoE) leave out experts a token is not routed to.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.layers import LMConfig
from harness.models import get_family

EMBEDDING_PARTS = ("embedding", "pos_embedding", "head")
ELEMENTWISE_PREFIX = "ew_"


@dataclass(frozen=True)
class Counts:
    forward_parts: dict[str, int]
    forward: int  # per token
    train: int  # per token, forward + backward
    six_n: int  # 6 x active non-embedding parameters: the usual approximation, for comparison
    params_total: int
    params_nonembed: int
    params_active: int  # parameters touched per token (differs from total for MoE)
    forward_matmul: int = 0  # per token, the parts FlopCounterMode sees (no `ew_` parts)
    params_parts: dict[str, int] | None = None

    @property
    def params_embed(self) -> int:
        return self.params_total - self.params_nonembed

    @property
    def six_n_ratio(self) -> float:
        """Exact training FLOPs over 6N: how far the approximation is off at this shape."""
        return self.train / self.six_n if self.six_n else float("inf")

    def as_dict(self) -> dict[str, int]:
        return {
            "flops_fwd_per_token": self.forward,
            "flops_per_token": self.train,
            "flops_6n_per_token": self.six_n,
            "params_total": self.params_total,
            "params_nonembed": self.params_nonembed,
            "params_active": self.params_active,
        }


def is_elementwise(part: str) -> bool:
    return part.startswith(ELEMENTWISE_PREFIX)


def param_counts(cfg: LMConfig) -> dict[str, int]:
    fam = get_family(cfg.family)
    parts = fam.param_count(cfg)
    total = sum(parts.values())
    nonembed = total - sum(parts.get(k, 0) for k in EMBEDDING_PARTS)
    inactive = fam.inactive_params(cfg) if fam.inactive_params else 0
    return {"params_total": total, "params_nonembed": nonembed, "params_active": total - inactive}


def forward_flops(cfg: LMConfig, seq_len: int | None = None, causal_half: bool = False) -> dict[str, int]:
    fam = get_family(cfg.family)
    parts = fam.flops_per_token(cfg, seq_len or cfg.seq_len, causal_half=causal_half)
    bad = {k: v for k, v in parts.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"family {cfg.family!r} reported FLOP parts that are not non-negative ints: {bad}")
    return parts


def matmul_flops(parts: dict[str, int]) -> int:
    """The FLOPs FlopCounterMode can see: every part but the `ew_` ones."""
    return sum(v for k, v in parts.items() if not is_elementwise(k))


def count(cfg: LMConfig, seq_len: int | None = None, causal_half: bool = False) -> Counts:
    parts = forward_flops(cfg, seq_len, causal_half)
    fwd = sum(parts.values())
    fam = get_family(cfg.family)
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
        forward_matmul=matmul_flops(parts),
        params_parts=fam.param_count(cfg),
    )


def training_flops(cfg: LMConfig, tokens: int, seq_len: int | None = None) -> int:
    """Total training FLOPs of `tokens` tokens at this shape (what summary.json calls flops_train)."""
    return count(cfg, seq_len).train * tokens


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) < 1e6 else f"{x:.4g}"


def breakdown(cfg: LMConfig, seq_len: int | None = None, causal_half: bool = False) -> str:
    """A plain-text table of forward and training FLOPs per token by part, with parameter counts
    and the 6N approximation beside the exact count."""
    c = count(cfg, seq_len, causal_half)
    T = seq_len or cfg.seq_len
    rows = [("part", "fwd/token", "train/token", "share")]
    for k, v in sorted(c.forward_parts.items(), key=lambda kv: -kv[1]):
        label = f"{k} (not seen by FlopCounterMode)" if is_elementwise(k) else k
        rows.append((label, _fmt(v), _fmt(3 * v), f"{v / max(c.forward, 1):.1%}"))
    rows.append(("total", _fmt(c.forward), _fmt(c.train), "100.0%"))
    rows.append(("6N approximation", "", _fmt(c.six_n), f"exact/6N = {c.six_n_ratio:.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{cfg.name} ({cfg.family}): d_model={cfg.d_model} n_layers={cfg.n_layers} seq_len={T} "
        f"attention={'causal half' if causal_half else 'full T x T'}",
        f"params: total {c.params_total:,}  non-embedding {c.params_nonembed:,}  active {c.params_active:,}",
    ]
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(w[0])] + [r[j].rjust(w[j]) for j in (1, 2, 3)]))
        if i == 0 or i == len(rows) - 3:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)
