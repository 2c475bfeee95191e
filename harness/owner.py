"""One owner per run directory, across processes and machines that share a filesystem.

The process training `results/<sweep>/<run>/` names itself in `owner.json` there: a random token,
host, pid, process start time and Slurm job. The file is published with a hard link, which NFS and
Lustre make atomic (unlike `flock`, which they may ignore); the link count settles a reply lost in
transit. While it trains, a daemon thread touches the file every `heartbeat_s`.

Whether an owner lives is decided by the strongest evidence at hand, in this order:
- it ran on this machine (same host, boot and pid namespace): alive exactly when its pid runs
  with the same start time;
- it is this Slurm job at an earlier attempt: dead (the job was requeued, the old attempt is gone);
- its Slurm job, on this cluster, is known to `squeue`: alive while pending, running or suspended,
  dead once it has ended or left `squeue`;
- otherwise: dead once its heartbeat is older than `stale_s`, measured against the filesystem's own
  clock (the mtime of a probe file), so clock skew between nodes does not matter.

Every removal of `owner.json` (a takeover, a release) happens under a short-lived break lock
(`owner.json.break`), after checking that the file still names the expected owner, so two processes
that find an owner dead cannot both take over. An owner that finds its token gone from
`owner.json` (it was presumed dead, say after a long suspension) has lost the run: the train loop
stops before writing anything more (`check` every step from the heartbeat's flag, `verify` from the
file itself before each checkpoint and summary).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
BREAK_STALE_S = 60.0
_SLURM_DEAD = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT"}  # fmt: skip


class RunBusy(RuntimeError):
    """Another live process owns the run directory."""


class OwnershipLost(RuntimeError):
    """This process was presumed dead and another took the run over; it must not write."""


@dataclass(frozen=True)
class Owner:
    token: str
    host: str = ""
    pid: int = 0
    start: str = ""  # process start time in clock ticks since boot (Linux), "" elsewhere
    machine: str = ""  # boot id and pid namespace: pids compare only within one
    slurm_job: str = ""
    slurm_restart: int = 0
    slurm_cluster: str = ""
    uid: int = -1  # squeue may hide other users' jobs (PrivateData): its silence counts only for ours
    heartbeat_s: float = 30.0
    since: str = ""

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" + (
            f" attempt {self.slurm_restart + 1}" if self.slurm_restart else ""
        )
        return (
            f"pid {self.pid} on {self.host or '?'}{job if self.slurm_job else ''}, since {self.since or '?'}"
        )


def _proc_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _machine() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _slurm_job() -> tuple[str, int]:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID", "")
    return job, int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def me(token: str | None = None) -> Owner:
    job, restart = _slurm_job()
    return Owner(
        token=token or uuid.uuid4().hex,
        host=socket.gethostname(),
        pid=os.getpid(),
        start=_proc_start(os.getpid()),
        machine=_machine(),
        slurm_job=job,
        slurm_restart=restart,
        slurm_cluster=os.environ.get("SLURM_CLUSTER_NAME", "") if job else "",
        uid=os.getuid() if hasattr(os, "getuid") else -1,
        since=datetime.now(UTC).isoformat(timespec="seconds"),
    )


_OWNER = TypeAdapter(Owner)


def read_owner(run_dir: Path) -> Owner | None:
    """The owner named in run_dir/owner.json; a file that does not parse as one (a crash mid-write
    on a filesystem without hard links, a hand edit) gives an owner known only by its heartbeat."""
    return _read_owner_file(Path(run_dir) / OWNER_FILE)


def _holds(lock: Path, token: str) -> bool:
    try:
        return lock.read_text() == token
    except OSError:
        return False


def _read_owner_file(p: Path) -> Owner | None:
    try:
        raw = json.loads(p.read_bytes())
        return _OWNER.validate_python(raw)
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError, ValidationError):
        return Owner(token="")


@functools.cache
def _local_cluster() -> str:
    """The Slurm cluster this machine's `squeue` talks to ("" when unknown)."""
    if os.environ.get("SLURM_CLUSTER_NAME"):
        return os.environ["SLURM_CLUSTER_NAME"]
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return ""


