"""harness-report on a synthetic results directory: outputs, determinism, robustness, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import report
from harness.fit import CHINCHILLA_GRID

TRUE = {"E": 1.8, "A": 60.0, "B": 400.0, "alpha": 0.3, "beta": 0.32}
SMALL_GRID = {k: v[::2] for k, v in CHINCHILLA_GRID.items()}  # 3x3x3x3x3 starts keep tests fast


def law(n: float, d: float, a_scale: float = 1.0) -> float:
    t = TRUE
    return t["E"] + a_scale * t["A"] * n ** -t["alpha"] + t["B"] * d ** -t["beta"]


def write_run(root: Path, name: str, arch: str, family: str, n: float, d: float, budget: float | None,
              *, a_scale: float = 1.0, noise: float = 0.0, status: str = "completed", moe: bool = False,
              final: float | None = None) -> None:  # fmt: skip
    run = root / name
    run.mkdir(parents=True)
    cfg = {"model": {"family": family, "name": arch, "d_model": 64, "n_layers": 2, "seq_len": 64}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for i, f in enumerate((0.125, 0.25, 0.5, 0.75, 1.0)):
        rec = {"step": i + 1, "tokens": round(d * f), "flops_train": 6 * n * d * f,
               "train_loss": law(n, d * f, a_scale), "val_loss": law(n, d * f, a_scale),
               "wall_s": 6 * n * d * f / 1e12}  # fmt: skip
        if moe:
            rec["metric/expert_load"] = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]]
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    loss = law(n, d, a_scale) * math.exp(noise) if final is None else final
    # No flops_per_token: the planted law's C = 6ND is no FLOP count of the config above, and
    # collect holds a summary's flops_per_token to the accountant's count for its config.
    summary = {"status": status, "final_val_loss": loss, "final_train_loss": loss, "params_total": round(1.2 * n),
               "params_nonembed": round(n), "params_active": round(n), "flops_train": 6 * n * d,
               "flops_budget": budget, "tokens": round(d), "steps": 5, "wall_s": 6 * n * d / 1e12}  # fmt: skip
    if status == "failed":
        summary["reason"] = "diverged: non-finite loss at step 3"
    (run / "summary.json").write_text(json.dumps(summary))


def make_results(root: Path, budgets=(1e12, 3e12, 1e13, 3e13, 1e14), sizes: int = 5, seed: int = 0) -> Path:
    """Two archs (dense llama and a 'switch' MoE whose A is 0.8x), an IsoFLOP grid each, plus a
    failed, a diverged, an incomplete and a corrupt run."""
    rng = np.random.default_rng(seed)
    for arch, family, a_scale, moe in (("llama", "llama", 1.0, False), ("switch", "moe", 0.8, True)):
        for b in budgets:
            for n in np.geomspace(b**0.5 / 60, b**0.5 / 2, sizes):
                n = float(round(n))
                write_run(root, f"{arch}-{b:.0e}-{n:.0f}", arch, family, n, b / (6 * n), b, a_scale=a_scale,
                          noise=float(rng.normal(0, 0.002)), moe=moe)  # fmt: skip
    write_run(root, "llama-failed", "llama", "llama", 1e5, 1e6, None, status="failed", final=float("nan"))
    write_run(root, "llama-nan", "llama", "llama", 2e5, 1e6, None, final=float("nan"))
    write_run(root, "llama-running", "llama", "llama", 3e5, 1e6, None, status="running")
    bad = root / "llama-corrupt"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: {family: llama}\n")
    (bad / "summary.json").write_text('{"status": "compl')
    return root


CHECKED_MODEL = {"family": "llama", "name": "checked", "d_model": 64, "n_layers": 2, "seq_len": 64}


def flops_per_token_checked() -> int:
    from harness import flops
    from harness.models import make_config

    return flops.count(make_config(dict(CHECKED_MODEL))).train


def write_checked_run(root: Path, name: str, *, summary: dict | None = None, config: str | None = None,
                      summary_text: str | None = None, metrics: list[str] | None = None) -> Path:  # fmt: skip
    """A completed run whose numbers agree with its config and the FLOP accountant (arch "checked");
    `summary` entries override, `config` / `summary_text` replace a file's text, `metrics` its lines."""
    run = root / name
    run.mkdir(parents=True)
    fpt = flops_per_token_checked()
    steps, batch = 5, 4
    tokens = steps * batch * CHECKED_MODEL["seq_len"]
    cfg = {"model": CHECKED_MODEL, "train": {"batch_size": batch}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg) if config is None else config)
    recs = [json.dumps({"step": s, "tokens": s * tokens // steps, "flops_train": fpt * s * tokens // steps,
                        "val_loss": 5.0 - 0.1 * s}) for s in range(1, steps + 1)]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(recs if metrics is None else metrics) + "\n")
    s = {"status": "completed", "final_val_loss": 4.5, "final_train_loss": 4.4, "params_total": 100_000,
         "params_nonembed": 60_000, "params_active": 100_000, "flops_per_token": fpt, "flops_train": fpt * tokens,
         "tokens": tokens, "steps": steps, "batch_size": batch, "seq_len": 64, "hardware": {"device": "cpu"},
         **(summary or {})}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(s) if summary_text is None else summary_text)
    return run


