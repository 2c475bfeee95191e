"""Slurm's warning signal (what `--signal=USR2@90` sends before a time limit or a preemption): the
run checkpoints at the step it is on, gives up its directory and is requeued; the requeued attempt
resumes from that step, so no step is computed twice and every logged step appears once."""

import json
import re
import subprocess
import sys
import time

import pytest

from tests.slurm.test_slurm_multirun import require_slurm
from tests.slurm.test_slurm_requeue import _job_state


@pytest.mark.slurm
def test_warning_signal_checkpoints_at_the_current_step_and_requeues(tmp_path):
    require_slurm()
    results = tmp_path / "results"
    sweep = f"preempt{int(time.time())}"
    cmd = [sys.executable, "-c", "from harness.train import main; main()", "-m", "hydra/launcher=slurm",
           "model=llama_tiny", f"sweep={sweep}", f"results_dir={results}", "train.tokens=3072000",
           "train.ckpt_every=0", "train.log_every=10", "train.progress=false", "train.threads=1",
           "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        metrics = list(results.glob(f"{sweep}/*/metrics.jsonl"))
        while not metrics or len(metrics[0].read_text().splitlines()) < 5:
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.5)
            metrics = list(results.glob(f"{sweep}/*/metrics.jsonl"))
        job = subprocess.run(["squeue", "-h", "-n", f"harness-{sweep}", "-o", "%i"],
                             capture_output=True, text=True).stdout.split()[0]  # fmt: skip
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        deadline = time.time() + 120
        while _job_state(job) != "PD":
            assert time.time() < deadline, f"job {job} was not requeued"
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-3000:]
    run_dir = metrics[0].parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 3000
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 3001, 10))  # gap-free and duplicate-free across both attempts
    logs = "".join(p.read_text() for p in (results / sweep / ".hydra" / ".submitit").rglob("*.err"))
    stopped = [int(m) for m in re.findall(r"preempted: checkpointed at step (\d+)", logs)]
    resumed = [int(m) for m in re.findall(r"resuming .* from step (\d+)", logs)]
    assert len(stopped) == 1 and 0 < stopped[0] < 3000, logs[-2000:]
    assert resumed == stopped  # steps computed twice: none