def _slurm_state(job: str, cluster: str = "") -> str | None:
    """The job's state in squeue, "" when squeue no longer knows it, None when squeue cannot say
    (no squeue, no controller, or the job belongs to another cluster sharing this filesystem)."""
    if cluster and cluster != _local_cluster():
        return None
    try:
        r = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return "" if "invalid job id" in r.stderr.lower() else None
    states = r.stdout.split()
    return states[0] if states else ""


def _fs_age(path: Path) -> float | None:
    """Seconds since `path` was last touched, by the filesystem's clock; None when it is gone."""
    probe = path.parent / f".clock-{uuid.uuid4().hex}"
    try:  # an open() makes NFS revalidate attributes that stat() may serve from its cache
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    try:
        probe.touch()
    except OSError:  # a directory this process may only read: fall back to the local clock
        return time.time() - mtime
    try:
        return probe.stat().st_mtime - mtime
    finally:
        probe.unlink(missing_ok=True)


def dead_because(owner: Owner, run_dir: Path, stale_s: float) -> str:
    """Why `owner` is dead, or "" when it is (as far as can be told) alive (module docstring)."""
    here = me(token="")
    if owner.host == here.host and owner.machine and owner.machine == here.machine and owner.pid:
        try:
            os.kill(owner.pid, 0)
            visible = True
        except ProcessLookupError:
            return f"process {owner.pid} on {owner.host} is gone"
        except PermissionError:  # another user's process, or /proc hidden from us
            visible = False
        start = _proc_start(owner.pid)
        if owner.start and start and start != owner.start:
            return f"process {owner.pid} on {owner.host} is gone (the pid now belongs to another process)"
        if visible or not owner.start or start:
            return ""
    if owner.slurm_job:
        same_job = owner.slurm_job == here.slurm_job
        if same_job and owner.slurm_restart < here.slurm_restart:
            return f"Slurm requeued job {owner.slurm_job}; this attempt replaces the earlier one"
        if not same_job:  # our own job is running by definition: it says nothing of the owner
            state = _slurm_state(owner.slurm_job, owner.slurm_cluster)
            mine = owner.uid == here.uid
            if state and state.upper() in _SLURM_DEAD or (state == "" and mine):
                return f"Slurm job {owner.slurm_job} is {state.lower() or 'no longer in squeue'}"
            if state:  # pending, running, suspended, completing: the job vouches for its process
                return ""
    # The owner beats every heartbeat_s; a threshold under a few beats would take live owners.
    limit = max(stale_s, 3 * owner.heartbeat_s + 60)
    age = _fs_age(Path(run_dir) / OWNER_FILE)
    if age is not None and age > limit:
        return f"no heartbeat for {age:.0f} s (train.owner_stale_s={stale_s:g})"
    return ""


