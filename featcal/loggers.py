"""Run loggers, instantiated from the ``logger`` config group by ``_target_``.

A logger object (``hydra.utils.instantiate(cfg.logger)``; ``name`` is descriptive only)
is built before a run starts and answers:

- ``validate_config(node) -> list[str]`` (classmethod): problems with its own keys;
- ``start(run_dir, config, *, name, group, config_hash, tags, job_type) -> run | None``:
  the run's logger (``log_results(results, artifacts)``, ``finish()``, ``record()`` --
  what results.json keeps under ``record_key`` --, ``outcome()`` -- a line to print or
  None), or None when it logs nothing;
- ``needs_backfill(done, run_dir) -> bool``: a finished run (``done``: its results.json)
  whose logging failed, never happened or left a corrupt record, to be logged again from
  its results without recomputing;
- ``record_key``: the results.json key of its record (None: it records nothing).

``featcal.run`` knows no logger by name; ``conf/logger/<name>.yaml`` points at the class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class NoLogger:
    """``logger=none``: no external logging (results.json / results.csv are still written)."""

    record_key: str | None = None

    def __init__(self, **_: Any) -> None:
        pass

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        return []

    def start(self, run_dir: Path, config: dict[str, Any], **_: Any) -> None:
        return None

    def needs_backfill(self, done: dict[str, Any], run_dir: Path) -> bool:
        return False
