"""``featcal-report table``: per-task table of TA vs TA + each calibrator at several budgets,
from a collected sweep.

    featcal-run experiment=embedded_table                   # the sweep (12 runs)
    featcal-report collect multirun/<date>/<time>           # -> collected.csv
    featcal-report table multirun/<date>/<time>/collected.csv --out results/embedded_calibration.md

For every budget: the merged model (TA), each calibrated model, the experts, and the
fraction of the TA -> experts gap that each calibrator closes (on the average).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from featcal.report.collect import metric_column
from featcal.report.run_tables import format_table
from featcal.utils import atomic_write_text

ORDER = ["featcal", "surgery", "probsurgery"]


def check_one_configuration(df: pd.DataFrame) -> None:
    """This table has one cell per calibrator and budget: refuse a sweep holding several
    configurations (an ablation, two builds, two seeds) of one calibrator and budget rather
    than averaging them (ValueError); featcal-report keys its rows by the whole configuration."""
    if "config_id" not in df.columns:  # a CSV from before collect recorded it
        return
    per_cell = df.groupby(["merge", "calibration", "budget"])["config_id"].nunique()
    runs = df.groupby(["merge", "calibration", "budget"])["run_dir"].nunique()
    mixed = sorted(set(per_cell[per_cell > 1].index) | set(runs[runs > 1].index))
    if mixed:
        raise ValueError("several runs for " + ", ".join(f"{m}+{c} at budget {b}" for m, c, b in mixed)
                         + " (other settings, builds or seeds); this table would average them. "
                         "Use `featcal-report <sweep>`, whose rows are keyed by the whole configuration.")


def build(df: pd.DataFrame) -> str:
    check_one_configuration(df)
    df = metric_column(df, "accuracy")
    tasks = [t for t in dict.fromkeys(df["task"]) if t != "average"] + ["average"]
    experts = df[df.stage == "experts"].groupby("task")["accuracy"].mean()
    merged = df[df.stage == "merged"].groupby("task")["accuracy"].mean()
    lines = [
        "# Embedded benchmark: TA vs TA + calibrators",
        "",
        f"Backbone `{df['backbone'].iloc[0]}`, merge `{df['merge'].iloc[0]}`; top-1 test accuracy (%), "
        "calibration examples drawn from each task's train split (seed 0).",
        "",
    ]
    summary = []
    for budget in sorted(df["budget"].unique()):
        sub = df[df.budget == budget]
        rows = []
        for task in tasks:
            row = {"task": task, "TA": merged.get(task)}
            for cal in ORDER:
                sel = sub[(sub.calibration == cal) & (sub.stage == "calibrated") & (sub.task == task)]
                if len(sel):
                    row[f"TA+{cal}"] = sel["accuracy"].mean()
            row["experts"] = experts.get(task)
            rows.append(row)
        lines += [f"## budget {budget} per task", "", format_table(rows), ""]
        avg = rows[-1]
        gap = avg["experts"] - avg["TA"]
        entry = {"budget": int(budget), "TA": avg["TA"]}
        for cal in ORDER:
            if f"TA+{cal}" in avg:
                entry[f"TA+{cal}"] = avg[f"TA+{cal}"]
                entry[f"{cal} gap closed %"] = 100.0 * (avg[f"TA+{cal}"] - avg["TA"]) / gap
        entry["experts"] = avg["experts"]
        summary.append(entry)
        for cal in ORDER:
            secs = sub[(sub.calibration == cal)]["calibrate_seconds"]
            if len(secs):
                entry[f"{cal} s"] = float(secs.iloc[0])
    lines = lines[:4] + ["## Averages and share of the TA -> experts gap closed", "", format_table(summary), ""] + lines[4:]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``featcal-report table <collected.csv> [--out FILE]``."""
    p = argparse.ArgumentParser(prog="featcal-report table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("collected", type=Path, help="long CSV from featcal-report collect")
    p.add_argument("--out", type=Path, default=Path("results/embedded_calibration.md"))
    args = p.parse_args(argv)
    try:
        text = build(pd.read_csv(args.collected))
    except (FileNotFoundError, ValueError) as err:
        print(f"featcal-report table: {err}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, text)
    print(text)
    return 0
