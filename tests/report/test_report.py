"""Metric names flow unchanged from a task pool's evaluate into the long CSV, the table
and featcal-report collect (a pool with a non-accuracy primary metric, as text-to-text tasks have)."""
import pandas as pd
import pytest

from featcal.report.collect import metric_column, summary_table
from featcal.report.run_tables import long_rows, per_task_table, rows_to_csv
from featcal.tasks.base import scores


class _Pool:
    def primary_metric(self, task):
        return {"stsb": "spearman", "rte": "accuracy"}[task]


METRICS = {
    "merged": {"stsb": {"spearman": 40.0, "pearson": 42.0}, "rte": {"accuracy": 55.0}},
    "calibrated": {"stsb": {"spearman": 60.0, "pearson": 61.0}, "rte": {"accuracy": 65.0}},
}


def test_scores_average_each_tasks_primary_metric():
    s = scores(METRICS["merged"], _Pool())
    assert s == {"stsb": 40.0, "rte": 55.0, "average": pytest.approx(47.5)}


def test_long_rows_table_and_collect_keep_metric_names(tmp_path):
    pool = _Pool()
    primary = {t: pool.primary_metric(t) for t in ("stsb", "rte")}
    score = {stage: scores(m, pool) for stage, m in METRICS.items()}
    rows = long_rows({"run_dir": "r", "backbone": "b", "merge": "m", "calibration": "c", "budget": 8, "split": "train", "seed": 0}, METRICS, score, primary)
    df = pd.read_csv(pd.io.common.StringIO(rows_to_csv(rows)))
    stsb = df[(df.stage == "calibrated") & (df.task == "stsb")].set_index("metric")
    assert stsb.loc["spearman", "value"] == 60.0 and bool(stsb.loc["spearman", "primary"])
    assert stsb.loc["pearson", "value"] == 61.0 and not bool(stsb.loc["pearson", "primary"])
    avg = df[(df.stage == "calibrated") & (df.task == "average")]
    assert avg.metric.item() == "mean_primary" and avg.value.item() == pytest.approx(62.5)
    # the table shows each task's primary metric and gains on it
    table = {r["task"]: r for r in per_task_table(["stsb", "rte"], score, primary)}
    assert table["stsb"]["metric"] == "spearman" and table["stsb"]["gain"] == pytest.approx(20.0)
    # featcal-report collect pivots the primary metric only
    wide = summary_table(df.assign(calibrate_seconds=1.0, peak_rss_mib=1.0))
    cal = wide[wide.stage == "calibrated"].iloc[0]
    assert cal["stsb"] == 60.0 and cal["rte"] == 65.0 and cal["average"] == pytest.approx(62.5)
    # experiment scripts read one metric by name
    acc = metric_column(df, "accuracy")
    assert set(acc.task) == {"rte"} and list(acc["accuracy"]) == list(acc["value"])


def test_report_of_a_long_csv_without_average_rows(tmp_path):
    """A long CSV that lists tasks but no per-stage ``average`` row (written by hand or by
    another tool) is reported per task: no average column is invented, every task's value is
    the CSV's, and nothing crashes (it raised KeyError('average') before)."""
    from featcal.report.sweep import report

    tasks = ["a", "b", "c"]
    rows = []
    for i, t in enumerate(tasks):
        for stage, value in (("merged", 60.0 + i), ("calibrated", 70.0 + i), ("experts", 90.0 + i)):
            rows.append({"run_dir": "r0", "backbone": "toy", "merge": "task_arithmetic", "calibration": "featcal",
                         "budget": 32, "task": t, "stage": stage, "accuracy": value})
    csv = tmp_path / "long.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    report([csv], tmp_path / "out", use_wandb=False)
    table = (tmp_path / "out" / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| merge"))
    assert [c.strip() for c in header.strip("|").split("|")][3:6] == tasks
    assert "average" not in header
    calibrated = next(line for line in table.splitlines() if "| featcal" in line)
    assert [c.strip() for c in calibrated.strip("|").split("|")][3:6] == ["70.00", "71.00", "72.00"]
