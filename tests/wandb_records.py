"""Test-only: read an offline W&B run file back (config, summary, history, group) to check
what a run logged. The records come from ``featcal.wandb_runfile.read_run_file`` (which a run
uses only to verify its file; results.json records the W&B id, group, project and mode)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_offline_run(run_folder: str | os.PathLike) -> dict[str, Any]:
    """Config, summary and history of an offline W&B run folder (``offline-run-*``)."""
    from featcal.wandb_runfile import read_run_file

    folder = Path(run_folder)
    files = list(folder.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb in {folder}")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "group": None, "artifacts": [], "metrics": {}}
    for _offset, rec in read_run_file(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"] = rec.run.run_group or None
            out["job_type"] = rec.run.job_type
            out["tags"] = list(rec.run.tags)
            out["name"] = rec.run.display_name
            out["id"] = rec.run.run_id
            out["project"] = rec.run.project
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                     "files": [e.path for e in rec.artifact.manifest.contents]})
        elif kind == "metric":
            out["metrics"][rec.metric.name] = rec.metric.step_metric
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def finished_results(timings: dict | None = None, loss_curve: list | None = None) -> dict[str, Any]:
    """A finished run's results.json (two tasks, TA + FeatCal at budget 8) for logger tests."""
    from featcal.report.run_tables import per_task_table

    tasks = ["inverted", "rot90"]
    score = {"merged": {"inverted": 60.0, "rot90": 65.0, "average": 62.5},
             "calibrated": {"inverted": 80.0, "rot90": 70.0, "average": 75.0}}
    primary = {t: "accuracy" for t in tasks}
    return {"backbone": "embedded_small", "merge": "task_arithmetic", "calibration": "featcal", "budget": 8,
            "split": "train", "seed": 0, "tasks": tasks, "primary_metric": primary, "score": score,
            "metrics": {s: {t: {"accuracy": v} for t, v in d.items() if t != "average"} for s, d in score.items()},
            "table": per_task_table(tasks, score, primary), "timings": dict(timings or {}), "memory": {},
            "drift": [], "loss_curve": list(loss_curve or [])}
