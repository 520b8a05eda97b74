"""Hydra callbacks of a multirun that report on the whole sweep when it ends.

``FailedJobsReport`` (``hydra.callbacks.failed_jobs_report`` in conf/config.yaml) lists the
jobs that failed; ``featcal.resume.ResumeSummary`` (``hydra.callbacks.resume_summary``)
counts the jobs skipped by resume and run. The sweep's tables are ``featcal-report``'s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from featcal.errors import FAILED_FILE, failed_runs, request_sweep_exit, sweep_exit_code, varying_overrides

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[misc,assignment]


class FailedJobsReport(_HydraCallback):  # type: ignore[misc]
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): at the end of a multirun it
    lists the jobs that failed with a user error (from their ``failed.json``, whichever
    launcher ran them) and makes ``featcal-run`` exit with code 2 (3: out of memory only)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time() - 1.0

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:  # pragma: no cover
            return
        failures = failed_runs(sweep_dir, since=self.started) if sweep_dir.is_dir() else []
        if not failures:
            return
        lines = [f"featcal: {len(failures)} job(s) of the sweep in {sweep_dir} failed; the others finished:"]
        varying = varying_overrides(sweep_dir)
        for f in failures:
            shown = [o for o in f.get("overrides") or [] if o.split("=", 1)[0] in varying] if varying else f.get("overrides") or []
            lines.append(f"  - #{Path(f['run_dir']).name} [{' '.join(shown)}]: {f.get('error')}: {f.get('reason')}")
        lines.append(f"Details in each job's {FAILED_FILE}; `featcal-report collect {sweep_dir}` lists them with the results.")
        sys.stderr.write("\n".join(lines) + "\n")
        request_sweep_exit(sweep_exit_code(failures))