def _link_create(path: Path, text: str) -> bool:
    """Creates `path` holding `text` if it does not exist, atomically, also over NFS."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink == 2  # NFS retried a link that had succeeded: EEXIST from our own
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):  # no hard links here
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if os.stat(tmp).st_nlink == 2:  # the reply was lost, the link was made
            return True
        raise
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """Ownership of one run directory (module docstring). Use `acquire` then `release`, or `with`."""

    def __init__(self, run_dir: Path, stale_s: float = 600.0, heartbeat_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / OWNER_FILE
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s or max(0.05, min(30.0, stale_s / 10))
        self.owner = replace(me(), heartbeat_s=self.heartbeat_s)
        self.lost: str = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, if_busy: str = "fail", poll_s: float = 5.0) -> bool:
        """True once this process owns the directory. A live owner elsewhere: "fail" raises
        `RunBusy` naming it, "skip" returns False, "wait" polls until it is gone."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self.owner), indent=2) + "\n"
        waited = False
        while True:
            if _link_create(self.path, text):
                return self._owned()
            other = read_owner(self.run_dir)
            if other is None:
                time.sleep(0.05)  # released between our attempt and our read
                continue
            if other.token == self.owner.token:  # ours after all (a link reply lost in transit)
                return self._owned()
            why = dead_because(other, self.run_dir, self.stale_s)
            if why:
                log.warning("%s: taking over from %s: %s", self.run_dir, other.describe(), why)
                self._remove_if(other.token, still_dead=True)
                continue
            msg = f"{self.run_dir} is being trained by {other.describe()}"
            if if_busy == "fail":
                raise RunBusy(f"{msg}. Wait for it, or relaunch with train.if_busy=wait or skip.")
            if if_busy == "skip":
                log.warning("%s; skipping (train.if_busy=skip)", msg)
                return False
            if not waited:
                log.warning("%s; waiting for it (train.if_busy=wait)", msg)
                waited = True
            time.sleep(poll_s)

    def _owned(self) -> bool:
        self._thread = threading.Thread(target=self._beat, name="run-owner-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _remove_if(self, token: str, still_dead: bool = False, tries: int = 50) -> bool:
        """Removes owner.json if it still names `token` (and, with `still_dead`, that owner is still
        dead), under the break lock. False when the break lock stayed busy."""
        brk = self.path.with_name(OWNER_FILE + ".break")
        for _ in range(tries):
            if _link_create(brk, self.owner.token) or _holds(brk, self.owner.token):
                break
            self._clear_stale_break(brk)
            time.sleep(0.1)
        else:
            return False
        try:
            cur = read_owner(self.run_dir)
            if cur is None or cur.token != token:
                return True
            if still_dead and not dead_because(cur, self.run_dir, self.stale_s):
                return True
            # Renamed aside, then checked: if a stall let someone else publish owner.json meanwhile,
            # theirs is put back rather than deleted.
            aside = self.path.with_name(f".{OWNER_FILE}.{self.owner.token}.gone")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return True
            gone = _read_owner_file(aside)
            if gone is not None and gone.token != token:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
            aside.unlink(missing_ok=True)
        finally:
            if _holds(brk, self.owner.token):
                brk.unlink(missing_ok=True)
        return True

    def _clear_stale_break(self, brk: Path) -> None:
        """A break lock is held for milliseconds; one older than BREAK_STALE_S was left by a crash.
        It is renamed aside first, so of two processes that both find it stale only one removes it,
        and a fresh lock renamed by mistake is put back."""
        age = _fs_age(brk)
        if age is None or age <= BREAK_STALE_S:
            return
        aside = brk.with_name(f".{brk.name}.{uuid.uuid4().hex}")
        try:
            os.rename(brk, aside)
        except FileNotFoundError:
            return
        try:
            fresh = _fs_age(aside)
            if fresh is not None and fresh <= BREAK_STALE_S:
                try:
                    os.link(aside, brk)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    cur = read_owner(self.run_dir)
                    if cur is None or cur.token != self.owner.token:
                        self.lost = (
                            f"{cur.describe()} took it over" if cur is not None else "owner.json was removed"
                        )
                        log.error("%s: this process no longer owns the run: %s", self.run_dir, self.lost)
                        return
                    os.utime(self.path)
                except OSError as e:  # a filesystem hiccup: try again at the next beat
                    log.warning("%s: heartbeat failed (%s); retrying", self.run_dir, e)
        except BaseException as e:
            self.lost = f"the heartbeat stopped ({type(e).__name__}: {e})"
            raise

    def check(self) -> None:
        """Raises `OwnershipLost` once the heartbeat found another owner (or stopped); cheap enough
        for every step."""
        if not self.lost and self._thread is not None and not self._thread.is_alive():
            self.lost = "the heartbeat stopped"
        if self.lost:
            raise OwnershipLost(f"{self.run_dir}: {self.lost}; this process stops without writing")

    def verify(self) -> None:
        """`check`, plus a read of owner.json itself; call before publishing a checkpoint or a summary."""
        self.check()
        cur = read_owner(self.run_dir)
        if cur is None or cur.token != self.owner.token:
            self.lost = f"{cur.describe()} took it over" if cur is not None else "owner.json was removed"
            self.check()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.lost:
            self._remove_if(self.owner.token)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def live_owner(run_dir: Path, stale_s: float = 600.0) -> Owner | None:
    """The owner of run_dir when it is alive, else None (no owner, or a dead one)."""
    o = read_owner(Path(run_dir))
    if o is None or dead_because(o, Path(run_dir), stale_s):
        return None
    return o
