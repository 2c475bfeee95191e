"""IsoFLOP planning: budgets met, sweep files, bad requests refused, a trained run agrees."""

from __future__ import annotations

import pytest
import yaml

from harness import plan
from harness.config import compose
from harness.train import train

RULES = plan.demo_rules()  # tiny models, sized finely enough to FLOP-match every family


@pytest.fixture(scope="module")
def runs():
    return plan.plan([5e10, 1e11], plan.default_variants(), RULES)


def test_every_run_meets_its_budget(runs):
    assert len(runs) == 2 * 3 * len(plan.default_variants())
    for r in runs:
        assert abs(r.flops_train / r.budget - 1) <= 0.02
        assert r.tokens == r.steps * r.batch_size * RULES.seq_len and r.steps >= 1
        assert r.flops_train == r.flops_per_token * r.tokens


def test_sizes_are_flop_matched_and_spread_around_the_guess(runs):
    for c in (5e10, 1e11):
        groups = {}
        for r in runs:
            if r.budget == c:
                groups.setdefault(r.size_index, []).append(r.flops_per_token)
        assert len(groups) == 3
        for f in groups.values():
            assert max(f) / min(f) - 1 <= 0.02
        assert min(groups[0]) < min(groups[1]) < min(groups[2])


def test_sweep_file_round_trips_and_composes(runs, tmp_path):
    path = plan.write_sweep(tmp_path / "iso.yaml", "iso", runs, ["train.eval_batches=2"])
    data = yaml.safe_load(path.read_text())
    assert data["sweep"] == "iso" == path.stem
    assert data["common"] == ["train.eval_batches=2"]
    assert data["runs"] == [r.overrides() for r in runs]
    plan.verify(runs[:4], data["common"])
    assert "train.flops_budget=5e10" in runs[0].overrides()


def test_porian_rule_scales_batch_and_lr():
    rules = plan.PlanRules(seq_len=64, batch_size=8, batch_rule="porian", lr_rule="porian", ref_params=2e5)
    runs = plan.plan([1e12], ["llama"], rules)
    small, large = runs[0], runs[-1]
    ratio = large.nominal_params / small.nominal_params
    assert large.batch_size / small.batch_size == pytest.approx(ratio ** (2 / 3), rel=0.15)
    assert large.lr / small.lr == pytest.approx(ratio ** (-1 / 3), rel=0.01)


def test_budget_below_the_smallest_model_fails():
    with pytest.raises(ValueError, match="below the smallest buildable"):
        plan.plan([1e6], ["llama"], RULES)


def test_fewer_tokens_than_one_batch_fails():
    with pytest.raises(ValueError, match="fewer than one batch|below the smallest buildable"):
        plan.plan([3e11], ["llama"], plan.PlanRules(seq_len=64, batch_size=100_000))


def test_unknown_family_fails_listing_the_known_ones():
    with pytest.raises(ValueError, match="known families"):
        plan.plan([1e12], ["llama", "transfomer"], RULES)


def test_unbuildable_shape_fails():
    from harness.sizing import SizingRules

    bad = plan.PlanRules(seq_len=64, sizing=SizingRules(min_d_model=4096, max_layers=1))
    with pytest.raises(ValueError):
        plan.plan([1e12], ["llama"], bad)


def test_cli_fails_before_writing(tmp_path, capsys):
    with pytest.raises(SystemExit, match="known families"):
        plan.main(["--budgets", "1e12", "--families", "nope", "--out", str(tmp_path), "--no-timing"])
    assert not list(tmp_path.iterdir())


def test_cli_writes_a_sweep(tmp_path, capsys):
    plan.main(["--budgets", "3e11", "--families", "llama", "gpt2", "--seq-len", "64", "--batch-size", "8",
               "--out", str(tmp_path), "--no-timing", "--name", "t"])  # fmt: skip
    out = capsys.readouterr().out
    assert "D/N" in out and (tmp_path / "t.yaml").exists()


def test_trained_run_reports_the_planned_total(tmp_path):
    r = plan.plan([2e10], ["llama"], plan.PlanRules(seq_len=32, batch_size=4, sizes=1))[0]
    run = compose(
        [*r.overrides(), f"results_dir={tmp_path}", "sweep=t", "train.progress=false",
         "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}"]
    )  # fmt: skip
    summary = train(run)
    assert summary["status"] == "completed"
    assert summary["flops_train"] == r.flops_train
    assert summary["flops_budget"] == pytest.approx(r.budget)
