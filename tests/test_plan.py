"""IsoFLOP planning: budgets met, sweep files, bad requests refused, a trained run agrees."""

from __future__ import annotations

import pytest
import yaml

from harness import plan
from harness.config import compose
from harness.train import train

RULES = plan.demo_full_rules()  # tiny models, sized finely enough to FLOP-match every family


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


@pytest.mark.parametrize("name", ["../../x", ".hidden", "a/b"])
def test_cli_refuses_a_bad_sweep_name_before_writing(tmp_path, name):
    out = tmp_path / "a" / "inner"
    with pytest.raises(SystemExit, match=f"sweep name '{name}' may use only"):
        plan.main(["--budgets", "3e11", "--families", "llama", "--seq-len", "64", "--batch-size", "8",
                   "--out", str(out), "--no-timing", "--name", name])  # fmt: skip
    assert not list(tmp_path.rglob("*"))


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


def _fake_results(root, sweep_file, loss_of_n):
    """A finished sweep without training: each run of the sweep file gets a completed run directory,
    at the path harness-train would use, whose final loss is `loss_of_n(N, C)`."""
    import json

    from harness import flops

    spec = yaml.safe_load(sweep_file.read_text())
    for ov in spec["runs"]:
        cfg = compose([*spec["common"], *ov, f"sweep={spec['sweep']}", f"results_dir={root}"])
        n = flops.count(cfg.model).params_nonembed
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / "config.yaml").write_text(
            yaml.safe_dump({"model": {"family": "llama", "name": "llama"}})
        )
        summary = {"status": "completed", "final_val_loss": loss_of_n(n, cfg.train.flops_budget), "params_nonembed": n,
                   "tokens": cfg.train.tokens, "flops_train": cfg.train.flops_budget,
                   "flops_budget": cfg.train.flops_budget}  # fmt: skip
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("side", ["below", "above"])
def test_extend_brackets_a_grid_that_missed_its_optimum(tmp_path, side, capsys):
    import math

    rules = plan.demo_rules()
    runs = plan.plan([4e10], ["llama"], rules)
    sizes = sorted({r.params for r in runs})
    sweep_file = tmp_path / "sweeps" / "ext.yaml"
    plan.write_sweep(sweep_file, "ext", runs, list(plan.DEMO_COMMON), rules=rules)
    assert plan.rules_from_sweep(sweep_file) == rules
    # the planted optimum lies past one edge of the grid, so the parabola's vertex does too
    n_star = sizes[0] / 3 if side == "below" else sizes[-1] * 3
    _fake_results(
        tmp_path / "results", sweep_file, lambda n, c: 2.0 + 0.05 * (math.log(n) - math.log(n_star)) ** 2
    )
    new = plan.extend(tmp_path / "results" / "ext", sweep_file, rules)
    assert new and all(r.budget == 4e10 and r.variant == "llama" for r in new)
    assert (
        all(r.params < sizes[0] for r in new) if side == "below" else all(r.params > sizes[-1] for r in new)
    )
    # the CLI appends them to the sweep file and keeps the finished runs
    plan.main(["--extend", str(tmp_path / "results" / "ext"), "--out", str(tmp_path / "sweeps")])
    spec = yaml.safe_load(sweep_file.read_text())
    assert len(spec["runs"]) == len(runs) + len(new)
    assert spec["runs"][: len(runs)] == [r.overrides() for r in runs]
    assert "added" in capsys.readouterr().out


def test_extend_leaves_a_bracketed_grid_alone(tmp_path, capsys):
    import math

    rules = plan.demo_rules()
    runs = plan.plan([4e10], ["llama"], rules)
    sizes = sorted({r.params for r in runs})
    sweep_file = tmp_path / "sweeps" / "ok.yaml"
    plan.write_sweep(sweep_file, "ok", runs, list(plan.DEMO_COMMON), rules=rules)
    mid = math.sqrt(sizes[0] * sizes[-1])
    _fake_results(
        tmp_path / "results", sweep_file, lambda n, c: 2.0 + 0.05 * (math.log(n) - math.log(mid)) ** 2
    )
    assert plan.extend(tmp_path / "results" / "ok", sweep_file, rules) == []


def test_centre_from_a_pilot_extrapolates_the_optimum_law(tmp_path):
    """A pilot at two small budgets whose planted optimum is N* = 5e3 (C / 4e10)^0.8 centres the grid
    of a larger budget on that law."""
    import math

    rules = plan.demo_rules()
    law = lambda c: 5e3 * (c / 4e10) ** 0.8  # noqa: E731
    pilot = [r for v in ("mamba",) for r in plan.plan([4e10, 8e10], [v], rules)]
    sweep_file = tmp_path / "sweeps" / "pilot.yaml"
    plan.write_sweep(sweep_file, "pilot", pilot, list(plan.DEMO_COMMON), rules=rules)
    _fake_results(
        tmp_path / "results", sweep_file, lambda n, c: 2.0 + 0.05 * (math.log(n) - math.log(law(c))) ** 2
    )
    centres = plan.centres_from(tmp_path / "results" / "pilot", sweep_file, rules)
    assert centres["mamba"].centre_exponent == pytest.approx(0.8, abs=0.02)
    assert plan.compute_optimal_params(3.2e11, "mamba", centres["mamba"]) == pytest.approx(
        law(3.2e11), rel=0.05
    )


def test_extend_never_plans_a_run_twice_and_refuses_a_file_without_rules(tmp_path):
    import math

    rules = plan.demo_rules()
    runs = plan.plan([4e10], ["llama"], rules)
    sweep_file = tmp_path / "sweeps" / "twice.yaml"
    plan.write_sweep(sweep_file, "twice", runs, list(plan.DEMO_COMMON), rules=rules)
    n_star = min(r.params for r in runs) / 3
    _fake_results(
        tmp_path / "results", sweep_file, lambda n, c: 2.0 + 0.05 * (math.log(n) - math.log(n_star)) ** 2
    )
    results = str(tmp_path / "results" / "twice")
    plan.main(["--extend", results, "--out", str(tmp_path / "sweeps")])
    n = len(yaml.safe_load(sweep_file.read_text())["runs"])
    assert n > len(runs)
    # the added runs are not trained yet; extending again adds nothing and the file still loads
    assert plan.extend(tmp_path / "results" / "twice", sweep_file, rules) == []
    from hydra_plugins.harness_sweeper import load_sweep_file

    assert len(load_sweep_file(sweep_file, "twice")) == n
    bare = tmp_path / "sweeps" / "bare.yaml"
    bare.write_text(
        sweep_file.read_text().replace("sweep: twice", "sweep: bare").replace("\nplan:", "\n#plan:")
    )
    (tmp_path / "results" / "bare").mkdir()
    with pytest.raises(SystemExit, match="no plan: section"):
        plan.main(["--extend", str(tmp_path / "results" / "bare"), "--out", str(tmp_path / "sweeps")])
