"""Sizing rules and FLOP matching, over every registered family (read at run time)."""

from __future__ import annotations

import math

import pytest

from harness import flops, sizing
from harness.models import build_model
from harness.plan import default_variants

VARIANTS = default_variants()


@pytest.mark.parametrize("n", [1.5e5, 1e6, 4e6], ids=["150k", "1M", "4M"])
def test_match_puts_every_family_within_2_percent(n):
    m = sizing.match(VARIANTS, params=n, seq_len=128, vocab_size=256)
    assert set(m.shapes) == set(VARIANTS)
    assert m.spread <= 0.02 + 1e-12
    for v, s in m.shapes.items():
        assert s.counts == flops.count(s.cfg)
        assert abs(math.log(s.flops_per_token / m.flops_per_token)) <= 0.2 + 1e-9, v
        assert s.cfg.seq_len == 128 and s.cfg.vocab_size == 256


@pytest.mark.parametrize("variant", VARIANTS)
def test_size_by_params_and_flops_follows_the_rules(variant):
    rules = sizing.SizingRules()
    by_params = sizing.size(variant, params=5e5, seq_len=64, vocab_size=256)
    assert by_params.params_nonembed == pytest.approx(5e5, rel=rules.tolerance)
    by_flops = sizing.size(variant, flops_per_token=2e7, seq_len=64, vocab_size=256)
    assert by_flops.flops_per_token == pytest.approx(2e7, rel=rules.tolerance)
    for s in (by_params, by_flops):
        b = sizing._Builder(variant, rules, 64, 256)
        aspect = s.cfg.d_model / s.cfg.n_layers
        assert b.aspect / rules.aspect_spread <= aspect <= b.aspect * rules.aspect_spread
        assert s.cfg.d_model % b.d_multiple == 0
        if b.heads:
            assert s.cfg.head_dim == rules.head_dim


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_sized_shape_builds_with_the_counted_parameters(variant):
    s = sizing.size(variant, params=1.5e5, seq_len=32, vocab_size=256, strict=False)
    model = build_model(s.cfg)
    assert sum(p.numel() for p in model.parameters()) == s.counts.params_total


def test_overrides_rebuild_the_shape_through_hydra():
    from harness.config import compose

    s = sizing.size("llama", flops_per_token=1e7, seq_len=64, vocab_size=256)
    assert compose(s.overrides()).model == s.cfg
    assert s.overrides()[0] == "model=llama"


def test_tiny_preset_widths_do_not_survive_scaling():
    s = sizing.shape("llama", d_model=256, n_layers=4, seq_len=64)
    assert s.cfg.d_ff >= 512 and s.cfg.n_heads == 256 // 32


def test_below_the_smallest_model_fails_clearly():
    with pytest.raises(ValueError, match="below the smallest buildable llama"):
        sizing.size("llama", params=10, seq_len=64)


def test_unknown_variant_lists_known_families():
    with pytest.raises(ValueError, match="unknown model variant 'lama'.*known families: .*llama"):
        sizing.size("lama", params=1e6)


def test_unbuildable_shape_fails_clearly():
    with pytest.raises(ValueError, match="cannot build llama at d_model=30"):
        sizing.shape("llama", d_model=30, n_layers=2, rules=sizing.SizingRules(head_dim=15))


def test_bad_rules_and_targets_are_refused():
    with pytest.raises(ValueError, match="aspect_spread"):
        sizing.SizingRules(aspect_spread=0.5)
    with pytest.raises(ValueError, match="exactly one target"):
        sizing.size("llama", params=1e6, flops_per_token=1e7)
    with pytest.raises(ValueError, match="positive"):
        sizing.size("llama", params=-1)
