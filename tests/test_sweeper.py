"""Multirun through the real `harness-train` entry point with the sweep-file sweeper (local launcher)."""

import subprocess
import sys

import pytest

from harness.results import collect

FAST = ["train.batch_size=4", "train.eval_batches=2", "train.eval_every=5", "train.progress=false"]


def harness_train(*args, cwd):
    cmd = [sys.executable, "-c", "from harness.train import main; main()", "-m", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "sweeps").mkdir()
    return tmp_path


def test_sweep_file_runs_every_point_and_skips_finished_ones(workdir):
    (workdir / "sweeps" / "mini.yaml").write_text(
        "sweep: mini\ncommon: [train.tokens=2560]\nruns:\n"
        "  - [model=gpt2_tiny]\n  - {run_name: llama_named, overrides: [model=llama_tiny]}\n"
    )
    r = harness_train("sweep=mini", "results_dir=results", "data.cache_dir=.cache", *FAST, cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    df = collect(workdir / "results" / "mini")
    gpt2_run = "model=gpt2_tiny,train.batch_size=4,train.eval_batches=2,train.eval_every=5,train.tokens=2560"
    assert sorted(df.run) == ["llama_named", gpt2_run]
    assert set(df.status) == {"completed"}
    again = harness_train("sweep=mini", "results_dir=results", "data.cache_dir=.cache", *FAST, cwd=workdir)
    assert again.returncode == 0 and "launching 0 job(s) (2 already completed)" in again.stdout + again.stderr


def test_broken_job_fails_before_any_job_runs(workdir):
    r = harness_train(
        "model=gpt2_tiny,llama_tiny", "train.tokens=2560,10", "results_dir=results", *FAST, cwd=workdir
    )
    assert r.returncode != 0
    assert "smaller than one batch" in r.stderr
    assert not (workdir / "results" / "default").exists() or not collect(workdir / "results" / "default").size


def test_unsafe_slurm_option_is_rejected_before_submission(workdir):
    r = harness_train("hydra/launcher=slurm", "hydra.launcher.partition='debug;touch /tmp/x'", "model=gpt2_tiny",
                      "train.tokens=2560", "results_dir=results", cwd=workdir)  # fmt: skip
    assert r.returncode != 0 and "not a single shell-safe word" in r.stderr
