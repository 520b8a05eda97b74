"""One run's per-task result tables: assembling, printing and writing them (atomically)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from featcal.utils import atomic_write_json, atomic_write_text

STAGES = ("base", "experts", "merged", "calibrated")


def per_task_table(tasks: list[str], score: dict[str, dict[str, float]], primary: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows: one per task plus 'average'; columns: the task's primary metric, then the
    stages that were evaluated (their primary metric values), gain and share of the gap closed."""
    stages = [s for s in STAGES if s in score]
    primary = primary or {}
    rows = []
    for task in list(tasks) + ["average"]:
        row: dict[str, Any] = {"task": task}
        if primary:
            row["metric"] = primary.get(task, average_metric_name(primary))
        for s in stages:
            row[s] = score[s].get(task)
        if "merged" in score and "calibrated" in score:
            m, c = score["merged"].get(task), score["calibrated"].get(task)
            row["gain"] = None if m is None or c is None else c - m
            e = score.get("experts", {}).get(task)
            # the fraction of the merged -> experts gap closed; only meaningful for a real gap
            if e is not None and m is not None and c is not None and e - m >= 1.0:
                row["gap_closed_%"] = 100.0 * (c - m) / (e - m)
        rows.append(row)
    return rows


def average_metric_name(primary: dict[str, str]) -> str:
    """What the 'average' row averages: the shared primary metric, or 'mean_primary'."""
    names = set(primary.values())
    return names.pop() if len(names) == 1 else "mean_primary"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into notes)."""
    if not rows:
        return "(empty)"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        for c in r:
            if c not in cols:
                cols.append(c)

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    body = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(b) for b in body])


def long_rows(
    meta: dict[str, Any],
    metrics: dict[str, dict[str, dict[str, float]]],
    score: dict[str, dict[str, float]],
    primary: dict[str, str],
) -> list[dict[str, Any]]:
    """Long format, what ``featcal-report collect`` concatenates: one row per (stage, task, metric)
    with ``primary`` marking each task's primary metric, plus per stage the 'average'
    row (mean of the primary metrics)."""
    rows = []
    for stage in STAGES:
        if stage not in metrics:
            continue
        for task, values in metrics[stage].items():
            for metric, value in values.items():
                rows.append({**meta, "stage": stage, "task": task, "metric": metric, "value": value, "primary": metric == primary.get(task)})
        if "average" in score.get(stage, {}):
            rows.append({**meta, "stage": stage, "task": "average", "metric": average_metric_name(primary), "value": score[stage]["average"], "primary": True})
    return rows


def rows_to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    cols = columns or (list(rows[0].keys()) if rows else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def write_results(out_dir: Path, results: dict[str, Any], long: list[dict[str, Any]]) -> None:
    """results.json, results.csv (long), table.md, drift.csv: each written atomically.

    results.json is written last: its presence marks a complete run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.csv", rows_to_csv(long))
    atomic_write_text(out_dir / "table.md", format_table(results["table"]) + "\n")
    if results.get("drift"):
        atomic_write_text(out_dir / "drift.csv", rows_to_csv(results["drift"]))
    atomic_write_json(out_dir / "results.json", results)
