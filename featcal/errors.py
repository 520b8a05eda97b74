"""User-fixable failures, and how ``featcal-run`` reports them.

Every problem a user can fix by changing their setup or config raises a
:class:`FeatcalError`. Its message says *what* is wrong (naming the model, dataset,
file or config key) and *what to do*. The original exception (hub, safetensors,
transformers...) is chained (``raise ... from err``) but not printed by default.

Classes (import them from here, the one path for every featcal error)::

    FeatcalError
    ├── ConfigError           a config value is invalid (checked before loading, or only
    │   │                     when loading shows it: a missing split or column, ...)
    │   ├── BudgetTooLarge    the calibration budget exceeds a task's split
    │   └── TaskMismatch      the task pool's tasks are not the backbone's experts
    ├── SourceUnavailable     a model or dataset is missing or unreadable (offline, wrong
    │   │                     path, truncated weights file)
    │   └── CheckpointMismatch  a checkpoint that does not fit the architecture
    ├── CorruptCache          a cache entry is invalid and cannot be rebuilt here
    └── ResultsNotWritten     a finished run could not write its results (full or
                              read-only disk); its scores are in failed.json or on stderr

Exit codes of ``featcal-run`` (see README): 0 success, 1 crash (a bug: Hydra's
traceback), 2 user-fixable error (:class:`FeatcalError`), 3 out of GPU memory.

The run-time half of this module (``guard``; the end-of-multirun list of failed jobs is
``featcal.sweep_callbacks.FailedJobsReport``) is used by ``featcal/run.py``: it turns these
errors into one ``featcal: ...`` paragraph on stderr, writes ``failed.json`` into the run
folder, and keeps multirun sweeps going.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

EXIT_OK = 0
EXIT_CRASH = 1  # Hydra's own code for an uncaught exception
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3

FAILED_FILE = "failed.json"


class FeatcalError(Exception):
    """A failure the user can fix (setup, data, config), reported without a traceback.

    ``FeatcalError(reason, hint=None)``: ``reason`` says what went wrong (naming the
    model / dataset / file / key), ``hint`` what to do about it. ``str(err)`` is both.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, reason: str, hint: str | None = None):
        self.reason = str(reason)
        self.hint = hint
        self.context: list[str] = []  # "while loading ..." notes added by ``loading()``
        super().__init__(self.reason)

    def __str__(self) -> str:
        text = self.reason
        if self.context:
            text += " (" + "; ".join(self.context) + ")"
        if self.hint:
            text += ". " + self.hint if not text.rstrip().endswith((".", ":", "\n")) else " " + self.hint
        return text

    @property
    def one_line(self) -> str:
        """The reason (and context) on one line, without the advice: for tables and logs."""
        text = self.reason + (" (" + "; ".join(self.context) + ")" if self.context else "")
        return one_line(text)


class ConfigError(FeatcalError, ValueError):
    """A config value is invalid; the message lists every problem and the allowed values."""


class BudgetTooLarge(ConfigError):
    """The calibration budget (examples per task) exceeds the split a task draws it from."""


class TaskMismatch(ConfigError):
    """The task pool's tasks differ from the backbone's (one expert per task, same order)."""


class SourceUnavailable(FeatcalError, RuntimeError):
    """A model or dataset could not be found locally, fetched from the hub, or read."""


class CheckpointMismatch(SourceUnavailable):
    """A checkpoint was found and read but does not fit the architecture it is loaded as."""


class CorruptCache(FeatcalError, RuntimeError):
    """A cache entry is invalid and could not be rebuilt (e.g. the folder is read-only)."""


class ResultsNotWritten(FeatcalError, OSError):
    """A run finished but writing its results failed; ``record`` (the scores) was kept in
    ``failed.json`` or printed to stderr, so ``guard`` must not overwrite it."""

    keeps_failed_json = True

    def __init__(self, reason: str, hint: str | None = None, record: dict | None = None):
        super().__init__(reason, hint)
        self.record = record or {}


_OS_WHAT = {28: "no space left on the device", 122: "disk quota exceeded", 30: "read-only file system",
            13: "permission denied", 1: "operation not permitted"}


