"""Gather every run of a sweep into one CSV (long format) and a Markdown table.

    featcal-collect multirun/2026-11-23/16-05-00            # writes collected.csv + collected.md there
    featcal-collect multirun/... --out results/my_sweep
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

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
    try:
        df = collect(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"featcal-collect: {err}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    atomic_write_text(out / "collected.csv", df.to_csv(index=False))
    table = summary_table(df)
    rows = table.to_dict(orient="records")
    atomic_write_text(out / "collected.md", format_table(rows) + "\n")
    print(format_table(rows))
    print(f"\n{df['run_dir'].nunique()} runs -> {out / 'collected.csv'}, {out / 'collected.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