def add_malformed(root: Path) -> dict[str, tuple[str, str]]:
    """One run per malformed or impossible case beside a good checked run; {run: (file, start of why)}."""
    write_checked_run(root, "checked-good")
    fpt, tokens = flops_per_token_checked(), 5 * 4 * CHECKED_MODEL["seq_len"]  # steps x batch x seq_len
    good = (root / "checked-good" / "metrics.jsonl").read_text().splitlines()
    write_checked_run(root, "bad-model-str", config="model: gpt2\n")
    write_checked_run(root, "bad-config-yaml", config="model: [llama\n")
    write_checked_run(root, "bad-hardware", summary={"hardware": "cpu"})
    write_checked_run(root, "bad-summary-json", summary_text='{"status": "completed", "final_val_loss": 4.5')
    write_checked_run(root, "bad-negative-loss", summary={"final_val_loss": -3})
    write_checked_run(root, "bad-tokens", summary={"tokens": tokens + 64, "flops_train": fpt * (tokens + 64)})
    write_checked_run(root, "bad-flops-train", summary={"flops_train": fpt * tokens * 2})
    write_checked_run(root, "bad-metrics-line", metrics=good[:2] + ["{garbage"] + good[2:])
    return {
        "bad-model-str": ("config.yaml", "corrupt: config.yaml: model must be a mapping, found str 'gpt2'"),
        "bad-config-yaml": ("config.yaml", "corrupt: config.yaml: not valid YAML"),
        "bad-hardware": ("summary.json", "corrupt: summary.json: hardware: Input should be a valid dictionary"),
        "bad-summary-json": ("summary.json", "corrupt: summary.json: not valid JSON"),
        "bad-negative-loss": ("summary.json", "invalid: summary.json: final_val_loss -3.0 is negative"),
        "bad-tokens": ("summary.json", "invalid: summary.json: tokens 1344 != steps 5 x config.yaml train.batch_size"),
        "bad-flops-train": ("summary.json", "invalid: summary.json: flops_train"),
        "bad-metrics-line": ("metrics.jsonl", "1 malformed line skipped (line 3: not valid JSON"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return make_results(tmp_path_factory.mktemp("sweep") / "demo")


@pytest.fixture(scope="module")
def built(results: Path, tmp_path_factory) -> tuple[Path, Path]:
    a = report.build_report(results, tmp_path_factory.mktemp("r1"), n_boot=30, grid=SMALL_GRID)
    b = report.build_report(results, tmp_path_factory.mktemp("r2"), n_boot=30, grid=SMALL_GRID)
    return a, b


def test_report_writes_every_output(built):
    out, _ = built
    for name in ("index.md", "index.html", "runs.csv", "excluded.csv", "fits.csv", "isoflop_optima.csv",
                 "allocation_optima.csv", "compare.csv", "compare_pairs.csv", "loss_vs_compute.png", "isoflop.png",
                 "optimal_allocation.png", "training_curves.png", "loss_vs_cost.png", "moe_load.png"):  # fmt: skip
        assert (out / name).exists(), name
    index = (out / "index.md").read_text()
    assert "![Loss vs compute](loss_vs_compute.png)" in index and "not drawn" not in index


def test_report_is_byte_identical_on_rerun(built):
    a, b = built
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".png"):
            continue  # images are compared below, separately, so a table diff is reported first
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in (n for n in names if n.endswith(".png")):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_excluded_runs_are_listed_with_reasons(built):
    out, _ = built
    excluded = (out / "excluded.csv").read_text()
    for run in ("llama-failed", "llama-nan", "llama-running", "llama-corrupt"):
        assert run in excluded
    fits = (out / "fits.csv").read_text()
    assert "llama,frontier,ok,E" in fits and "switch,parametric,ok,alpha" in fits


def test_fits_in_report_recover_the_planted_law(built):
    import pandas as pd

    fits = pd.read_csv(built[0] / "fits.csv")
    iso = fits[(fits.arch == "llama") & (fits.approach == "isoflop")].set_index("param")
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert iso.loc["N_opt.exponent", "estimate"] == pytest.approx(a_true, abs=0.06)
    # 15 runs over two decades pin the loss surface, not E alone (E trades off against A, alpha)
    p = fits[(fits.arch == "llama") & (fits.approach == "parametric")].set_index("param")["estimate"]
    for n, d in ((1e5, 1e7), (3e5, 1e8)):
        pred = p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]
        assert pred == pytest.approx(law(n, d), rel=0.01)


