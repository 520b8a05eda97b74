"""Gather every run of a sweep into one CSV (long format) and a Markdown table.

    featcal-collect multirun/2026-11-23/16-05-00            # writes collected.csv + collected.md there
    featcal-collect multirun/... --out results/my_sweep

Jobs that failed (their run folder holds ``failed.json`` instead of ``results.json``,
see featcal/errors.py) are listed with their one-line reason: on stdout, in a
"Failed jobs" section of collected.md, and in failed.csv.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from featcal.errors import failed_runs, varying_overrides
from featcal.report import format_table
from featcal.utils import atomic_write_text

KEYS = ["backbone", "merge", "calibration", "budget", "split", "seed"]


def collect(sweep_dir: Path) -> pd.DataFrame:
    """Long table of every complete run under ``sweep_dir`` (runs without results.json are skipped)."""
    frames = []
    for res in sorted(sweep_dir.rglob("results.json")):
        csv = res.parent / "results.csv"
        if not csv.exists():
            continue
        df = pd.read_csv(csv)
        data = json.loads(res.read_text())
        df["calibrate_seconds"] = data.get("timings", {}).get("calibrate")
        df["peak_rss_mib"] = data.get("memory", {}).get("peak_rss_mib")
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
    primary metric) plus the average."""
    sub = df[df["stage"].isin(["experts", "merged", "calibrated"]) & df["primary"].astype(bool)]
    index = [k for k in KEYS if k in sub.columns] + ["stage"]
    wide = sub.pivot_table(index=index, columns="task", values="value", aggfunc="mean")
    tasks = [c for c in wide.columns if c != "average"] + (["average"] if "average" in wide.columns else [])
    wide = wide[tasks].reset_index()
    extra = sub.groupby(index)[["calibrate_seconds", "peak_rss_mib"]].first().reset_index()
    return wide.merge(extra, on=index, how="left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featcal-collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder holding run folders)")
    parser.add_argument("--out", type=Path, default=None, help="folder for collected.csv / collected.md (default: sweep_dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"featcal-collect: no such folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    failed = failed_table(args.sweep_dir)
    failed_md = ""
    if failed:
        escaped = [{k: str(v).replace("|", "\\|") for k, v in row.items()} for row in failed]
        failed_md = f"\n## Failed jobs ({len(failed)})\n\n" + format_table(escaped) + "\n"
        atomic_write_text(out / "failed.csv", pd.DataFrame(failed).to_csv(index=False))
    try:
        df = collect(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"featcal-collect: {err}", file=sys.stderr)
        if failed:
            atomic_write_text(out / "collected.md", failed_md.lstrip("\n"))
            print(failed_md.strip())
            print(f"\n0 runs, {len(failed)} failed -> {out / 'failed.csv'}, {out / 'collected.md'}")
        return 2
    atomic_write_text(out / "collected.csv", df.to_csv(index=False))
    table = summary_table(df)
    rows = table.to_dict(orient="records")
    atomic_write_text(out / "collected.md", format_table(rows) + "\n" + failed_md)
    print(format_table(rows))
    if failed:
        print("\n" + failed_md.strip())
    files = [out / "collected.csv", out / "collected.md"] + ([out / "failed.csv"] if failed else [])
    done = f"{df['run_dir'].nunique()} runs" + (f", {len(failed)} failed" if failed else "")
    print(f"\n{done} -> {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
