"""``featcal-report collect``: every run of a sweep in one CSV (long format) and a Markdown table.

    featcal-report collect multirun/2026-11-23/16-05-00     # writes collected.csv + collected.md there
    featcal-report collect multirun/... --out results/my_sweep

Every job folder is accounted for (``featcal.report.scan.scan_sweep``): complete runs are collected; a job
folder holding a Hydra config (``.hydra/config.yaml``) but no complete ``results.json`` is
listed as **incomplete** with its status -- ``failed`` (its ``failed.json`` gives the
one-line reason, see featcal/errors.py), ``running`` (its ``.featcal.lock`` is held by a
live process on this host) or ``killed or crashed`` -- and its overrides; an unreadable
``results.json`` is listed with the file and the parse error, and everything readable is
still collected. They appear on stdout (one line per job containing ``incomplete``), in
sections of collected.md, and in failed.csv / incomplete.csv.

Rows are keyed by the whole configuration (``featcal.report.config_keys``): ``config_id`` hashes the resolved config
without the seed and the presentation keys (``config_key``), ``config`` holds it as JSON;
the summary table shows every config key that differs between runs of one backbone x
merge x calibration as a column or in the method label (``featcal (rho=1.0, alpha=0)``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from featcal.errors import failed_runs, varying_overrides
from featcal.report.config_keys import config_id, config_key, label_configurations
from featcal.report.run_tables import format_table
from featcal.report.scan import Sweep, scan_sweep
from featcal.utils import atomic_write_text

KEYS = ["backbone", "merge", "calibration", "budget", "split", "seed"]


def collect(sweep_dir: Path, sweep: Sweep | None = None) -> pd.DataFrame:
    """Long table of every complete run under ``sweep_dir`` (incomplete and unreadable jobs
    are left out here; ``scan_sweep`` lists them)."""
    sweep = sweep or scan_sweep(sweep_dir)
    frames = []
    for folder, data in sweep.complete:
        csv = folder / "results.csv"
        if not csv.exists():
            continue
        try:
            df = pd.read_csv(csv)
        except Exception:  # an unreadable CSV beside a good results.json: skip it, say so
            sweep.unreadable.append({"run": folder.name, "run_dir": str(folder), "path": str(csv), "error": "unreadable results.csv"})
            continue
        memory = data.get("memory") or {}
        key = config_key(data)
        df["n_tasks"] = len(data.get("tasks") or [])
        df["calibrate_seconds"] = (data.get("timings") or {}).get("calibrate")
        df["merge_seconds"] = (data.get("timings") or {}).get("merge")
        df["peak_rss_mib"] = memory.get("peak_rss_mib")
        df["cuda_peak_mib"] = memory.get("cuda_peak_mib")
        df["rss_above_start_mib"] = memory.get("peak_rss_above_baseline_mib")
        df["config_id"] = config_id(key)
        df["config"] = json.dumps(key)  # config order (labels follow it)
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no completed runs (results.json) under {sweep_dir}")
    return pd.concat(frames, ignore_index=True)


def failed_table(sweep_dir: Path) -> list[dict]:
    """One row per failed job under ``sweep_dir``: run folder, the overrides that set it
    apart from the other jobs, stage, error class and one-line reason."""
    sweep_dir = Path(sweep_dir)
    varying = varying_overrides(sweep_dir)
    rows = []
    for f in failed_runs(sweep_dir):
        overrides = [str(o) for o in f.get("overrides") or []]
        shown = [o for o in overrides if o.split("=", 1)[0] in varying] if varying else overrides
        try:
            run = str(Path(f["run_dir"]).relative_to(sweep_dir))
        except ValueError:
            run = f["run_dir"]
        rows.append({
            "run": run,
            "status": {"crash": "crashed", "out_of_memory": "out of memory"}.get(f.get("kind"), "failed"),
            "overrides": " ".join(shown),
            "stage": f.get("stage") or "",
            "error": f.get("error", ""),
            "reason": f.get("reason", ""),
        })
    return rows


def metric_column(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The rows of one metric with its values in a column named after it (long CSVs
    since the ``metric``/``value`` columns; older CSVs that carry an ``accuracy``
    column pass through)."""
    if "metric" not in df.columns:
        return df
    out = df[df["metric"] == metric].copy()
    out[metric] = out["value"]
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage (experts / merged / calibrated), one column per task (its
    primary metric) plus the average. With a ``config`` column (``collect``'s), the
    config keys that differ between runs of one backbone x merge x calibration show in the
    labels and as columns, and runs are never merged unless they share run folder."""
    sub = df[df["stage"].isin(["experts", "merged", "calibrated"]) & df["primary"].astype(str).str.lower().isin(("true", "1"))].copy()
    extra_cols: list[str] = []
    if "config" in sub.columns and "run_dir" in sub.columns:
        per_run = sub.drop_duplicates("run_dir")
        keys = [json.loads(c) if isinstance(c, str) else {} for c in per_run["config"]]
        meta = per_run[["run_dir", "backbone", "merge", "calibration"]].copy()
        meta["n_tasks"] = per_run["n_tasks"].to_numpy() if "n_tasks" in per_run else 0
        labelled = label_configurations(meta.reset_index(drop=True), keys)
        extra_cols = labelled.attrs["config_columns"]
        lab = labelled[["run_dir", "merge_label", "calibration_label", *extra_cols]]
        sub = sub.merge(lab, on="run_dir", how="left")
        sub["merge"], sub["calibration"] = sub["merge_label"], sub["calibration_label"]
    index = [k for k in KEYS if k in sub.columns] + extra_cols + (["run_dir"] if "run_dir" in sub.columns else []) + ["stage"]
    for c in index:
        sub[c] = sub[c].astype(str)
    wide = sub.pivot_table(index=index, columns="task", values="value", aggfunc="first")
    tasks = [c for c in wide.columns if c != "average"] + (["average"] if "average" in wide.columns else [])
    wide = wide[tasks].reset_index()
    cost = [c for c in ("calibrate_seconds", "peak_rss_mib") if c in sub.columns]
    if cost:
        extra = sub.groupby(index)[cost].first().reset_index()
        wide = wide.merge(extra, on=index, how="left")
    if "run_dir" in wide.columns:
        wide["run"] = wide["run_dir"].map(lambda p: Path(p).name)
        wide = wide.drop(columns=["run_dir"])
        wide = wide[["run"] + [c for c in wide.columns if c != "run"]]
    return wide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featcal-report collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder holding run folders)")
    parser.add_argument("--out", type=Path, default=None, help="folder for collected.csv / collected.md (default: sweep_dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"featcal-report collect: no such folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    sweep = scan_sweep(args.sweep_dir)
    failed = failed_table(args.sweep_dir)
    failed_md = ""
    if failed:
        atomic_write_text(out / "failed.csv", pd.DataFrame(failed).to_csv(index=False))
    try:
        df = collect(args.sweep_dir, sweep)
    except FileNotFoundError as err:
        df = None
        print(f"featcal-report collect: {err}", file=sys.stderr)
    incomplete_md = sweep.markdown()
    if sweep.incomplete or sweep.unreadable:
        rows = [{"kind": "incomplete", **j} for j in sweep.incomplete] + [{"kind": "unreadable", **u} for u in sweep.unreadable]
        atomic_write_text(out / "incomplete.csv", pd.DataFrame(rows).to_csv(index=False))
    if failed:
        escaped = [{k: str(v).replace("|", "\\|") for k, v in row.items()} for row in failed]
        failed_md = f"\n## Failed jobs ({len(failed)})\n\n" + format_table(escaped) + "\n"
    notes = "\n".join(sweep.lines())
    n_inc = sum(1 for j in sweep.incomplete if j["status"] != "failed")
    tail = (f", {len(failed)} failed" if failed else "") + (f", {n_inc} incomplete (killed, crashed or running)" if n_inc else "") + \
        (f", {len(sweep.unreadable)} unreadable" if sweep.unreadable else "")
    if df is None:
        atomic_write_text(out / "collected.md", (incomplete_md + failed_md).lstrip("\n") or "(no runs)\n")
        if notes:
            print(notes)
        print(f"\n0 runs{tail} -> {out / 'collected.md'}")
        return 2
    atomic_write_text(out / "collected.csv", df.to_csv(index=False))
    table = summary_table(df)
    rows = table.to_dict(orient="records")
    atomic_write_text(out / "collected.md", format_table(rows) + "\n" + ("\n" + incomplete_md if incomplete_md else "") + failed_md)
    print(format_table(rows))
    if notes:
        print("\n" + notes)
    if failed:
        print("\n" + failed_md.strip())
    files = [out / "collected.csv", out / "collected.md"] + ([out / "failed.csv"] if failed else []) + \
        ([out / "incomplete.csv"] if sweep.incomplete or sweep.unreadable else [])
    print(f"\n{df['run_dir'].nunique()} runs{tail} -> {', '.join(map(str, files))}")
    return 0