def _failed_path(err: OSError) -> str | None:
    """The file an ``atomic_write_*`` call was writing when ``err`` was raised (from its
    frame: a failed ``write()`` names no file)."""
    tb, path = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("atomic_write_text", "atomic_write_json") and "path" in tb.tb_frame.f_locals:
            path = str(tb.tb_frame.f_locals["path"])
        tb = tb.tb_next
    return path or (str(err.filename) if getattr(err, "filename", None) else None)


def keep_results(out_dir: Path, results: dict, write: Callable[[], Any]) -> None:
    """``write()`` the results of a finished run; if that fails with an OSError (full or
    read-only disk), keep the scores in ``<out_dir>/failed.json`` (or, failing that, print
    them to stderr as one JSON line) and raise :class:`ResultsNotWritten` saying which file
    failed, how much space is free and where the scores are."""
    try:
        write()
        return
    except OSError as err:
        failed_file = _failed_path(err) or str(out_dir)
        what = _OS_WHAT.get(err.errno or -1, err.strerror or type(err).__name__)
    free = "?"
    with contextlib.suppress(Exception):
        from featcal.utils import free_mib

        free = f"{free_mib(failed_file):.1f} MiB"
    kept = {k: results.get(k) for k in ("backbone", "merge", "calibration", "budget", "split", "seed", "tasks", "device",
                                         "primary_metric", "score", "table", "config_hash", "config")}
    reason = f"could not write {failed_file}: {what} ({free} free there)"
    record = {
        "status": "failed", "kind": "user_error", "error": "ResultsNotWritten", "reason": reason, "exit_code": EXIT_USER_ERROR,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "results": kept,
    }
    where = None
    try:
        write_failed(out_dir, {**record, "results": results})
        where = f"the scores (and all results) are in {Path(out_dir) / FAILED_FILE}"
    except Exception:  # noqa: BLE001 - the same disk: try the small record, then stderr
        try:
            write_failed(out_dir, record)
            where = f"the scores are in {Path(out_dir) / FAILED_FILE}"
        except Exception:  # noqa: BLE001
            sys.stderr.write("featcal: results (JSON): " + json.dumps(kept, default=str) + "\n")
            where = "the scores are printed above as JSON (line 'featcal: results (JSON): ...')"
    raise ResultsNotWritten(
        f"the run finished but {reason}; the per-task table is printed above and {where}",
        "Free some space (or set hydra.run.dir / hydra.sweep.dir to a writable disk) and rerun: "
        "the run is not marked complete, so resume redoes it",
        record,
    )


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace collapsed, at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Add ``what`` (e.g. "expert of task 'mnist', backbone.adapter.experts.mnist") to any
    :class:`FeatcalError` raised inside, so the message names the config key to change."""
    try:
        yield
    except FeatcalError as err:
        if what not in err.context:
            err.context.append(what)
        raise


def check_tasks(pool_tasks: list[str], backbone_tasks: list[str]) -> None:
    """Raise :class:`TaskMismatch` unless the task pool lists the backbone's tasks in order."""
    if list(pool_tasks) != list(backbone_tasks):
        raise TaskMismatch(
            f"the task pool's tasks {list(pool_tasks)} do not match the backbone's tasks {list(backbone_tasks)}",
            "Both come from the backbone config: set backbone.taskpool.tasks to ${backbone.adapter.tasks} "
            "(one expert per task, same order).",
        )


# ---------------------------------------------------------------------------
# classifying an exception that ended a run