def test_too_few_points_still_gives_the_other_plots(tmp_path):
    root = tmp_path / "tiny"
    write_run(root, "a", "llama", "llama", 1e5, 1e7, None)
    write_run(root, "b", "llama", "llama", 2e5, 1e7, None)
    out = report.build_report(root, n_boot=5)
    index = (out / "index.md").read_text()
    assert "frontier fit needs at least 3" in index
    assert (out / "training_curves.png").exists() and (out / "loss_vs_compute.png").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_clear_message_on_missing_or_empty_dir(tmp_path, capsys, case):
    path = tmp_path / "nothing"
    if case == "empty":
        path.mkdir()
    assert report.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "harness-report:" in err and "Traceback" not in err


def test_cli_writes_report(tmp_path, capsys):
    root = tmp_path / "cli"
    for i, n in enumerate((1e5, 2e5, 4e5)):
        write_run(root, f"r{i}", "llama", "llama", n, 1e9 / n, None)
    assert report.main([str(root), "--bootstrap", "5"]) == 0
    assert (root / "report" / "index.html").exists()


def test_index_says_which_fits_hold_and_names_runs_for_people(built):
    import pandas as pd

    out, _ = built
    index = (out / "index.md").read_text()
    assert "## Which fits the data identify" in index
    # llama's planted optimum sits inside its grids; switch's (its A is 0.8x) just inside the smallest size,
    # where the smallest run is the best: not a bracket
    iso = pd.read_csv(out / "isoflop_optima.csv")
    assert iso[iso.arch == "llama"]["ok"].all() and not iso[iso.arch == "switch"]["ok"].any()
    assert (
        iso[iso.arch == "switch"]["why"].str.startswith("the lowest loss is at the smallest model size").all()
    )
    status = pd.read_csv(out / "fits.csv")[["arch", "approach", "status"]].drop_duplicates()
    assert set(status["status"]) <= {"ok", "not identified"}
    runs = pd.read_csv(out / "runs.csv")
    planned = runs[runs["flops_budget"].notna()]
    assert len(planned) == 50 and planned["label"].str.fullmatch(r"(?:llama|switch) N=\S+ D=\S+ C=\S+").all()
    assert "llama N=16.7k D=10M C=1e+12" in set(planned["label"])


