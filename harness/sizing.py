"""Model shapes for a target size, by documented rules, and FLOP-matched variants across families.

A *variant* is a model preset, `conf/model/<name>.yaml` (e.g. `llama`, `gpt2`, a MoE or Mamba
preset), or a bare registry family name (its `<family>.yaml`, else its `<family>_tiny.yaml`). The
rules, with their numbers in `SizingRules`:

1. What stays: every field that defines the variant rather than its size is kept from the preset:
   expert count, top_k and granularity, d_state, d_conv, expand, chunk_size, MLP kind, positions,
   norms. Expert count and granularity are properties of the variant at this scale, not scaled
   with N. `seq_len` and `vocab_size` are set by the caller: families are compared at the same
   sequence length and tokenizer.
2. Derived widths: a width field (`d_*` but d_model, d_state and d_conv; `*_rank`; `head_dim`;
   `n_heads`) whose config-class default is 0 is derived by the family from d_model (dense:
   d_ff = 4 d or 8/3 d rounded to 16; MoE expert width; RWKV head count, LoRA ranks and channel
   mix; Mamba dt_rank and heads). Sizing resets it to 0, so a tiny preset's explicit width does
   not survive scaling.
3. Attention heads: where a config has `n_heads` with `head_dim` derived from it, head_dim is fixed
   at `head_dim` (32 at this scale; 64 or 128 at larger ones) and n_heads = d_model / head_dim, so
   d_model is a multiple of head_dim.
4. Aspect ratio: d_model / n_layers near the variant preset's own ratio (32 for the Transformer
   and RWKV presets; 16 for Mamba, which stacks two mixer blocks per Transformer layer, Gu & Dao
   2023 sec. 4.2), or `aspect` when set, never outside [target / aspect_spread, target *
   aspect_spread]; Kaplan et al. 2020 (fig. 5) find the loss flat to within a few percent over a
   wide band of aspect ratios, so the band costs little. d_model is a multiple of `multiple` (16),
   or of `bare_multiple` (4) for a family with no fine knob (Mamba-2), and at least `min_d_model`.
5. Target: non-embedding parameters or training FLOPs per token. The search visits every
   (d_model, n_layers) in the band and, for a family with a fine knob (`fine_knobs`: the MLP or
   expert width d_ff, Mamba-1's dt_rank), that knob within +-`knob_range` (50%) of its derived
   default in steps of `knob_multiple` (8; 1 for a knob under 64). Of the shapes within
   `tolerance` (1%) of the target, it keeps the one closest to the aspect target (band factor `aspect_spread` = 3), with the knob
   nearest its default breaking near-ties. A shape the family refuses (its `__post_init__`
   raises) is skipped.
6. FLOP-matched: `match()` sizes a reference variant to a nominal non-embedding parameter count
   N; its training FLOPs per token F0 is the group's compute per token. Every variant then gets a
   shape inside one common window of training FLOPs per token whose largest / smallest is at most
   1 + `match_tolerance` (2%), placed within +-`match_window` (20%) of F0: at F0 when every variant
   can get within `tolerance` of it without distorting its shape, else as close as it can.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness import flops
from harness.layers import LMConfig
from harness.models import FAMILIES, get_family, make_config

CONF_MODEL_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


@dataclass(frozen=True)
class SizingRules:
    aspect: float = 0.0  # target d_model / n_layers; 0: the variant preset's own ratio
    aspect_spread: float = 3.0  # allowed band: [target / spread, target * spread]
    head_dim: int = 32  # attention head width where n_heads is derived from it
    multiple: int = 16  # d_model is a multiple of this (and of head_dim for attention)
    bare_multiple: int = 4  # ... or of this for a family with no fine knob
    min_d_model: int = 16
    # Attention variants may also go below head_dim as one head of width d_model (toy scales, where the
    # compute-optimal model can be narrower than one head).
    narrow_single_head: bool = False
    max_layers: int = 96
    fine_knobs: tuple[str, ...] = ("d_ff", "dt_rank")  # widths searched around their derived default
    knob_multiple: int = 8
    knob_range: float = 0.5
    tolerance: float = 0.01  # relative distance to the target a chosen shape may have
    match_tolerance: float = 0.02  # largest / smallest training FLOPs per token in a matched group, - 1
    match_window: float = 0.2  # how far from the reference's FLOPs a matched group may move

    def __post_init__(self) -> None:
        if self.aspect < 0 or self.aspect_spread < 1:
            raise ValueError("sizing: aspect must be >= 0 (0: the preset's) and aspect_spread >= 1")
        sizes = (self.head_dim, self.multiple, self.bare_multiple, self.min_d_model, self.knob_multiple)
        if min(*sizes, self.max_layers) < 1:
            raise ValueError("sizing: widths, multiples and max_layers must be >= 1")
        if not 0 < self.tolerance < 0.5 or not 0 <= self.knob_range < 1:
            raise ValueError("sizing: tolerance must be in (0, 0.5) and knob_range in [0, 1)")
        if not 0 < self.match_tolerance < 0.5 or not 0 <= self.match_window < 1:
            raise ValueError("sizing: match_tolerance must be in (0, 0.5) and match_window in [0, 1)")


@dataclass(frozen=True)
class Shape:
    """A sized variant: its config, and the model fields set on top of its preset."""

    variant: str  # the preset name (conf/model/<preset>.yaml) the overrides apply to
    cfg: LMConfig
    fields: dict[str, Any]  # model.<field> overrides on top of the preset
    counts: flops.Counts

    @property
    def params_nonembed(self) -> int:
        return self.counts.params_nonembed

    @property
    def flops_per_token(self) -> int:
        return self.counts.train

    def overrides(self) -> list[str]:
        """Hydra overrides that rebuild this shape from its preset ('+' adds a key the preset lacks)."""
        present = preset_fields(self.variant)
        out = [f"model={self.variant}"]
        for k, v in self.fields.items():
            out.append(f"{'' if k in present else '+'}model.{k}={v}")
        return out


def preset_fields(preset: str) -> dict[str, Any]:
    path = CONF_MODEL_DIR / f"{preset}.yaml"
    return yaml.safe_load(path.read_text()) or {}


def known_variants() -> list[str]:
    """Presets of registered families, tiny ones left out, plus family names without such a preset."""
    names = set()
    for p in CONF_MODEL_DIR.glob("*.yaml"):
        if not p.stem.endswith("_tiny") and preset_fields(p.stem).get("family") in FAMILIES:
            names.add(p.stem)
    for fam in FAMILIES:
        if (CONF_MODEL_DIR / f"{fam}_tiny.yaml").exists():
            names.add(fam)
    return sorted(names)


def resolve_variant(name: str) -> str:
    """The preset a variant name stands for; raises listing the known variants."""
    for stem in (name, f"{name}_tiny"):
        if (CONF_MODEL_DIR / f"{stem}.yaml").exists():
            fam = preset_fields(stem).get("family")
            if fam not in FAMILIES:
                get_family(str(fam))  # raises, listing the known families
            return stem
    if name in FAMILIES:
        raise ValueError(f"family {name!r} has no preset conf/model/{name}.yaml or {name}_tiny.yaml")
    raise ValueError(
        f"unknown model variant {name!r}; known families: {', '.join(sorted(FAMILIES))}; "
        f"known presets: {', '.join(known_variants())}"
    )


def _is_width(name: str) -> bool:
    """Width fields in the shared vocabulary (rule 2); d_state and d_conv define the variant."""
    return (
        (name.startswith("d_") and name not in ("d_model", "d_state", "d_conv"))
        or name.endswith("_rank")
        or name in ("head_dim", "n_heads")
    )


def _class_defaults(cls: type[LMConfig]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


class _Builder:
    """Builds configs of one variant at a given (d_model, n_layers, knob) by the rules."""

    def __init__(self, variant: str, rules: SizingRules, seq_len: int | None, vocab_size: int | None):
        self.preset = resolve_variant(variant)
        self.base = preset_fields(self.preset)
        fam = get_family(self.base["family"])
        defaults = _class_defaults(fam.config)
        self.rules = rules
        self.fixed: dict[str, Any] = {}
        if seq_len is not None:
            self.fixed["seq_len"] = seq_len
        if vocab_size is not None:
            self.fixed["vocab_size"] = vocab_size
        # Rule 2: derived widths go back to 0 (derived) whatever the preset says.
        self.derived = [
            k
            for k, v in defaults.items()
            if v == 0 and isinstance(v, int) and not isinstance(v, bool) and _is_width(k)
        ]
        for k in self.derived:
            if self.base.get(k, 0) != 0:
                self.fixed[k] = 0
        # Rule 3: attention heads of fixed width.
        self.heads = "n_heads" in defaults and "head_dim" in self.derived and defaults["n_heads"] != 0
        self.knobs = [k for k in rules.fine_knobs if k in self.derived and self._moves_flops(k)]
        self.d_multiple = rules.multiple if self.knobs else rules.bare_multiple
        # widths below one head (one head of width d_model), then multiples of the head width
        self.narrow = (
            list(range(max(rules.min_d_model, self.d_multiple), rules.head_dim, self.d_multiple))
            if self.heads and rules.narrow_single_head
            else []
        )
        if self.heads:
            self.d_multiple = math.lcm(self.d_multiple, rules.head_dim)
        self.aspect = rules.aspect or self.base.get("d_model", 128) / self.base.get("n_layers", 4)

    def _moves_flops(self, knob: str) -> bool:
        """Whether the knob changes this variant's FLOPs (Mamba-2 has a dt_rank field it ignores)."""
        d, L = self.base.get("d_model", 128), self.base.get("n_layers", 4)
        cfg = self.config(self.fields(d, L))
        if cfg is None or not isinstance(getattr(cfg, knob), int):
            return False
        other = self.config(self.fields(d, L, {knob: 2 * getattr(cfg, knob) + 8}))
        return other is not None and flops.count(other).train != flops.count(cfg).train

    def fields(self, d_model: int, n_layers: int, knob: dict[str, int] | None = None) -> dict[str, Any]:
        f = {"d_model": d_model, "n_layers": n_layers, **self.fixed}
        if self.heads:
            f["n_heads"] = max(1, d_model // self.rules.head_dim)
        f.update(knob or {})
        return f

    def config(self, fields: dict[str, Any]) -> LMConfig | None:
        try:
            return make_config({**self.base, **fields})
        except ValueError:
            return None


def _metric(c: flops.Counts, by: str) -> int:
    return c.train if by == "flops" else c.params_nonembed


def shape(
    variant: str,
    *,
    d_model: int,
    n_layers: int,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    rules: SizingRules | None = None,
) -> Shape:
    """The variant at this d_model and n_layers, every other width by the rules."""
    b = _Builder(variant, rules or SizingRules(), seq_len, vocab_size)
    fields = b.fields(d_model, n_layers)
    try:
        cfg = make_config({**b.base, **fields})
    except ValueError as e:
        raise ValueError(f"cannot build {variant} at d_model={d_model}, n_layers={n_layers}: {e}") from e
    return Shape(b.preset, cfg, fields, flops.count(cfg))


@dataclass(frozen=True)
class _Cand:
    metric: int
    score: tuple[float, float]  # (aspect-ratio distance, fine-knob distance): lower is better
    fields: dict[str, Any]
    cfg: LMConfig
    counts: flops.Counts


def _smallest(b: _Builder, by: str) -> tuple[int, LMConfig] | None:
    d_min = max(b.rules.min_d_model, b.d_multiple)
    for d in b.narrow + list(range(d_min, 64 * d_min + 1, b.d_multiple)):
        cfg = b.config(b.fields(d, 1))
        if cfg is not None:
            return _metric(flops.count(cfg), by), cfg
    return None


def smallest(
    variant: str,
    *,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    rules: SizingRules | None = None,
) -> Shape:
    """The smallest shape of the variant the rules allow: one layer, the narrowest d_model."""
    b = _Builder(variant, rules or SizingRules(), seq_len, vocab_size)
    found = _smallest(b, "params")
    if found is None:
        raise ValueError(f"no buildable one-layer shape of {variant} under the sizing rules")
    cfg = found[1]
    return Shape(b.preset, cfg, b.fields(cfg.d_model, 1), flops.count(cfg))


def _candidates(b: _Builder, by: str, lo: float, hi: float) -> list[_Cand]:
    """Every shape the rules allow whose metric lies in [lo, hi]."""
    r = b.rules
    a_lo, a_hi = b.aspect / r.aspect_spread, b.aspect * r.aspect_spread
    step = b.d_multiple
    # Coarse shapes further than this from [lo, hi] cannot be brought into it by the fine knob.
    slack = 1.5 * (1 + r.knob_range if b.knobs else 1)
    out: list[_Cand] = []
    for L in range(1, r.max_layers + 1):
        d_min = max(r.min_d_model, step)
        d_lo = d_min if L == 1 else max(d_min, step * math.ceil(a_lo * L / step))
        d_hi = max(d_lo, step * math.floor(a_hi * L / step))
        first_m = None
        narrow = [d for d in b.narrow if L == 1]
        for d in narrow + list(range(d_lo, d_hi + 1, step)):
            cfg = b.config(b.fields(d, L))
            if cfg is None:
                continue
            c = flops.count(cfg)
            m = _metric(c, by)
            first_m = m if first_m is None else first_m
            if m > hi * slack:
                break  # the metric only grows with d_model
            if m < lo / slack:
                continue
            aspect_dev = round(abs(math.log(d / L / b.aspect)), 3)
            if lo <= m <= hi:
                out.append(_Cand(m, (aspect_dev, 0.0), b.fields(d, L), cfg, c))
            for k in b.knobs:
                for v in _knob_values(b, cfg, k, c, by, lo, hi):
                    kcfg = b.config(b.fields(d, L, {k: v}))
                    if kcfg is None:
                        continue
                    kc = flops.count(kcfg)
                    km = _metric(kc, by)
                    if lo <= km <= hi:
                        dev = abs(math.log(v / getattr(cfg, k)))
                        out.append(_Cand(km, (aspect_dev, dev), b.fields(d, L, {k: v}), kcfg, kc))
        if first_m is not None and first_m > hi * slack and L > 1:
            break  # the narrowest shape in the band is already too big, and deeper ones are bigger
    return out


def _knob_values(
    b: _Builder, cfg: LMConfig, k: str, c: flops.Counts, by: str, lo: float, hi: float
) -> list[int]:
    """Values of knob k worth trying at this (d_model, n_layers): within knob_range of its
    default and, as the metric is close to linear in the knob, near the ones that land in [lo, hi]."""
    r = b.rules
    v0 = getattr(cfg, k)
    if not isinstance(v0, int) or v0 < 1:
        return []
    step = min(r.knob_multiple, max(1, v0 // 8))
    vlo = max(step, step * math.ceil(v0 * (1 - r.knob_range) / step))
    vhi = step * math.floor(v0 * (1 + r.knob_range) / step)
    values = [v for v in range(vlo, vhi + 1, step) if v != v0]
    probe = b.config(b.fields(cfg.d_model, cfg.n_layers, {k: vhi})) if vhi != v0 else None
    if probe is None or not values:
        return values
    m0, m1 = _metric(c, by), _metric(flops.count(probe), by)
    if m1 == m0:
        return values if lo <= m0 <= hi else []
    slope = (m1 - m0) / (vhi - v0)
    a, z = sorted(((lo - m0) / slope + v0, (hi - m0) / slope + v0))
    return [v for v in values if a - 2 * step <= v <= z + 2 * step]


def _no_shape_error(b: _Builder, variant: str, by: str, target: float) -> ValueError:
    r = b.rules
    unit = "non-embedding parameters" if by == "params" else "training FLOPs per token"
    small = _smallest(b, by)
    if small is None:
        return ValueError(f"no buildable shape of {variant} found by the sizing rules {r}")
    if target < small[0] * (1 - r.tolerance):
        s = small[1]
        return ValueError(
            f"target {target:.4g} {unit} is below the smallest buildable {variant} "
            f"(d_model={s.d_model}, n_layers={s.n_layers}: {small[0]:.4g})"
        )
    near = _candidates(b, by, target / 1.5, target * 1.5)
    hint = ""
    if near:
        c = min(near, key=lambda c: abs(math.log(c.metric / target)))
        hint = (
            f"; closest is d_model={c.cfg.d_model}, n_layers={c.cfg.n_layers} at {c.metric:.4g} "
            f"({c.metric / target - 1:+.2%})"
        )
    return ValueError(
        f"no shape of {variant} within {r.tolerance:.1%} of {target:.4g} {unit}{hint}. "
        "Widen the sizing rules (aspect_spread, multiple, tolerance)."
    )


def size(
    variant: str,
    *,
    params: float | None = None,
    flops_per_token: float | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    rules: SizingRules | None = None,
    strict: bool = True,
) -> Shape:
    """Chooses the variant's shape for a target of non-embedding parameters or training FLOPs
    per token (exactly one), by the rules in the module docstring. Where no shape lies within
    `rules.tolerance` of the target, raises, or with `strict=False` returns the closest one."""
    if (params is None) == (flops_per_token is None):
        raise ValueError("size(): give exactly one target, params= or flops_per_token=")
    rules = rules or SizingRules()
    by, target = ("params", params) if params is not None else ("flops", flops_per_token)
    if not target or target <= 0 or not math.isfinite(target):
        raise ValueError(f"sizing {variant}: the target must be a positive number, got {target}")
    b = _Builder(variant, rules, seq_len, vocab_size)
    cands = _candidates(b, by, target * (1 - rules.tolerance), target * (1 + rules.tolerance))
    if not cands and not strict:
        near = _candidates(b, by, target / 1.5, target * 1.5)
        if near:
            c = min(near, key=lambda c: (abs(math.log(c.metric / target)), c.score))
            return Shape(b.preset, c.cfg, c.fields, c.counts)
    if not cands:
        raise _no_shape_error(b, variant, by, target)
    best = min(cands, key=lambda c: (c.score, abs(c.metric - target)))
    return Shape(b.preset, best.cfg, best.fields, best.counts)


@dataclass(frozen=True)
class Matched:
    nominal_params: int  # the size the group stands for: the reference's non-embedding parameters
    flops_per_token: int  # the reference's training FLOPs per token at that size
    shapes: dict[str, Shape]

    @property
    def spread(self) -> float:
        """Largest over smallest training FLOPs per token among the variants, minus one."""
        f = [s.flops_per_token for s in self.shapes.values()]
        return max(f) / min(f) - 1


def match(
    variants: list[str],
    *,
    params: float,
    reference: str | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    rules: SizingRules | None = None,
) -> Matched:
    """FLOP-matched shapes of several variants at one nominal size (rule 6).

    The reference (default: the first variant) is sized to `params` non-embedding parameters; its
    training FLOPs per token F0 is the nominal compute. Every variant then gets a shape whose
    training FLOPs per token lies in one common window of relative width `match_tolerance` (2%),
    the window chosen within +-`match_window` of F0. The window minimises
    2 x (its distance from F0 beyond `tolerance`) + the mean over variants of (|log(aspect /
    target aspect)| + |log(knob / knob default)|): it stays at F0 unless a variant can only get
    there with a distorted shape (a family without a fine knob, at a tiny size), and then moves as
    little as it must, the others following.
    """
    if not variants:
        raise ValueError("match(): no variants given")
    variants = list(dict.fromkeys(variants))
    rules = rules or SizingRules()
    ref_name = reference or variants[0]
    ref = size(ref_name, params=params, seq_len=seq_len, vocab_size=vocab_size, rules=rules, strict=False)
    f0 = ref.flops_per_token
    lo, hi = f0 / (1 + rules.match_window), f0 * (1 + rules.match_window)
    builders = {v: _Builder(v, rules, seq_len, vocab_size) for v in variants}
    cands = {v: _candidates(b, "flops", lo, hi) for v, b in builders.items()}
    for v, cs in cands.items():
        if not cs:
            raise _no_shape_error(builders[v], v, "flops", f0)
    best: tuple[float, dict[str, _Cand]] | None = None
    by_metric = {v: sorted(cs, key=lambda c: c.metric) for v, cs in cands.items()}
    keys = {v: [c.metric for c in cs] for v, cs in by_metric.items()}
    width = math.log1p(rules.match_tolerance)
    n_starts = int(math.ceil(2 * math.log1p(rules.match_window) / (width / 8))) + 1
    for i in range(n_starts):  # windows slide over [lo, hi] in eighths of their width
        w_lo = lo * math.exp(i * width / 8)
        w_hi = w_lo * (1 + rules.match_tolerance)
        mid = math.sqrt(w_lo * w_hi)
        pick = {}
        for v, cs in by_metric.items():
            inside = cs[bisect.bisect_left(keys[v], w_lo) : bisect.bisect_right(keys[v], w_hi)]
            if not inside:
                break
            pick[v] = min(inside, key=lambda c: (c.score, abs(math.log(c.metric / mid))))
        else:
            # Stay at F0 where every variant can (each then within `tolerance` of it); else move
            # as little as possible; then prefer shapes near their aspect and knob defaults.
            far = max(abs(math.log(c.metric / f0)) for c in pick.values())
            cost = 2 * max(0.0, far - rules.tolerance) + sum(sum(c.score) for c in pick.values()) / len(pick)
            if best is None or cost < best[0]:
                best = (cost, pick)
    if best is None:
        raise ValueError(
            f"cannot FLOP-match {', '.join(variants)} within {rules.match_tolerance:.0%} near "
            f"{f0:.4g} training FLOPs per token (the {ref_name} at {params:.4g} non-embedding "
            "parameters); widen the sizing rules (match_window, aspect_spread, multiple)"
        )
    shapes = {v: Shape(builders[v].preset, c.cfg, c.fields, c.counts) for v, c in best[1].items()}
    return Matched(ref.params_nonembed, f0, shapes)
