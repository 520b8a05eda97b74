"""One process per job folder, and no job outliving a killed local launcher.

While a job runs it holds ``<job dir>/.featcal.lock``: a JSON object
``{"pid": int, "host": str, "started": float}`` (``time.time()``), created exclusively
and removed when the job ends. ``featcal-report`` (and its ``collect``) reads it to mark a
job ``running``. A second launcher whose job finds the lock held by a live process
skips the job and says so; a lock whose process is gone (same host, dead pid) is stale
and taken over.

Each job also leaves ``<job dir>/.featcal-outcome-<launch id>`` (``skipped``, ``ran``,
``failed``, ``busy``) for :class:`featcal.resume.ResumeSummary`, which counts (and
removes) the records of its own launch: the summary counts what the jobs printed.

Jobs of the local joblib launcher (``hydra/launcher=local``) watch their launcher: when
it dies (SIGKILL, OOM killer) they exit within about a second instead of running on as
orphans. submitit jobs are meant to outlive their launcher and are left alone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".featcal.lock"
OUTCOME_PREFIX = ".featcal-outcome-"
#: set by the launching process (ResumeSummary.on_multirun_start); inherited by its jobs
LAUNCH_ENV = "FEATCAL_LAUNCH_ID"
LAUNCHER_PID_ENV = "FEATCAL_LAUNCHER_PID"
#: a lock file that is still empty/unreadable after this many seconds is stale
UNREADABLE_GRACE_S = 30.0


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    # a zombie (dead, not yet reaped) is not running
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def read_lock(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock record of ``job_dir`` (None: no lock, or unreadable)."""
    try:
        data = json.loads((Path(job_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_is_live(record: dict[str, Any] | None) -> bool:
    """Whether a lock record's process is running (another host's lock counts as live)."""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        return pid_alive(int(record.get("pid", -1)))
    except (TypeError, ValueError):
        return False


class JobBusy(Exception):
    """The job folder is locked by a live process."""

    def __init__(self, job_dir: Path, record: dict[str, Any] | None):
        self.job_dir, self.record = Path(job_dir), record or {}
        super().__init__(str(job_dir))

    def message(self) -> str:
        r = self.record
        since = time.strftime("%H:%M:%S", time.localtime(float(r["started"]))) if r.get("started") else "?"
        return (f"featcal: skipped {self.job_dir}: it is running in another process (pid {r.get('pid', '?')} on "
                f"{r.get('host', '?')}, since {since}); its lock is {self.job_dir / LOCK_FILE} (delete it only if "
                f"that process is gone)")


def acquire(job_dir: str | os.PathLike) -> Path:
    """Take ``<job_dir>/.featcal.lock`` for this process (taking over a stale lock); raise
    :class:`JobBusy` when a live process holds it. Returns the lock's path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = read_lock(job_dir)
            if held is None:
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime < UNREADABLE_GRACE_S:
                        raise JobBusy(job_dir, {"pid": "?", "host": "?"})  # being written right now
            elif lock_is_live(held):
                if held.get("pid") == os.getpid() and held.get("host") == record["host"]:
                    return path  # re-entrant (a resumed job in the same process)
                raise JobBusy(job_dir, held)
            # stale: its process is gone; take it over (rename first: one taker wins)
            stale = job_dir / f"{LOCK_FILE}.stale-{os.getpid()}"
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(stale.read_text())
            except (OSError, ValueError):
                moved = None
            if held is not None and moved != held:  # a fresh lock taken meanwhile: put it back
                os.replace(stale, path)
                raise JobBusy(job_dir, moved)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
        return path
    raise JobBusy(job_dir, read_lock(job_dir))


def release(job_dir: str | os.PathLike) -> None:
    """Remove the lock if this process holds it."""
    held = read_lock(job_dir)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            (Path(job_dir) / LOCK_FILE).unlink()


# ---------------------------------------------------------------------------
# the launcher watchdog (joblib workers)

_watched: list[int] = []


def watch_launcher(launcher_pid: int, interval: float = 0.5) -> None:
    """Exit this process (SIGTERM to itself, then ``os._exit``) once ``launcher_pid`` is
    gone (or, for a direct child, no longer its parent: re-parented). Idempotent; nothing
    when this process is the launcher (joblib with n_jobs=1 runs jobs in it)."""
    if _watched or launcher_pid == os.getpid() or not pid_alive(launcher_pid):
        return
    _watched.append(launcher_pid)
    child = os.getppid() == launcher_pid
    # (not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the worker
    # ends, which in loky is not the launcher's death)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if (child and os.getppid() != launcher_pid) or not pid_alive(launcher_pid):
                with contextlib.suppress(Exception):
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(2.0)
                os._exit(143)

    threading.Thread(target=watch, name="featcal-launcher-watchdog", daemon=True).start()


def _is_joblib_job() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower()
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------
# one job, as featcal/run.py runs it


def record_outcome(job_dir: str | os.PathLike, outcome: str) -> None:
    launch = os.environ.get(LAUNCH_ENV)
    if not launch:
        return
    with contextlib.suppress(OSError):
        (Path(job_dir) / f"{OUTCOME_PREFIX}{launch}").write_text(outcome)


def launch_outcomes(sweep_dir: str | os.PathLike, launch: str, remove: bool = True) -> dict[str, str]:
    """{job dir: outcome} recorded under ``sweep_dir`` by the jobs of launch ``launch``."""
    out = {}
    for f in Path(sweep_dir).glob(f"**/{OUTCOME_PREFIX}{launch}"):
        with contextlib.suppress(OSError):
            out[str(f.parent)] = f.read_text().strip()
            if remove:
                f.unlink()
    return out


@contextlib.contextmanager
def job_slot(job_dir: str | os.PathLike) -> Iterator[bool]:
    """Hold the job's lock while the block runs; yields False (after printing why) when
    another live process holds it. Records the job's outcome for the resume summary and,
    in a joblib worker, starts the launcher watchdog."""
    job_dir = Path(job_dir)
    if _is_joblib_job() and os.environ.get(LAUNCHER_PID_ENV):
        with contextlib.suppress(Exception):
            watch_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    try:
        acquire(job_dir)
    except JobBusy as busy:
        print(busy.message(), flush=True)
        record_outcome(job_dir, "busy")
        yield False
        return
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            yield True  # the run folder itself is unusable: the environment check reports it
            return
        raise
    results = job_dir / "results.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    outcome = "failed"
    try:
        yield True
        after = results.stat().st_mtime_ns if results.exists() else None
        if (job_dir / "failed.json").exists() or after is None:
            outcome = "failed"
        else:
            outcome = "skipped" if after == before else "ran"
    finally:
        record_outcome(job_dir, outcome)
        release(job_dir)