def test_grids_that_missed_their_optimum_are_listed(tmp_path):
    """Sizes all above each budget's optimum: no grid brackets it, and the report says so."""
    root = tmp_path / "missed" / "demo"
    for b in (1e12, 1e13, 1e14):
        for n in np.geomspace(b**0.5 / 2, b**0.5 * 4, 4):  # the planted optimum is near b^0.5 / 20
            write_run(root, f"llama-{b:.0e}-{n:.0f}", "llama", "llama", float(round(n)), b / (6 * n), b)
    out = report.build_report(root, n_boot=10, grid=SMALL_GRID)
    index = (out / "index.md").read_text()
    assert "0 of 3 (architecture, budget) grids bracket their optimum" in index
    assert "## IsoFLOP grids that missed their optimum" in index and "harness-plan --extend" in index
    assert index.count("below the smallest model size sampled") == 3
    assert "| llama | isoflop | not fitted |" in index


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    root = make_results(tmp_path_factory.mktemp("bad") / "demo", budgets=(1e12, 1e13, 1e14), sizes=3)
    return root, add_malformed(root)


def test_report_lists_every_malformed_run_and_uses_the_good_ones(malformed, tmp_path):
    import pandas as pd

    root, bad = malformed
    out = report.build_report(root, tmp_path / "r", n_boot=10, grid=SMALL_GRID)
    excl = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False)
    assert list(excl.columns) == ["arch", "run", "status", "file", "why"]
    got = {r.run: (r.file, r.why) for r in excl.itertuples()}
    for run, (file, why) in bad.items():
        assert got[run][0] == file and got[run][1].startswith(why), (run, got.get(run))
    # make_results' own failed, diverged, running and torn runs; nothing else is left out
    assert set(got) == set(bad) | {"llama-failed", "llama-nan", "llama-running", "llama-corrupt"}
    assert got["llama-failed"] == ("", "failed: diverged: non-finite loss at step 3")
    runs = pd.read_csv(out / "runs.csv")
    used = set(runs.run) - (set(got) - {"bad-metrics-line"})
    assert len(used) == 2 * 9 + 2  # every llama and switch run, checked-good and bad-metrics-line
    index = (out / "index.md").read_text()
    assert f"{len(runs)} runs found, {len(used)} used in fits, 11 excluded" in index
    assert "Malformed metrics.jsonl lines were skipped in 1 run." in index
    assert "## Exclusions\n\n12 exclusions" in index and "| bad-model-str | corrupt | config.yaml |" in index
    fits = pd.read_csv(out / "fits.csv")
    assert {"llama", "switch"} <= set(fits[fits.approach == "frontier"].arch)


def test_report_cli_prints_every_exclusion(malformed, tmp_path, capsys):
    root, bad = malformed
    assert report.main([str(root), "--out", str(tmp_path / "r"), "--bootstrap", "5"]) == 0
    out = capsys.readouterr().out
    for run, (file, why) in bad.items():
        assert f"excluded {run} [{file}]: {why}" in out, run
    assert "excluded llama-failed: failed: diverged" in out


def test_report_over_only_malformed_runs_completes(tmp_path):
    root = tmp_path / "worst"
    bad = add_malformed(root)
    for run in ("checked-good", "bad-metrics-line"):
        (root / run / "summary.json").write_text("{}")  # leaves no run usable
    out = report.build_report(root, n_boot=5, grid=SMALL_GRID)
    index = (out / "index.md").read_text()
    assert f"{len(bad) + 1} runs found, none usable in fits, {len(bad) + 1} excluded." in index
