"""A Hydra sweeper that never launches the same job twice.

Hydra's basic sweeper runs the full cross product of the swept values. Some cells are the
same job: ``calibration=none`` with a data-free merge reads no calibration data, so
``budget.per_task=8,32,256`` gives three identical runs. ``DedupSweeper`` composes each
job's config (as Hydra's own batch validation does), and two jobs are the same when their
configs are equal once the ``budget`` node is left out of jobs that read no calibration
data (neither the merge nor the calibrator declares ``needs_calibration_data``). Only the
first of each group runs; the others are listed in the log. Reports already show a
calibration-free row once (``featcal.report.sweep_tables.method_rows``).

Presets select it with ``hydra.sweeper._target_: hydra_plugins.featcal_sweeper.DedupSweeper``
(Hydra instantiates sweepers from its ``hydra_plugins`` namespace only: the plugin is
``hydra_plugins/featcal_sweeper``, packaged with featcal like the SLURM launcher).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def reads_calibration_data(cfg: DictConfig) -> bool:
    """Whether the job's merge or calibrator reads the calibration set (its budget)."""
    from featcal.run import _build, needs_calibration_data

    try:
        merge_fn = _build(cfg.merge)
        calibrator = _build(cfg.calibration)
    except Exception:  # noqa: BLE001 - cannot tell: treat every budget as its own job
        return True
    return bool(needs_calibration_data(merge_fn) or getattr(calibrator, "needs_calibration_data", True))


def job_identity(cfg: DictConfig) -> str:
    """A job's effective configuration (without ``hydra`` and, when unread, ``budget``)."""
    keep = [k for k in cfg if k != "hydra"]
    if not reads_calibration_data(cfg):
        keep = [k for k in keep if k != "budget"]
    data = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    return json.dumps(data, sort_keys=True, default=str)


def unique_jobs(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig]) -> tuple[list, list]:
    """(jobs to run, [(skipped job, the job it equals)]) in the original order."""
    seen: dict[str, Sequence[str]] = {}
    keep, dropped = [], []
    for job in jobs:
        try:
            ident = job_identity(compose(list(job)))
        except Exception:  # noqa: BLE001 - composition errors surface when the job runs
            keep.append(job)
            continue
        if ident in seen:
            dropped.append((job, seen[ident]))
        else:
            seen[ident] = job
            keep.append(job)
    return keep, dropped


def log_dropped(dropped: list, total: int) -> None:
    for job, same in dropped:
        log.info("skipping %s: the same job as %s", " ".join(job), " ".join(same))
    if dropped:
        log.info("%d of %d jobs are identical to another job of the sweep and are not launched", len(dropped), total)

