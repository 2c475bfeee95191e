"""Slurm's warning signal (what `--signal=USR2@90` sends before a time limit or a preemption): the
run checkpoints at the step it is on, gives up its directory and is requeued; the requeued attempt
resumes from that step, so no step is computed twice and every logged step appears once."""

import json
import re
import time

import pytest

from tests.slurm.test_slurm_multirun import require_slurm
from tests.slurm.test_slurm_requeue import STEPS, interrupt_and_finish, launch_long_run


@pytest.mark.slurm
def test_warning_signal_checkpoints_at_the_current_step_and_requeues(tmp_path):
    require_slurm()
    results = tmp_path / "results"
    sweep = f"preempt{int(time.time())}"
    launcher = launch_long_run(results, sweep, "train.ckpt_every=0", "train.log_every=10")
    try:
        deadline = time.time() + 120
        metrics = list(results.glob(f"{sweep}/*/metrics.jsonl"))
        while not metrics or len(metrics[0].read_text().splitlines()) < 5:
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.5)
            metrics = list(results.glob(f"{sweep}/*/metrics.jsonl"))
        interrupt_and_finish(launcher, sweep, "scancel", "--signal=USR2")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    run_dir = metrics[0].parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, STEPS + 1, 10))  # gap-free and duplicate-free across both attempts
    logs = "".join(p.read_text() for p in (results / sweep / ".hydra" / ".submitit").rglob("*.err"))
    stopped = [int(m) for m in re.findall(r"preempted: checkpointed at step (\d+)", logs)]
    resumed = [int(m) for m in re.findall(r"resuming .* from step (\d+)", logs)]
    assert len(stopped) == 1 and 0 < stopped[0] < STEPS, logs[-2000:]
    assert resumed == stopped  # steps computed twice: none
