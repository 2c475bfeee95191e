"""harness-compare: the fixed-compute table, the multiplier against the dense baseline, the CLI."""

from __future__ import annotations

import pandas as pd
import pytest

from harness import compare as C
from harness.results import collect
from tests.test_report import add_malformed, make_results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pd.DataFrame:
    import warnings

    root = make_results(tmp_path_factory.mktemp("c") / "demo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect(root)


def test_table_has_prediction_interval_best_run_and_multiplier(runs):
    table, pairs = C.compare(runs, 1e13, n_boot=40)
    assert table.attrs["baseline"] == "llama"
    t = table.set_index("arch")
    for arch in ("llama", "switch"):
        assert t.loc[arch, "loss_lo"] <= t.loc[arch, "loss_pred"] <= t.loc[arch, "loss_hi"]
        assert 5e12 <= t.loc[arch, "best_run_flops"] <= 2e13
    assert t.loc["llama", "multiplier"] == pytest.approx(1.0, rel=1e-6)
    # switch's planted A is 0.8x the dense one: it reaches each loss with less compute
    assert t.loc["switch", "multiplier"] > 1.0
    assert t.loc["switch", "loss_pred"] < t.loc["llama", "loss_pred"]
    assert pairs.loc[0, ["arch_a", "arch_b"]].tolist() == ["llama", "switch"]
    assert pairs.loc[0, "distinguishable"]


def test_baseline_choice(runs):
    assert C.default_baseline(runs) == "llama"
    assert C.default_baseline(runs[runs["arch"] == "switch"]) is None


def test_markdown_table_formats_and_escapes():
    md = C.markdown_table(pd.DataFrame({"a": [1.23456789, float("nan")], "b": ["x|y", None]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x/y |", "|  |  |"]


def test_cli_prints_and_saves(tmp_path, capsys):
    root = make_results(tmp_path / "demo", budgets=(1e12, 1e13), sizes=3)
    assert C.main([str(root), "--flops", "1e13", "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "Fixed-compute comparison" in out and "switch" in out
    assert (root / "report" / "compare_1e13.csv").exists() and (root / "report" / "compare_1e13.md").exists()


def test_cli_missing_directory(tmp_path, capsys):
    assert C.main([str(tmp_path / "nope"), "--flops", "1e15"]) == 2
    assert "not found" in capsys.readouterr().err


def test_no_bare_inf_a_missing_multiplier_says_why(runs):
    """An architecture whose predicted loss lies below the baseline's asymptote: the baseline never
    reaches it, so there is no multiplier, and the note says so instead of printing inf."""
    import numpy as np

    from harness import fit as F

    def frontier(e, a, al):
        th = np.array([e, a, al])
        return F.Fit("frontier", ("E", "A", "alpha"), th, np.tile(th, (20, 1)), 10, F.frontier_loss,
                     extra={"form": F.FULL_FORM})  # fmt: skip

    fits = {"llama": frontier(2.5, 60.0, 0.3), "switch": frontier(1.5, 60.0, 0.3)}
    table, _ = C.compare(runs, 1e13, fits=fits)
    t = table.set_index("arch")
    assert np.isnan(t.loc["switch", "multiplier"]) and not np.isinf(table["multiplier"].astype(float)).any()
    assert "never reaches loss" in t.loc["switch", "note"] and "asymptote E = 2.5" in t.loc["switch", "note"]
    # a fit that is not identified gets no prediction, and its reasons instead
    fits["switch"] = F.Fit("frontier", ("E", "A", "alpha"), fits["switch"].theta, fits["switch"].samples, 3,
                           F.frontier_loss, reasons=("too few points",))  # fmt: skip
    t = C.compare(runs, 1e13, fits=fits)[0].set_index("arch")
    assert t.loc["switch", "fit_status"] == "not identified" and np.isnan(t.loc["switch", "loss_pred"])
    assert "too few points" in t.loc["switch", "note"]


def test_cli_prints_every_exclusion_and_survives_malformed_runs(tmp_path, capsys):
    root = make_results(tmp_path / "demo", budgets=(1e12, 1e13), sizes=3)
    bad = add_malformed(root)
    assert C.main([str(root), "--flops", "1e13", "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    assert "Fixed-compute comparison" in out
    for run, (file, why) in bad.items():
        assert f"excluded {run} [{file}]: {why}" in out, run
    assert "excluded llama-corrupt [summary.json]: corrupt: summary.json: not valid JSON" in out


def test_negative_loss_is_excluded_even_from_a_raw_table(runs):
    """A caller may pass a table that did not come from collect: an impossible loss still never counts."""
    t = C.compare(runs, 1e13, n_boot=10)[0].set_index("arch")
    raw = runs.copy()
    i = raw.index[(raw["arch"] == "llama") & (raw["flops_budget"] == 1e13)][0]
    raw.loc[i, "final_val_loss"] = -3.0  # would be the best run near 1e13 FLOPs
    t_raw = C.compare(raw, 1e13, n_boot=10)[0].set_index("arch")
    assert t_raw.loc["llama", "n_runs"] == t.loc["llama", "n_runs"] - 1
    assert t_raw.loc["llama", "best_run_loss"] > 0
