"""A run preempted on a real Slurm cluster (`scontrol requeue`) is requeued and resumes from its
checkpoint, and its metrics continue without gaps or repeats."""

import json
import subprocess
import sys
import time

import pytest

from tests.slurm.test_slurm_multirun import require_slurm


def _job_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True, text=True)
    return out.stdout.strip()


STEPS = 1000  # of 16 x 64 tokens: about 20 s, long enough to interrupt


def launch_long_run(results, sweep: str, *overrides: str) -> subprocess.Popen:
    """A one-run Slurm sweep of STEPS steps."""
    cmd = [sys.executable, "-c", "from harness.train import main; main()", "-m", "hydra/launcher=slurm",
           "model=llama_tiny", f"sweep={sweep}", f"results_dir={results}", f"train.tokens={STEPS * 16 * 64}",
           "train.progress=false", "train.threads=1", "hydra.launcher.timeout_min=10",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sweep_job(sweep: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-n", f"harness-{sweep}", "-o", "%i"], capture_output=True, text=True
    )
    return out.stdout.split()[0]


def interrupt_and_finish(launcher: subprocess.Popen, sweep: str, *command: str) -> str:
    """Runs `command JOBID` on the sweep's job, releases it once requeued, and waits for the sweep
    to end successfully; returns its output."""
    job = sweep_job(sweep)
    subprocess.run([*command, job], check=True)
    release_when_requeued(job)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    return out


def release_when_requeued(job: str) -> None:
    """Slurm holds a requeued job back for a while; release it as soon as it is pending again."""
    deadline = time.time() + 120
    while _job_state(job) != "PD":
        assert time.time() < deadline, f"job {job} never went back to pending"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    require_slurm()
    results = tmp_path / "results"
    sweep = f"requeue{int(time.time())}"
    launcher = launch_long_run(results, sweep, "train.ckpt_every=50")
    try:
        deadline = time.time() + 120
        while not list(results.glob(f"{sweep}/*/ckpt/step_*")):
            assert time.time() < deadline and launcher.poll() is None, "no checkpoint appeared"
            time.sleep(0.5)
        interrupt_and_finish(launcher, sweep, "scontrol", "requeue")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    run_dir = next(p for p in (results / sweep).iterdir() if not p.name.startswith("."))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, STEPS + 1, 10))  # every logged step exactly once, across both attempts
    logs = "".join(p.read_text() for p in (results / sweep / ".hydra" / ".submitit").rglob("*.err"))
    resumed = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if "resuming" in line]
    assert resumed and 0 < resumed[0] < STEPS, "the requeued attempt did not resume from a checkpoint"
