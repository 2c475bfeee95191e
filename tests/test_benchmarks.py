"""The benchmark scripts still run (at toy sizes) and print a ratio against their reference.
They are timed by hand, never here; this only keeps them from rotting."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

TOY = {
    "bench_scan.py": ["--batch", "1", "--d-model", "16", "--seq-len", "32", "--chunk", "8", "--head-dim", "8",
                      "--repeats", "1", "--ref-repeats", "1"],
    "bench_wkv.py": ["--batch", "1", "--d-model", "16", "--head-size", "8", "--seq-len", "32", "--repeats", "1"],
    "bench_dispatch.py": ["--tokens", "256", "--d-model", "16", "--d-ff", "16", "--experts", "4", "--reps", "1"],
    "bench_fit.py": ["--points", "30", "--bootstrap", "20"],
    "bench_train.py": ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32", "--batch", "2",
                       "--repeats", "1", "--warmup", "1"],
}  # fmt: skip


def test_every_benchmark_has_a_toy_run():
    assert sorted(p.name for p in BENCH.glob("bench_*.py")) == sorted(TOY)


@pytest.mark.parametrize("script", sorted(TOY))
def test_benchmark_runs(script):
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *TOY[script]], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if script != "bench_fit.py":  # the fit benchmark times one path; the others print ratios
        assert re.search(r"\d+\.\d+x?\s*$", done.stdout, re.M), done.stdout
    assert "nan" not in done.stdout.lower(), done.stdout
