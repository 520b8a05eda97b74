"""A sweep report logged to W&B: the figures and the sweep table as the sweep group's one
report run (``job_type=report``, the same id on every call)."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

def report_run_id(group: str) -> str:
    """The W&B id of a sweep's report run: the same for every featcal-report of that group,
    so a new report updates its run instead of adding one."""
    return "report-" + hashlib.sha256(group.encode()).hexdigest()[:12]


def log_to_wandb(info: dict[str, Any], figures: list[Path], table: pd.DataFrame, out: Path) -> str | None:
    """Log the figures and the sweep table as the sweep's one report run (``job_type=report``)
    in the W&B group, project and mode its runs recorded in their results.json. Returns the
    W&B run folder, or None when the sweep did not log to W&B."""
    groups = sorted(info["groups"])
    if not groups:
        return None
    logger = info.get("logger") or {}
    mode = str(logger.get("mode") or "offline")
    if mode == "disabled":
        return None
    import wandb

    from featcal.wandb_runfile import check_offline_run, remove_offline_runs

    run_id = report_run_id(groups[0])
    if mode == "offline":  # the previous report of this sweep, not synced: replaced, not doubled
        remove_offline_runs(out, run_id)
    run = wandb.init(
        project=logger.get("project") or "featcal", entity=logger.get("entity"), group=groups[0], id=run_id, resume="allow",
        name=f"report {groups[0]}", job_type="report", mode=mode, dir=str(out), reinit="finish_previous",
        config={"groups": groups}, tags=["report"],
    )
    try:
        payload: dict[str, Any] = {f"report/{p.stem}": wandb.Image(str(p)) for p in figures}
        clean = table.drop(columns=["kind"], errors="ignore").astype(object).where(table.notna(), None)
        payload["report/sweep_table"] = wandb.Table(dataframe=clean)
        run.log(payload)
        folder = getattr(run, "dir", None)
    finally:
        run.finish()
        with contextlib.suppress(Exception):
            wandb.teardown()  # the offline run file is complete once W&B's service stops
    if mode == "offline" and folder:  # a full disk truncates the file without an error
        problem = check_offline_run(Path(folder).parent)
        if problem:
            raise RuntimeError(f"the offline report run is corrupt or incomplete: {problem}")
    return folder

