"""One owner per run directory: live owners are respected, dead ones taken over, a lost owner stops."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from harness import owner as own
from harness.owner import Owner, OwnershipLost, RunBusy, RunLock, dead_because, read_owner


def _write_owner(run_dir, o: Owner, age_s: float = 0.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / own.OWNER_FILE
    p.write_text(json.dumps(asdict(o)))
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_lock_on_a_live_run_is_refused_naming_the_owner(tmp_path):
    first = RunLock(tmp_path / "r")
    assert first.acquire()
    try:
        with pytest.raises(RunBusy, match=rf"pid {os.getpid()} on .*train.if_busy=wait or skip"):
            RunLock(tmp_path / "r").acquire("fail")
        assert RunLock(tmp_path / "r").acquire("skip") is False
    finally:
        first.release()
    assert not (tmp_path / "r" / own.OWNER_FILE).exists()
    second = RunLock(tmp_path / "r")
    assert second.acquire()
    second.release()


def test_waiting_launch_takes_the_run_once_the_owner_releases_it(tmp_path):
    first = RunLock(tmp_path / "r")
    first.acquire()
    import threading

    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    second = RunLock(tmp_path / "r")
    assert second.acquire("wait", poll_s=0.1)
    assert time.monotonic() - t0 >= 0.4
    assert read_owner(tmp_path / "r").token == second.owner.token
    second.release()


@pytest.mark.parametrize(
    "case",
    ["pid-gone", "pid-reused", "heartbeat-stale", "slurm-requeued"],
)
def test_dead_owner_is_detected_and_taken_over(tmp_path, monkeypatch, case):
    run_dir = tmp_path / "r"
    here = own.me()
    if case == "pid-gone":
        dead = replace(here, pid=_dead_pid(), start="")
    elif case == "pid-reused":  # our own pid, but a process that started at another time
        dead = replace(here, start=str(int(here.start or "0") + 1))
    elif case == "heartbeat-stale":
        dead = replace(here, host="elsewhere", slurm_job="")
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
        dead = replace(here, host="elsewhere", slurm_job="4242", slurm_restart=0)
    if case == "pid-reused" and not here.start:
        pytest.skip("no /proc start times on this platform")
    _write_owner(run_dir, dead, age_s=3600 if case == "heartbeat-stale" else 0)
    why = dead_because(dead, run_dir, stale_s=600)
    expected = {"pid-gone": "is gone", "pid-reused": "another process", "heartbeat-stale": "no heartbeat",
                "slurm-requeued": "requeued"}[case]  # fmt: skip
    assert expected in why
    lock = RunLock(run_dir)
    assert lock.acquire("fail")
    assert read_owner(run_dir).token == lock.owner.token
    lock.release()


def test_owner_elsewhere_with_a_fresh_heartbeat_is_live(tmp_path):
    other = replace(own.me(), host="elsewhere", slurm_job="")
    _write_owner(tmp_path / "r", other)
    assert dead_because(other, tmp_path / "r", stale_s=600) == ""
    with pytest.raises(RunBusy, match="on elsewhere"):
        RunLock(tmp_path / "r").acquire("fail")


@pytest.mark.slurm
def test_owner_whose_slurm_job_is_gone_is_dead(tmp_path):
    from tests.slurm.test_slurm_multirun import require_slurm

    require_slurm()
    other = replace(own.me(), host="elsewhere", slurm_job="987654321")
    _write_owner(tmp_path / "r", other)
    assert "no longer in squeue" in dead_because(other, tmp_path / "r", stale_s=600)


def test_an_owner_presumed_dead_stops_before_writing(tmp_path):
    lock = RunLock(tmp_path / "r", heartbeat_s=0.05)
    lock.acquire()
    try:
        _write_owner(tmp_path / "r", replace(own.me(), host="elsewhere"))  # someone took over
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(OwnershipLost, match="took it over"):
            lock.check()
    finally:
        lock.release()
    assert read_owner(tmp_path / "r").host == "elsewhere"  # release leaves the new owner's file alone


def test_unreadable_owner_file_is_judged_by_its_age(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / own.OWNER_FILE).write_text("{ torn")
    t = time.time() - 3600
    os.utime(run_dir / own.OWNER_FILE, (t, t))
    lock = RunLock(run_dir)
    assert lock.acquire("fail")
    lock.release()


def test_a_lost_owner_is_caught_before_the_next_write_without_waiting_for_a_beat(tmp_path):
    lock = RunLock(tmp_path / "r", heartbeat_s=3600)
    lock.acquire()
    try:
        _write_owner(tmp_path / "r", replace(own.me(), host="elsewhere"))
        lock.check()  # the heartbeat has not looked yet
        with pytest.raises(OwnershipLost, match="took it over"):
            lock.verify()
    finally:
        lock.release()
    assert read_owner(tmp_path / "r").host == "elsewhere"


def test_a_live_process_on_this_machine_is_alive_whatever_its_heartbeat(tmp_path):
    here = own.me()
    _write_owner(tmp_path / "r", here, age_s=3600)
    assert dead_because(here, tmp_path / "r", stale_s=600) == ""


def test_owner_file_with_wrong_types_is_judged_by_its_age_not_a_crash(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / own.OWNER_FILE).write_text(json.dumps({"token": "t", "pid": "not a pid", "host": ["x"]}))
    assert read_owner(run_dir) == Owner(token="")
    assert dead_because(read_owner(run_dir), run_dir, stale_s=600) == ""  # fresh: presumed alive
    with pytest.raises(RunBusy):
        RunLock(run_dir).acquire("fail")


def test_stale_break_lock_is_cleared_and_a_fresh_one_respected(tmp_path):
    run_dir = tmp_path / "r"
    dead = replace(own.me(), pid=_dead_pid(), start="")
    _write_owner(run_dir, dead)
    brk = run_dir / (own.OWNER_FILE + ".break")
    brk.write_text("crashed-breaker")
    t = time.time() - 3600
    os.utime(brk, (t, t))
    lock = RunLock(run_dir)
    assert lock.acquire("fail")  # the stale break lock did not block the takeover
    lock.release()
    assert not brk.exists()
    _write_owner(run_dir, dead)
    brk.write_text("live-breaker")  # fresh: someone is taking over right now
    assert RunLock(run_dir)._remove_if(dead.token, tries=3) is False
    assert brk.read_text() == "live-breaker" and (run_dir / own.OWNER_FILE).exists()


def test_slurm_evidence_is_used_only_where_it_speaks_of_the_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(own, "_slurm_state", lambda job, cluster="": "")  # squeue: no such job
    here = own.me()
    same_attempt = replace(here, host="elsewhere", slurm_job="4242", slurm_restart=0)
    _write_owner(tmp_path / "a", same_attempt)
    assert dead_because(same_attempt, tmp_path / "a", stale_s=600) == ""  # our own job: heartbeat decides
    other_user = replace(here, host="elsewhere", slurm_job="77", uid=here.uid + 1)
    _write_owner(tmp_path / "b", other_user)
    assert dead_because(other_user, tmp_path / "b", stale_s=600) == ""  # squeue may hide their jobs
    mine = replace(other_user, uid=here.uid)
    assert "no longer in squeue" in dead_because(mine, tmp_path / "b", stale_s=600)


def test_a_short_stale_setting_cannot_outrun_the_owners_heartbeat(tmp_path):
    other = replace(own.me(), host="elsewhere", slurm_job="", heartbeat_s=30.0)
    _write_owner(tmp_path / "r", other, age_s=100)  # three beats missed at most
    assert dead_because(other, tmp_path / "r", stale_s=20) == ""
    _write_owner(tmp_path / "r", other, age_s=200)
    assert "no heartbeat" in dead_because(other, tmp_path / "r", stale_s=20)
