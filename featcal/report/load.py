"""Reading a sweep for the report: sweep folders (every job folder below them,
``featcal.report.scan.scan_sweep``) or ``featcal-report collect`` CSVs, into long score rows,
one row per run and drift rows."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from featcal.report.config_keys import config_key, label_configurations
from featcal.report.scan import scan_sweep
from featcal.report.sweep_tables import AVERAGE
from featcal.wandb_runfile import offline_run_problems

META = ("run_dir", "backbone", "merge", "calibration", "budget", "seed", "n_tasks")


def _memory(memory: dict[str, Any]) -> tuple[float | None, str]:
    cuda = memory.get("cuda_peak_mib")
    if cuda:
        return cuda, "CUDA peak of the run"
    if memory.get("peak_rss_above_baseline_mib") is not None:
        # what the run itself added: in a sweep sharing a process (basic launcher, joblib
        # workers) the RSS at a job's start still holds what earlier jobs left behind
        return memory["peak_rss_above_baseline_mib"], "peak host RSS of the run above its start"
    # results written before per-run sampling: the process's lifetime ru_maxrss
    return memory.get("peak_rss_mib"), "peak host RSS of the process (older results: whole process lifetime)"


def _run_record(results: dict[str, Any], run_dir: str) -> dict[str, Any]:
    timings = results.get("timings") or {}
    peak, kind = _memory(results.get("memory") or {})
    return {
        "run_dir": run_dir,
        "backbone": results.get("backbone"),
        "merge": results.get("merge"),
        "calibration": results.get("calibration"),
        "budget": int(results.get("budget", 0)) if str(results.get("budget", 0)).isdigit() else results.get("budget"),
        "seed": results.get("seed"),
        "n_tasks": len(results.get("tasks") or []),
        "calibrate_s": timings.get("calibrate"),
        "merge_s": timings.get("merge"),
        "peak_mib": peak,
        "memory_kind": kind,
        "group": None,
        "mtime": 0.0,
    }


class _Rows:
    """What ``load`` gathers, run by run, in the order the inputs give them."""

    def __init__(self) -> None:
        self.long: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.keys: list[dict[str, str]] = []
        self.drift: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {"groups": set(), "logger": {}, "metrics": set(), "sweeps": [], "duplicates": [], "wandb_problems": []}

    def add_results(self, results: dict[str, Any], run_dir: Path) -> None:
        """One complete run from its results.json."""
        info = self.info
        rec = _run_record(results, str(run_dir))
        with contextlib.suppress(OSError):
            rec["mtime"] = (Path(run_dir) / "results.json").stat().st_mtime
        wb = results.get("wandb") or {}
        if isinstance(wb, dict) and wb.get("group") and wb.get("mode") not in (None, "disabled"):
            rec["group"] = wb["group"]
            info["groups"].add(wb["group"])
            info["logger"] = info["logger"] or {k: wb.get(k) for k in ("project", "entity", "mode")}
        if isinstance(wb, dict) and wb.get("mode") == "offline":  # a truncated or killed run file is not a success
            info["wandb_problems"] += offline_run_problems(run_dir)
        self.runs.append(rec)
        self.keys.append(config_key(results))
        meta = {k: rec[k] for k in META}
        info["metrics"].update((results.get("primary_metric") or {"": "accuracy"}).values())
        # each task's primary metric (accuracy for classification pools) and their average
        score = results.get("score") or results.get("accuracy") or {}
        for stage, per_task in score.items():
            for task, value in per_task.items():
                self.long.append({**meta, "stage": stage, "task": task, "accuracy": float(value)})
        for row in results.get("drift") or []:
            self.drift.append({**meta, **row})

    def add_csv(self, path: Path) -> None:
        """The runs of a collected CSV (each run's results.json instead where it still exists)."""
        df = pd.read_csv(path)
        need = {"run_dir", "backbone", "merge", "calibration", "budget", "stage", "task"}
        if need - set(df.columns):
            raise ValueError(f"{path} lacks columns {sorted(need - set(df.columns))} (a featcal-report collect CSV has them)")
        if "metric" in df.columns:  # one row per (stage, task, metric): keep each task's primary metric
            df = df[df["primary"].astype(str).str.lower().isin(("true", "1"))].copy()
            self.info["metrics"].update(df.loc[df["task"] != AVERAGE, "metric"])
            df["accuracy"] = df["value"]
        else:
            self.info["metrics"].add("accuracy")
        for run_dir, g in df.groupby("run_dir", sort=False):
            res = Path(str(run_dir)) / "results.json"
            if res.is_file():
                with contextlib.suppress(OSError, ValueError):
                    self.add_results(json.loads(res.read_text()), res.parent)
                    continue
            rec = _csv_record(str(run_dir), g)
            self.runs.append(rec)
            raw = g.iloc[0].get("config")
            self.keys.append(json.loads(raw) if isinstance(raw, str) else {})
            for _, r in g.iterrows():
                self.long.append({**{k: rec[k] for k in META}, "stage": r["stage"], "task": r["task"], "accuracy": float(r["accuracy"])})


def _csv_record(run_dir: str, g: pd.DataFrame) -> dict[str, Any]:
    """One run's record from its rows of a collected CSV (no results.json left to read)."""
    first = g.iloc[0]
    tasks = sorted(set(g["task"]) - {AVERAGE})
    cuda = first.get("cuda_peak_mib")
    has_cuda = cuda is not None and not pd.isna(cuda) and float(cuda) > 0
    own = first.get("rss_above_start_mib")
    scope = "run" if own is not None and not pd.isna(own) else "process"
    return {
        "run_dir": run_dir, "backbone": first["backbone"], "merge": first["merge"],
        "calibration": first["calibration"], "budget": int(first["budget"]), "seed": first.get("seed"),
        "n_tasks": len(tasks), "calibrate_s": first.get("calibrate_seconds"), "merge_s": first.get("merge_seconds"),
        "peak_mib": float(cuda) if has_cuda else (float(own) if scope == "run" else first.get("peak_rss_mib")),
        "memory_kind": "CUDA peak of the run" if has_cuda else (
            "peak host RSS of the run above its start" if scope == "run" else "peak host RSS of the process (older results: whole process lifetime)"),
        "group": None, "mtime": 0.0,
    }


def _keep_newest(runs_df: pd.DataFrame, info: dict[str, Any]) -> pd.DataFrame:
    """The same configuration and seed more than once (two sweeps, a rerun): keep the newest,
    list both in ``info["duplicates"]``."""
    cfg_cols = list(runs_df.attrs["config_columns"])
    keep = pd.Series(True, index=runs_df.index)
    for (_cid, seed), g in runs_df.groupby(["config_id", "seed"], dropna=False, sort=False):
        if len(g) > 1:
            newest = g["mtime"].idxmax()
            keep[g.index.difference([newest])] = False
            info["duplicates"].append({"label": f"{g['merge_label'].iloc[0]} + {g['calibration_label'].iloc[0]}, budget {g['budget'].iloc[0]}, seed {seed}",
                                       "kept": g.loc[newest, "run_dir"], "dropped": list(g.loc[g.index != newest, "run_dir"])})
    runs_df = runs_df[keep].reset_index(drop=True)
    runs_df.attrs["config_columns"] = cfg_cols
    return runs_df


def load(inputs: Iterable[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(long accuracy rows, one row per run, drift rows, info) from sweep folders (every
    job folder below them, ``featcal.report.scan.scan_sweep``) or ``featcal-report collect``
    CSVs (their run folders' ``results.json`` are read too when they still exist).

    Runs are labelled by their whole configuration (``featcal.report.config_keys.label_configurations``:
    ``merge_label``, ``calibration_label``, ``config_id`` and a column per other differing
    config key); of two runs with the same configuration and seed only the newest is kept and
    both are listed in ``info["duplicates"]``. ``info`` also holds the W&B group, project and
    mode the runs recorded in their results.json, the incomplete jobs and unreadable files."""
    rows = _Rows()
    for path in inputs:
        path = Path(path)
        if path.is_dir():
            sweep = scan_sweep(path)
            rows.info["sweeps"].append(sweep)
            for folder, results in sweep.complete:
                rows.add_results(results, folder)
        elif path.suffix == ".csv" and path.is_file():
            rows.add_csv(path)
        else:
            raise FileNotFoundError(f"{path}: neither a sweep folder nor a CSV file")
    if not rows.runs:
        raise FileNotFoundError("no complete runs (results.json) in " + ", ".join(map(str, inputs)))
    runs_df = _keep_newest(label_configurations(pd.DataFrame(rows.runs), rows.keys), rows.info)
    cfg_cols = list(runs_df.attrs["config_columns"])
    labels = runs_df[["run_dir", "merge_label", "calibration_label", "config_id", *cfg_cols]]
    long_df = pd.DataFrame(rows.long).merge(labels, on="run_dir", how="inner")
    drift_df = pd.DataFrame(rows.drift)
    if len(drift_df):
        drift_df = drift_df.merge(labels, on="run_dir", how="inner")
    return long_df, runs_df, drift_df, rows.info