def user_error_of(err: BaseException) -> FeatcalError | None:
    """The :class:`FeatcalError` behind ``err``: itself, or the cause of a Hydra
    ``InstantiationException`` (a constructor called by ``instantiate`` raised it)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, FeatcalError):
            return err
        if type(err).__name__ != "InstantiationException":
            return None
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def is_out_of_memory(err: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    kinds = tuple(k for k in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)) if k)
    return bool(kinds) and isinstance(err, kinds)


# stage (as named by StageTimer in run.py) -> run-level config keys that lower memory there;
# the configured calibrator adds its own keys for the calibrate stage (``memory_knobs``)
_MEMORY_KNOBS: dict[str, list[tuple[str, str]]] = {
    "load": [("precision", "bf16")],
    "merge": [("precision", "bf16")],
    "evaluate": [("eval_batch_size", "half"), ("precision", "bf16")],
    "calibration_data": [("budget.batch_size", "half")],
    "calibrate": [
        ("budget.batch_size", "half"),
        ("budget.per_task", "half"),
        ("precision", "bf16"),
    ],
}


def _stage_key(stage: str | None) -> str | None:
    if not stage:
        return None
    if stage.startswith("evaluate"):
        return "evaluate"
    return stage if stage in _MEMORY_KNOBS else None


def _calibrator_knobs(cfg: Any) -> list[tuple[str, str]]:
    """``calibration.<key>`` knobs the configured calibrator class declares (``memory_knobs``)."""
    if cfg is None:
        return []
    with contextlib.suppress(Exception):
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        target = OmegaConf.select(cfg, "calibration._target_", default=None)
        knobs = getattr(get_class(str(target)), "memory_knobs", None) if target else None
        return [(f"calibration.{key}", how) for key, how in (knobs or {}).items()]
    return []


def memory_advice(stage: str | None, cfg: Any = None) -> str:
    """Which settings lower memory in ``stage``, with their current values from ``cfg``."""
    from omegaconf import OmegaConf

    key = _stage_key(stage)
    knobs = _MEMORY_KNOBS[key] if key else [k for v in _MEMORY_KNOBS.values() for k in v]
    if key in ("calibrate", None):
        knobs = _calibrator_knobs(cfg) + knobs
    out, seen = [], set()
    for name, how in knobs:
        if name in seen:
            continue
        seen.add(name)
        current = None
        if cfg is not None:
            with contextlib.suppress(Exception):
                current = OmegaConf.select(cfg, name, default=None)
        if cfg is not None and current is None and name != "precision":
            continue  # this config has no such key (e.g. a calibrator without pass_tokens)
        if how == "bf16":
            if current in ("bf16", "fp16"):
                continue
            out.append("precision=bf16" + (f" (now {current})" if current else ""))
        elif isinstance(current, int) and not isinstance(current, bool) and current > 1:
            out.append(f"{name}={max(1, current // 2)} (now {current})")
        else:
            out.append(f"a smaller {name}" + (f" (now {current})" if current is not None else ""))
    if key == "calibrate" or key is None:
        out.append("a smaller budget (budget.per_task=8|16|32...)")
    out.append("or device=cpu")
    return "; ".join(dict.fromkeys(out))


def describe(err: BaseException, stage: str | None = None, cfg: Any = None) -> tuple[str, str, int, str]:
    """(kind, paragraph, exit code, one-line reason) for an exception that ended a run.

    kind: ``user_error`` (a FeatcalError), ``out_of_memory`` or ``crash``.
    """
    user = user_error_of(err)
    if user is not None:
        return "user_error", str(user), user.exit_code, user.one_line
    if is_out_of_memory(err):
        where = f" during stage '{stage}'" if stage else ""
        first = one_line(str(err).split("\n")[0], 200)
        reason = f"out of GPU memory{where} ({first})"
        return "out_of_memory", f"{reason}. To use less memory there, set: {memory_advice(stage, cfg)}.", EXIT_OUT_OF_MEMORY, one_line(reason)
    reason = one_line(f"{type(err).__name__}: {err}")
    return "crash", reason, EXIT_CRASH, reason


def stage_of(err: BaseException) -> str | None:
    """The run stage (StageTimer name) during which ``err`` was raised, if known."""
    return getattr(err, "featcal_stage", None)


# ---------------------------------------------------------------------------
# the task-function guard used by featcal/run.py


def debug_requested(cfg: Any = None) -> bool:
    """``debug=true`` in the config or ``HYDRA_FULL_ERROR=1`` in the environment."""
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
        return True
    if cfg is not None:
        with contextlib.suppress(Exception):
            return bool(cfg.get("debug", False))
    return False


_in_process_failures: list[dict] = []


def failures_in_this_process() -> list[dict]:
    return list(_in_process_failures)


def write_failed(out_dir: Path, record: dict) -> None:
    from featcal.utils import atomic_write_json

    atomic_write_json(Path(out_dir) / FAILED_FILE, record)


def guard(fn: Callable[[], Any], cfg: Any, out_dir: Path, multirun: bool, job: dict | None = None) -> Any:
    """Run ``fn()`` (one run) and report how it ended.

    - success: returns ``fn()``'s value; a stale ``failed.json`` in ``out_dir`` is removed.
    - FeatcalError / out of GPU memory: ``failed.json`` is written into ``out_dir``, one
      ``featcal: ...`` paragraph goes to stderr (the traceback first when
      :func:`debug_requested`), then a single run exits with the error's code
      (``SystemExit``, which Hydra passes through) while a multirun job returns None
      so the sweep goes on.
    - anything else (a crash): ``failed.json`` is written and the exception re-raised
      for Hydra to report as usual (exit code 1).
    """
    out_dir = Path(out_dir)
    with contextlib.suppress(OSError):  # (a read-only run folder: the environment check says so)
        (out_dir / FAILED_FILE).unlink()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - classified below; crashes are re-raised
        stage = stage_of(err)
        kind, paragraph, code, reason = describe(err, stage, cfg)
        job = dict(job or {})
        user = user_error_of(err)
        record = {
            "status": "failed",
            "kind": kind,
            "error": type(user or err).__name__,
            "reason": reason,
            "message": paragraph if kind != "crash" else one_line(str(err), 2000),
            "stage": stage,
            "exit_code": code,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **job,
        }
        if not getattr(user, "keeps_failed_json", False):  # ResultsNotWritten wrote its own
            with contextlib.suppress(Exception):
                write_failed(out_dir, record)
        _in_process_failures.append({**record, "run_dir": str(out_dir)})
        if kind == "crash":
            raise
        if debug_requested(cfg):
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        prefix = "featcal: "
        if multirun:  # its overrides are in Hydra's "#<num> : ..." line above
            prefix += f"job #{job.get('job_num', '?')} failed ({out_dir}): "
        tail = "" if debug_requested(cfg) else "\n(debug=true or HYDRA_FULL_ERROR=1 shows the traceback)"
        sys.stderr.write(prefix + paragraph + tail + "\n")
        sys.stderr.flush()
        if not multirun:
            raise SystemExit(code) from None
    # a multirun job that failed: the sweep goes on; free what the failed job held on
    # the GPU now that its traceback (and the frames' tensors) is gone
    if kind == "out_of_memory":
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return None


# ---------------------------------------------------------------------------
# multirun: a Hydra callback summarising failed jobs in the launching process


def failed_runs(folder: Path, since: float | None = None) -> list[dict]:
    """Every ``failed.json`` under ``folder`` (newer than ``since``, a time.time()),
    with ``run_dir`` added, skipping runs whose ``results.json`` is newer."""
    out = []
    for f in sorted(Path(folder).rglob(FAILED_FILE)):
        try:
            mtime = f.stat().st_mtime
            if since is not None and mtime < since:
                continue
            res = f.parent / "results.json"
            if res.exists() and res.stat().st_mtime > mtime:
                continue
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out.append({**data, "run_dir": str(f.parent)})
    return out


def varying_overrides(sweep_dir: Path) -> set[str]:
    """Override keys whose value differs between the jobs under ``sweep_dir`` (read from
    each job's ``.hydra/overrides.yaml``): what tells the jobs of a sweep apart."""
    import yaml

    jobs: list[dict[str, str]] = []
    for f in Path(sweep_dir).rglob("overrides.yaml"):
        if f.parent.name != ".hydra":
            continue
        try:
            items = yaml.safe_load(f.read_text()) or []
        except Exception:
            continue
        jobs.append(dict(str(item).partition("=")[::2] for item in items))
    if len(jobs) < 2:
        return set()
    keys = set().union(*jobs)
    return {k for k in keys if len({j.get(k) for j in jobs}) > 1}


def sweep_exit_code(failures: list[dict]) -> int:
    """2 when a job failed with a user error, 3 when the only failures were out of memory."""
    codes = {int(f.get("exit_code", EXIT_USER_ERROR)) for f in failures}
    if not codes:
        return EXIT_OK
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    return min(codes)


_sweep_exit: list[int] = []


def request_sweep_exit(code: int) -> None:
    """A finished multirun asks ``featcal-run`` to exit with ``code`` (the failed-jobs report,
    ``featcal.sweep_callbacks.FailedJobsReport``)."""
    _sweep_exit.append(code)


def pending_exit_code() -> int:
    """The exit code a finished multirun asked for (0: none); read by ``featcal.run.main``."""
    return max(_sweep_exit, default=EXIT_OK)
