"""The figures of a sweep report: accuracy against the calibration budget, calibration
cost, FeatCal's per-block drift and scaling with the number of merged tasks (PNG, matplotlib
Agg)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featcal.report.sweep_tables import AVERAGE, CAL_ORDER, MERGE_ORDER, config_columns, line_label, varies


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def _panels(runs: pd.DataFrame) -> list[tuple[str, int, str]]:
    first = runs.drop_duplicates(["backbone", "n_tasks", "merge_label"])
    order = sorted(zip(first["backbone"], first["n_tasks"], first["merge_label"], first["merge"]),
                   key=lambda p: (str(p[0]), p[1], MERGE_ORDER.get(p[3], 9), p[2]))
    return [p[:3] for p in order]


def _with_lines(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    cfg_cols = config_columns(runs)
    lines = runs[["run_dir"]].copy()
    lines["line"] = [line_label(r, cfg_cols) for _, r in runs.iterrows()]
    return df.merge(lines, on="run_dir", how="inner")


def _avg(long: pd.DataFrame, runs: pd.DataFrame, stage: str, by: tuple[str, ...] = ("backbone", "n_tasks", "merge_label", "calibration", "line", "budget")) -> pd.DataFrame:
    """Average score per configuration line and budget over seeds: mean, std (NaN for one seed), n."""
    sub = _with_lines(long[(long["stage"] == stage) & (long["task"] == AVERAGE)], runs)
    return sub.groupby(list(by), as_index=False, dropna=False)["accuracy"].agg(accuracy="mean", std="std", n="size")


def _line(ax, x, y, std, n, **kw) -> None:
    """A line with a band of ± one std over seeds where more than one seed ran."""
    ax.plot(x, y, **kw)
    std = np.asarray(std, dtype=float)
    if (np.asarray(n) > 1).any():
        lo, hi = np.asarray(y, dtype=float) - np.nan_to_num(std), np.asarray(y, dtype=float) + np.nan_to_num(std)
        ax.fill_between(x, lo, hi, color=kw.get("color"), alpha=0.15, lw=0)


def _cal_lines(runs: pd.DataFrame) -> list[str]:
    cfg_cols = config_columns(runs)
    rows = [(CAL_ORDER.get(r["calibration"], 9), line_label(r, cfg_cols)) for _, r in runs.iterrows() if r["calibration"] != "none"]
    return [name for _, name in sorted(set(rows))]


def figure_accuracy(long: pd.DataFrame, runs: pd.DataFrame, path: Path, metric: str = "accuracy") -> Path:
    plt = _plt()
    panels = _panels(runs)
    cals = _cal_lines(runs)
    colors = _colors(cals)
    cal_avg, merged_avg = _avg(long, runs, "calibrated"), _avg(long, runs, "merged")
    experts = long[(long["stage"] == "experts") & (long["task"] == AVERAGE)].groupby(["backbone", "n_tasks"])["accuracy"].mean()
    base = long[(long["stage"] == "base") & (long["task"] == AVERAGE)].groupby(["backbone", "n_tasks"])["accuracy"].mean()
    n = len(panels)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow), squeeze=False, sharey=True)
    budgets_all = sorted(runs["budget"].unique())
    for ax, (bb, nt, merge) in zip(axes.flat, panels):
        sel = lambda d: d[(d["backbone"] == bb) & (d["n_tasks"] == nt) & (d["merge_label"] == merge)]  # noqa: E731
        m = sel(merged_avg).groupby("budget")["accuracy"].mean()
        if len(m) and m.max() - m.min() > 1e-6:  # a data merge: its accuracy depends on the budget
            ax.plot(m.index, m.values, color="black", marker="s", ls="--", label=f"{merge} (no calibration)")
        elif len(m):
            ax.axhline(m.mean(), color="black", ls="--", lw=1.2, label=f"merged ({merge})")
        if (bb, nt) in experts.index:
            ax.axhline(experts[(bb, nt)], color="tab:green", ls=":", lw=1.5, label="experts")
        if (bb, nt) in base.index:
            ax.axhline(base[(bb, nt)], color="grey", ls="-.", lw=1, label="base (zero-shot)")
        c = sel(cal_avg)
        for cal in cals:
            g = c[c["line"] == cal].sort_values("budget")
            if len(g):
                seeds = f" (n={int(g['n'].max())})" if g["n"].max() > 1 else ""
                _line(ax, g["budget"], g["accuracy"], g["std"], g["n"], marker="o", color=colors[cal], label=f"+ {cal}{seeds}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets_all)
        ax.set_xticklabels([str(b) for b in budgets_all])
        ax.set_xlabel("calibration examples per task")
        ax.set_title(f"{bb}, {merge}" + (f", {nt} tasks" if varies(runs, "n_tasks") else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"average {metric} (%)")
    fig.suptitle(f"{metric.capitalize()} vs calibration budget" + (" (bands: ± 1 std over seeds)" if (cal_avg["n"] > 1).any() else ""), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cost_lines(runs: pd.DataFrame) -> pd.DataFrame:
    cal = _with_lines(runs[runs["calibration"] != "none"].drop(columns=["line"], errors="ignore"), runs)
    return cal.groupby(["backbone", "n_tasks", "merge_label", "line", "budget"], as_index=False, dropna=False).agg(
        calibrate_s=("calibrate_s", "mean"), calibrate_s_std=("calibrate_s", "std"),
        peak_mib=("peak_mib", "mean"), peak_mib_std=("peak_mib", "std"), n=("run_dir", "size"))


def figure_cost(runs: pd.DataFrame, path: Path) -> Path | None:
    plt = _plt()
    cost = _cost_lines(runs)
    if cost.empty:
        return None
    cals = _cal_lines(runs)
    colors = _colors(cals)
    many_merges = cost["merge_label"].nunique() > 1
    many_tasks = cost["n_tasks"].nunique() > 1
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = sorted(set(runs.loc[runs["calibration"] != "none", "memory_kind"]))
    for (bb, nt, merge, cal), g in cost.groupby(["backbone", "n_tasks", "merge_label", "line"], sort=False):
        g = g.sort_values("budget")
        label = cal + (f" ({merge})" if many_merges else "") + (f", {nt} tasks" if many_tasks else "")
        k = sorted(cost["n_tasks"].unique()).index(nt) if many_tasks else 0
        kw = dict(color=colors[cal], ls=styles[k % 4], marker=markers[k % 4], label=label)
        _line(ax_t, g["budget"], g["calibrate_s"], g["calibrate_s_std"], g["n"], **kw)
        _line(ax_m, g["budget"], g["peak_mib"], g["peak_mib_std"], g["n"], **kw)
    budgets = sorted(cost["budget"].unique())
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("calibration examples per task")
        ax.grid(alpha=0.3)
    for ax in (ax_t, ax_m):
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax_t.set_ylabel("calibration wall-clock (s)")
    ax_t.set_title("Calibration time", fontsize=10)
    ax_m.set_ylabel("peak memory (MiB)")
    ax_m.set_title("Peak memory: " + "; ".join(kinds), fontsize=8)
    ax_t.legend(fontsize=8)
    fig.suptitle("Calibration cost per calibrator", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_drift(drift: pd.DataFrame, path: Path) -> Path | None:
    if drift.empty:
        return None
    plt = _plt()
    drift = drift.copy()
    if "merge_label" not in drift:
        drift["merge_label"], drift["calibration_label"] = drift["merge"], drift["calibration"]
    panels = sorted(dict.fromkeys(zip(drift["backbone"], drift["n_tasks"], drift["merge_label"], drift["calibration_label"], drift["merge"], drift["calibration"])),
                    key=lambda p: (str(p[0]), p[1], MERGE_ORDER.get(p[4], 9), p[2], CAL_ORDER.get(p[5], 9), p[3]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    for ax, (bb, nt, merge, cal, _m, _c) in zip(axes.flat, panels):
        d = drift[(drift["backbone"] == bb) & (drift["n_tasks"] == nt) & (drift["merge_label"] == merge) & (drift["calibration_label"] == cal)]
        before = d[d["when"] == "before"].groupby(["budget", "block"])["drift"].mean().reset_index()
        # "before" is the merged model against the experts: the same for every budget up to the sample drawn
        b0 = before.groupby("block")["drift"].mean()
        ax.plot(b0.index, b0.values, color="black", ls="--", marker="s", label="before (merged)")
        budgets = sorted(d["budget"].unique())
        cmap = plt.get_cmap("viridis")
        for i, budget in enumerate(budgets):
            a = d[(d["when"] == "after") & (d["budget"] == budget)].groupby("block")["drift"].mean()
            ax.plot(a.index, a.values, marker="o", color=cmap(0.15 + 0.7 * i / max(len(budgets) - 1, 1)), label=f"after {cal}, n={budget}")
        for i, (task, t) in enumerate(d[(d["when"] == "after") & (d["budget"] == budgets[-1])].groupby("task")):
            t = t.groupby("block")["drift"].mean()
            ax.plot(t.index, t.values, color="grey", alpha=0.3, lw=0.8, label=f"after, per task (n={budgets[-1]})" if i == 0 else None)
        ax.set_xlabel("block")
        ax.set_ylabel("feature drift (mean over tasks)")
        ax.set_ylim(bottom=0)
        ax.set_xticks(sorted(d["block"].unique()))
        ax.set_title(f"{bb}, {merge} + {cal}" + (f", {nt} tasks" if drift["n_tasks"].nunique() > 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Per-block feature drift before / after calibration", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_scaling(long: pd.DataFrame, runs: pd.DataFrame, path: Path, metric: str = "accuracy") -> Path | None:
    if not varies(runs, "n_tasks"):
        return None
    plt = _plt()
    cal_avg, merged_avg = _avg(long, runs, "calibrated"), _avg(long, runs, "merged")
    experts = long[(long["stage"] == "experts") & (long["task"] == AVERAGE)].groupby("n_tasks")["accuracy"].mean()
    cost = _cost_lines(runs)
    cals = _cal_lines(runs)
    colors = _colors(cals)
    budgets = sorted(runs.loc[runs["calibration"] != "none", "budget"].unique())
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(17.5, 4.2))
    ax_a, ax_t, ax_m = axes
    m = merged_avg.groupby("n_tasks")["accuracy"].mean()
    ax_a.plot(m.index, m.values, color="black", ls="--", marker="s", label="merged")
    ax_a.plot(experts.index, experts.values, color="tab:green", ls=":", marker="^", label="experts")
    for cal in cals:
        for j, budget in enumerate(budgets):
            a = cal_avg[(cal_avg["line"] == cal) & (cal_avg["budget"] == budget)].groupby("n_tasks").agg(
                accuracy=("accuracy", "mean"), std=("std", "mean"), n=("n", "min"))
            c = cost[(cost["line"] == cal) & (cost["budget"] == budget)].groupby("n_tasks").agg(
                calibrate_s=("calibrate_s", "mean"), calibrate_s_std=("calibrate_s_std", "mean"),
                peak_mib=("peak_mib", "mean"), peak_mib_std=("peak_mib_std", "mean"), n=("n", "min"))
            kw = dict(color=colors[cal], ls=styles[j % 4], marker="o", label=f"+ {cal}, n={budget}")
            if len(a):
                _line(ax_a, a.index, a["accuracy"], a["std"], a["n"], **kw)
            if len(c):
                _line(ax_t, c.index, c["calibrate_s"], c["calibrate_s_std"], c["n"], **kw)
                _line(ax_m, c.index, c["peak_mib"], c["peak_mib_std"], c["n"], **kw)
    ticks = sorted(runs["n_tasks"].unique())
    for ax, ylabel, title in ((ax_a, f"average {metric} (%)", metric.capitalize()), (ax_t, "calibration wall-clock (s)", "Calibration time"),
                              (ax_m, "peak memory (MiB)", "Peak memory: " + "; ".join(sorted(set(runs["memory_kind"]))))):
        ax.set_xticks(ticks)
        ax.set_xlabel("merged tasks")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in (ax_t, ax_m):
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    # one legend for the three panels, right of them (inside a panel it hides lines)
    fig.legend(*ax_a.get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle("Scaling with the number of merged tasks", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

