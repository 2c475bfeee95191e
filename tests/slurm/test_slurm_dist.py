"""One run on two Slurm tasks of a real cluster (hydra.launcher.tasks_per_node=2): submitit's
variables become torchrun's, rank 0 alone writes, and the losses are one process's."""

import json
import subprocess
import sys

import pytest

from harness.config import compose
from harness.train import train
from tests.slurm.test_slurm_multirun import require_slurm

FAST = ["model=llama_tiny", "train.tokens=10240", "train.batch_size=8", "train.eval_batches=2",
        "train.eval_every=5", "train.log_every=1", "train.progress=false", "train.threads=1", "run_name=r"]  # fmt: skip


@pytest.mark.slurm
def test_two_tasks_train_one_run_like_one_process(tmp_path):
    require_slurm()
    results = tmp_path / "results"
    cmd = [sys.executable, "-c", "from harness.train import main; main()", "-m", "hydra/launcher=slurm",
           "sweep=two_tasks", f"results_dir={results}", *FAST, "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_dir = results / "two_tasks" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    two = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in two] == list(range(1, 21))  # rank 0 alone wrote, each step once
    assert (
        len(list((results / "two_tasks" / ".hydra" / ".submitit").rglob("*_1_log.err"))) == 1
    )  # a 2nd task ran
    train(compose([*FAST, f"results_dir={tmp_path / 'one'}"]))
    one = [
        json.loads(line)
        for line in (tmp_path / "one" / "default" / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    for x, y in zip(one, two, strict=True):
        for k in ("train_loss", "val_loss"):
            if x[k] is not None:
                assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]), (x["step"], k)
