"""Resumable runs and sweeps.

A run writes ``results.json`` last and atomically (``featcal.report.write_results``), so
its presence marks a complete run; a crashed or killed job leaves none. Each
``results.json`` stores ``config_hash``: a hash of the resolved run config without the
keys that do not change what is computed (``IGNORED_KEYS``: ``resume`` itself and the
W&B mode). Hydra's own node (output folders, launcher, sweep dir) is not part of a job's
config, so it never enters the hash.

With ``resume=true`` (the default) a run whose folder already holds a complete
``results.json`` with the same hash is skipped: it prints
``skipped: complete results for the same config in <dir>`` and returns the stored results.
A sweep is resumed by launching it again into the same folder, with the same sweep
parameters (Hydra numbers the jobs in the same order, so job N lands in ``<sweep>/N``
again)::

    featcal-run -m calibration=none,featcal budget=8,32 hydra.sweep.dir=multirun/2026-11-26/17-05-00

This works with every launcher (basic, ``hydra/launcher=local`` (joblib), ``submitit_local``,
``slurm``): the check runs inside each job. ``resume=false`` reruns everything.
``ResumeSummary`` (a Hydra callback registered in ``conf/config.yaml``) prints how many jobs
of a multirun were skipped and how many ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("featcal")

#: dotted keys left out of the hash: they do not change what a run computes
IGNORED_KEYS = ("resume", "logger.mode")
SKIP_MESSAGE = "skipped: complete results for the same config in {dir}"


def _drop(data: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def config_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the resolved config minus ``IGNORED_KEYS``."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg, default=str))
    data.pop("hydra", None)
    for key in IGNORED_KEYS:
        _drop(data, key)
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def complete_results(out_dir: Path, digest: str) -> dict[str, Any] | None:
    """The stored results of ``out_dir`` if they are complete and for the config ``digest``."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: rerun
    if not isinstance(results, dict) or results.get("config_hash") != digest or "score" not in results:
        return None
    return results


def previous_results(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """What ``run()`` calls first: the stored results to return instead of running
    (printing the skip line), or None to run. Always None with ``resume=false``."""
    if not bool(cfg.get("resume", True)):
        return None
    results = complete_results(out_dir, config_hash(cfg))
    if results is not None:
        message = SKIP_MESSAGE.format(dir=out_dir)
        print(message, flush=True)
    return results


def _snapshot(sweep_dir: Path) -> dict[str, int]:
    if not sweep_dir.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")}


try:  # Hydra callback: a summary line at the end of a multirun
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object  # type: ignore[assignment,misc]


class ResumeSummary(Callback):
    """Counts, at the end of a multirun, the jobs whose ``results.json`` was already there
    and left untouched (skipped) and those that wrote one (ran)."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._before = _snapshot(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        after = _snapshot(Path(config.hydra.sweep.dir))
        skipped = sum(1 for p, t in after.items() if self._before.get(p) == t)
        ran = len(after) - skipped
        if not bool(config.get("resume", True)):
            print(f"featcal: {ran} jobs with results in {config.hydra.sweep.dir} (resume=false)", flush=True)
        else:
            print(f"featcal: resume: {skipped} jobs skipped (complete results for the same config), "
                  f"{ran} ran, in {config.hydra.sweep.dir}", flush=True)
