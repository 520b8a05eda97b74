"""featcal-report: a sweep's tables, its comparison with the published numbers, and figures.

    featcal-report multirun/2026-11-26/17-05-00                  # -> multirun/.../report/
    featcal-report multirun/a multirun/b --out results/my_report  # several sweeps in one report
    featcal-report multirun/.../collected.csv                     # a featcal-collect CSV

Writes into the output folder (default ``<first input>/report``, or beside a CSV):

- ``table.md`` / ``table.csv``: the paper layout, one row per merge × calibrator (× budget,
  × task count when they vary), one column per task plus the average; the best value of
  each column among the methods is bold in Markdown (listed in the CSV's ``best`` column);
  the experts and the base model are reference rows above them. Calibration and merge
  wall-clock and peak memory close each row.
- ``vs_paper.md`` / ``vs_paper.csv``: ours beside ``results/paper/*.csv`` where a published
  number exists for the backbone (CLIP ViT-B/32, ...).
- ``accuracy_vs_budget.png``: average accuracy against the calibration budget per
  calibrator, with the merged model and the experts as reference lines (one panel per merge
  and task count).
- ``cost.png``: calibration wall-clock and peak memory per calibrator against the budget.
- ``drift.png``: FeatCal's per-block feature drift (merged vs experts) before and after
  calibration (only when a FeatCal run reported it).
- ``scaling.png``: accuracy, wall-clock and memory against the number of merged tasks (only
  when it varies, e.g. ``experiment=embedded_scaling``).

When the runs logged to W&B (offline run folders inside the run folders), the figures and a
``wandb.Table`` of the whole sweep are logged to the sweep's W&B group as one more run
(``job_type=report``, the runs' project and mode); ``--no-wandb`` skips it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from featcal.utils import atomic_write_text

log = logging.getLogger(__name__)

AVERAGE = "average"
MERGE_ORDER = {"weight_average": 0, "task_arithmetic": 1, "ties": 2, "dare": 3, "regmean": 4, "adamerging": 5}
CAL_ORDER = {"none": 0, "featcal": 1, "featcal_paper": 2, "surgery": 3, "probsurgery": 4, "probsurgery_shared": 5}
MATCH_PROTOCOLS = {"train-split calibration", "individual fine-tuned experts", "merge only (no calibration data)"}
DEFAULT_PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
FIGURES = ("accuracy_vs_budget.png", "cost.png", "drift.png", "scaling.png")


# ---- loading ---------------------------------------------------------------------------
def _run_record(results: dict[str, Any], run_dir: str) -> dict[str, Any]:
    timings = results.get("timings") or {}
    memory = results.get("memory") or {}
    cuda = memory.get("cuda_peak_mib")
    return {
        "run_dir": run_dir,
        "backbone": results.get("backbone"),
        "merge": results.get("merge"),
        "calibration": results.get("calibration"),
        "budget": int(results.get("budget", 0)),
        "seed": results.get("seed"),
        "n_tasks": len(results.get("tasks") or []),
        "calibrate_s": timings.get("calibrate"),
        "merge_s": timings.get("merge"),
        "peak_mib": cuda if cuda else memory.get("peak_rss_mib"),
        "memory_kind": "CUDA peak" if cuda else "peak host RSS",
        "group": None,
    }


def _wandb_group(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """(W&B group, logger config) of a run folder's offline W&B run, if it has one."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*")) + sorted((run_dir / "wandb").glob("run-*"))
    if not runs:
        return None, {}
    try:
        from featcal.wandb_log import read_offline_run

        data = read_offline_run(runs[-1])
        logger = data["config"].get("logger") or {}
        return data.get("group"), logger if isinstance(logger, dict) else {}
    except Exception as err:  # an unreadable run file does not stop the report
        log.warning("could not read W&B run in %s: %s", run_dir, err)
        return None, {}


def load(inputs: Iterable[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(long accuracy rows, one row per run, drift rows, W&B info) from sweep folders
    (every complete ``results.json`` below them) or featcal-collect CSVs (their run
    folders' ``results.json`` are read too when they still exist)."""
    long: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    wandb_info: dict[str, Any] = {"groups": set(), "logger": {}, "metrics": set()}

    def add_results(results: dict[str, Any], run_dir: Path) -> None:
        rec = _run_record(results, str(run_dir))
        group, logger = _wandb_group(run_dir)
        if group:
            rec["group"] = group
            wandb_info["groups"].add(group)
            wandb_info["logger"] = wandb_info["logger"] or logger
        runs.append(rec)
        meta = {k: rec[k] for k in ("run_dir", "backbone", "merge", "calibration", "budget", "seed", "n_tasks")}
        wandb_info["metrics"].update((results.get("primary_metric") or {"": "accuracy"}).values())
        # each task's primary metric (accuracy for classification pools) and their average
        score = results.get("score") or results.get("accuracy") or {}
        for stage, per_task in score.items():
            for task, value in per_task.items():
                long.append({**meta, "stage": stage, "task": task, "accuracy": float(value)})
        for row in results.get("drift") or []:
            drift.append({**meta, **row})

    for path in inputs:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.rglob("results.json"))
            for res in found:
                try:
                    add_results(json.loads(res.read_text()), res.parent)
                except (OSError, ValueError) as err:
                    log.warning("skipping unreadable %s: %s", res, err)
        elif path.suffix == ".csv" and path.is_file():
            df = pd.read_csv(path)
            need = {"run_dir", "backbone", "merge", "calibration", "budget", "stage", "task"}
            if need - set(df.columns):
                raise ValueError(f"{path} lacks columns {sorted(need - set(df.columns))} (a featcal-collect CSV has them)")
            if "metric" in df.columns:  # one row per (stage, task, metric): keep each task's primary metric
                df = df[df["primary"].astype(str).str.lower().isin(("true", "1"))].copy()
                wandb_info["metrics"].update(df.loc[df["task"] != AVERAGE, "metric"])
                df["accuracy"] = df["value"]
            else:
                wandb_info["metrics"].add("accuracy")
            for run_dir, g in df.groupby("run_dir", sort=False):
                res = Path(str(run_dir)) / "results.json"
                if res.is_file():
                    add_results(json.loads(res.read_text()), res.parent)
                    continue
                first = g.iloc[0]
                tasks = sorted(set(g["task"]) - {AVERAGE})
                rec = {
                    "run_dir": str(run_dir), "backbone": first["backbone"], "merge": first["merge"],
                    "calibration": first["calibration"], "budget": int(first["budget"]), "seed": first.get("seed"),
                    "n_tasks": len(tasks), "calibrate_s": first.get("calibrate_seconds"), "merge_s": None,
                    "peak_mib": first.get("peak_rss_mib"), "memory_kind": "peak host RSS", "group": None,
                }
                runs.append(rec)
                for _, r in g.iterrows():
                    long.append({**{k: rec[k] for k in ("run_dir", "backbone", "merge", "calibration", "budget", "seed", "n_tasks")},
                                 "stage": r["stage"], "task": r["task"], "accuracy": float(r["accuracy"])})
        else:
            raise FileNotFoundError(f"{path}: neither a sweep folder nor a CSV file")
    if not runs:
        raise FileNotFoundError("no complete runs (results.json) in " + ", ".join(map(str, inputs)))
    return pd.DataFrame(long), pd.DataFrame(runs), pd.DataFrame(drift), wandb_info


# ---- tables ----------------------------------------------------------------------------
def _ordered_tasks(long: pd.DataFrame) -> list[str]:
    return [t for t in dict.fromkeys(long["task"]) if t != AVERAGE]


def _varying(runs: pd.DataFrame, col: str) -> bool:
    return runs[col].nunique(dropna=False) > 1


def method_rows(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, n_tasks, merge, calibration, budget): the accuracy of the run's final
    model (calibrated; merged when calibration is none) per task, averaged over seeds. A
    calibration-free row whose numbers do not depend on the budget (a data-free merge) is
    kept once with budget NaN."""
    final = long[long["stage"] == "calibrated"]
    keys = ["backbone", "n_tasks", "merge", "calibration", "budget"]
    wide = final.pivot_table(index=keys, columns="task", values="accuracy", aggfunc="mean").reset_index()
    cost = runs.groupby(keys, dropna=False)[["calibrate_s", "merge_s", "peak_mib"]].mean().reset_index()
    wide = wide.merge(cost, on=keys, how="left")
    wide["seeds"] = wide.merge(runs.groupby(keys).size().rename("n").reset_index(), on=keys, how="left")["n"].to_numpy()
    out = []
    for _, g in wide.groupby(["backbone", "n_tasks", "merge", "calibration"], sort=False):
        if g["calibration"].iloc[0] == "none" and len(g) > 1:
            task_cols = [c for c in g.columns if c not in keys + ["calibrate_s", "merge_s", "peak_mib", "seeds"]]
            vals = g[task_cols].to_numpy(dtype=float)
            if np.allclose(vals, vals[0], rtol=0.0, atol=1e-9, equal_nan=True):
                row = g.iloc[[0]].copy()
                row["budget"] = math.nan
                out.append(row)
                continue
        out.append(g)
    rows = pd.concat(out, ignore_index=True)
    rows["_c"] = rows["calibration"].map(lambda c: CAL_ORDER.get(c, 9))
    rows["_m"] = rows["merge"].map(lambda m: MERGE_ORDER.get(m, 9))
    rows = rows.sort_values(["backbone", "n_tasks", "_m", "merge", "_c", "budget"], na_position="first").drop(columns=["_c", "_m"])
    return rows.reset_index(drop=True)


def reference_rows(long: pd.DataFrame) -> pd.DataFrame:
    """Experts (each on its own task) and the base model, per backbone and task count."""
    out = []
    for stage, label in (("experts", "experts"), ("base", "base (zero-shot)")):
        sub = long[long["stage"] == stage]
        if not len(sub):
            continue
        wide = sub.pivot_table(index=["backbone", "n_tasks"], columns="task", values="accuracy", aggfunc="mean").reset_index()
        wide["merge"] = label
        wide["calibration"] = ""
        wide["budget"] = math.nan
        out.append(wide)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def paper_table(long: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The paper-layout table (reference rows first, then methods) and its task columns."""
    tasks = _ordered_tasks(long)
    methods = method_rows(long, runs)
    methods["kind"] = "method"
    refs = reference_rows(long)
    if len(refs):
        refs["kind"] = "reference"
    table = pd.concat([refs, methods], ignore_index=True) if len(refs) else methods
    cols = [t for t in tasks if t in table.columns] + [AVERAGE]
    table = table.sort_values(["backbone", "n_tasks"], kind="stable").reset_index(drop=True)
    best = [[] for _ in range(len(table))]
    for _, g in table[table["kind"] == "method"].groupby(["backbone", "n_tasks"]):
        if len(g) < 2:
            continue
        for c in cols:
            vals = g[c].dropna()
            if len(vals):
                top = vals.max()
                for i in vals.index[vals >= top - 1e-9]:
                    best[i].append(c)
    table["best"] = [";".join(b) for b in best]
    return table, cols


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table_markdown(table: pd.DataFrame, cols: list[str], runs: pd.DataFrame) -> str:
    lines = []
    show_tasks = _varying(runs, "n_tasks")
    for (backbone, n_tasks), g in table.groupby(["backbone", "n_tasks"], sort=False):
        present = [c for c in cols if g[c].notna().any()]
        lines += [f"## {backbone}" + (f", {n_tasks} tasks" if show_tasks else ""), ""]
        header = ["merge", "calibration", "budget"] + present + ["calibrate s", "merge s", "peak MiB"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, r in g.iterrows():
            best = set(str(r["best"]).split(";")) if r["best"] else set()
            cells = [str(r["merge"]), str(r["calibration"]), "—" if pd.isna(r["budget"]) else str(int(r["budget"]))]
            for c in present:
                text = _fmt(r[c])
                cells.append(f"**{text}**" if c in best else text)
            if r["kind"] == "reference":
                cells += ["", "", ""]
            else:
                cells += [_fmt(r.get("calibrate_s"), 1), _fmt(r.get("merge_s"), 1), _fmt(r.get("peak_mib"), 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---- the published numbers ---------------------------------------------------------------
def load_paper(paper_dir: Path = DEFAULT_PAPER_DIR) -> pd.DataFrame:
    frames = [pd.read_csv(f, dtype={"budget": "string"}, keep_default_na=False) for f in sorted(Path(paper_dir).glob("*.csv"))]
    if not frames:
        raise FileNotFoundError(f"no paper CSVs in {paper_dir}")
    paper = pd.concat(frames, ignore_index=True)
    paper["budget"] = paper["budget"].astype(str).str.strip()
    paper["accuracy"] = pd.to_numeric(paper["accuracy"])
    for col in ("protocol", "note", "source"):
        if col not in paper:
            paper[col] = ""
    return paper


def ours_for_paper(df: pd.DataFrame) -> pd.DataFrame:
    """A long CSV (run_dir, backbone, merge, calibration, budget, task, stage, accuracy) as
    one row per (backbone, method, merge, budget, task): the run's calibrated accuracy (its
    merged accuracy when calibration is none), experts as method "experts"; seeds averaged,
    the average over tasks recomputed from the per-task rows."""
    if "metric" in df.columns and "value" in df.columns:  # one row per (stage, task, metric): the primary ones
        df = df[df["primary"].astype(str).str.lower().isin(("true", "1"))].copy() if "primary" in df.columns else df[df["metric"] == "accuracy"].copy()
        df["accuracy"] = df["value"]
    need = {"backbone", "merge", "calibration", "budget", "task", "stage", "accuracy"}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"the sweep CSV lacks columns {sorted(missing)}")
    df = df[~df["task"].astype(str).str.lower().isin({"average", "avg", "mean"})].copy()
    df["budget"] = df["budget"].astype("Int64").astype(str)
    calibration = df["calibration"].astype(str)
    stage = df["stage"].astype(str)
    mine = df[((calibration == "none") & (stage == "merged")) | ((calibration != "none") & (stage == "calibrated"))].copy()
    mine["method"] = mine["calibration"].astype(str)
    experts = df[stage == "experts"].copy()
    experts["method"] = "experts"
    experts["merge"] = ""
    experts["budget"] = ""
    rows = pd.concat([mine, experts], ignore_index=True)
    keys = ["backbone", "method", "merge", "budget", "task"]
    per_task = rows.groupby(keys, as_index=False).agg(accuracy=("accuracy", "mean"), runs=("accuracy", "size"))
    per_task["tasks"] = 1
    avg = per_task.groupby(keys[:-1], as_index=False).agg(accuracy=("accuracy", "mean"), runs=("runs", "min"), tasks=("task", "size"))
    avg["task"] = AVERAGE
    return pd.concat([per_task, avg[per_task.columns]], ignore_index=True)


def _paper_backbone(ours: str, paper_backbones: list[str]) -> str | None:
    hits = [p for p in paper_backbones if ours == p or ours.startswith(p)]
    return max(hits, key=len) if hits else None


def compare(ours: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ours vs paper per configuration and task, published references under other protocols).
    Paper rows match on (backbone, method, merge, budget); one without a budget matches every
    budget; a sweep backbone matches a paper backbone it starts with."""
    matchable = paper[paper["protocol"].isin(MATCH_PROTOCOLS)]
    backbones = sorted(paper["backbone"].unique())
    out = []
    for _, r in ours.iterrows():
        pb = _paper_backbone(str(r["backbone"]), backbones)
        p = matchable[(matchable["backbone"] == pb) & (matchable["method"] == r["method"]) & (matchable["task"] == r["task"])]
        p = p[(p["merge"] == r["merge"]) | (p["merge"] == "")]
        exact = p[p["budget"] == str(r["budget"])]
        p = exact if len(exact) else p[p["budget"] == ""]
        paper_acc = float(p["accuracy"].iloc[0]) if len(p) else None
        out.append({
            "backbone": r["backbone"], "method": r["method"], "merge": r["merge"], "budget": r["budget"], "task": r["task"],
            "ours": float(r["accuracy"]), "paper": paper_acc,
            "delta": None if paper_acc is None else float(r["accuracy"]) - paper_acc,
            "runs": int(r["runs"]), "tasks": int(r["tasks"]), "source": p["source"].iloc[0] if len(p) else "",
        })
    matched = pd.DataFrame(out)
    refs = paper[~paper["protocol"].isin(MATCH_PROTOCOLS)]
    if len(ours):
        keep = [b for b in refs["backbone"].unique() if any(_paper_backbone(str(o), [b]) for o in ours["backbone"].unique())]
        refs = refs[refs["backbone"].isin(keep)]
    return matched, refs


def comparison_markdown(matched: pd.DataFrame, refs: pd.DataFrame) -> str:
    lines = ["# Our sweep vs the published numbers", ""]
    if matched.empty:
        return "\n".join(lines + ["(no runs in the sweep)", ""])
    avg = matched[matched["task"] == AVERAGE].copy()
    avg["_o"] = avg["method"].map(lambda m: {"experts": -1}.get(m, CAL_ORDER.get(m, 9)))
    avg["_b"] = pd.to_numeric(avg["budget"], errors="coerce").fillna(-1)
    avg = avg.sort_values(["backbone", "merge", "_o", "_b"])
    lines += ["## Average accuracy over tasks (%)", "",
              "| backbone | merge | method | budget | tasks | ours | paper | Δ (ours − paper) | runs | source |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in avg.iterrows():
        lines.append(f"| {r['backbone']} | {r['merge'] or '—'} | {r['method']} | {r['budget'] or '—'} | {r['tasks']} | {_fmt(r['ours'])} | "
                     f"{_fmt(r['paper'])} | {_fmt(r['delta'])} | {r['runs']} | {r['source']} |")
    lines.append("")
    tasks = [t for t in dict.fromkeys(matched["task"]) if t != AVERAGE]
    lines += ["## Per task (%): ours / paper", ""]
    lines += ["| backbone | merge | method | budget | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 5)]
    for (bb, merge, method, budget), g in matched.groupby(["backbone", "merge", "method", "budget"], sort=False):
        cells = []
        for t in tasks + [AVERAGE]:
            row = g[g["task"] == t]
            if not len(row):
                cells.append("")
                continue
            ours, paper = row["ours"].iloc[0], row["paper"].iloc[0]
            cells.append(_fmt(ours) if paper is None or pd.isna(paper) else f"{_fmt(ours)} / {_fmt(paper)}")
        lines.append(f"| {bb} | {merge or '—'} | {method} | {budget or '—'} | " + " | ".join(cells) + " |")
    lines.append("")
    if len(refs):
        lines += ["## Published references under other protocols (not matched)", "",
                  "| backbone | merge | method | task | accuracy | protocol | source |", "|---|---|---|---|---|---|---|"]
        for _, r in refs.iterrows():
            lines.append(f"| {r['backbone']} | {r['merge']} | {r['method']} | {r['task']} | {_fmt(r['accuracy'])} | {r['protocol']} | {r['source']} |")
        lines.append("")
    return "\n".join(lines)


# ---- figures -----------------------------------------------------------------------------
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
    panels = list(dict.fromkeys(zip(runs["backbone"], runs["n_tasks"], runs["merge"])))
    return sorted(panels, key=lambda p: (str(p[0]), p[1], MERGE_ORDER.get(p[2], 9), p[2]))


def _avg(long: pd.DataFrame, stage: str) -> pd.DataFrame:
    sub = long[(long["stage"] == stage) & (long["task"] == AVERAGE)]
    return sub.groupby(["backbone", "n_tasks", "merge", "calibration", "budget"], as_index=False)["accuracy"].mean()


def figure_accuracy(long: pd.DataFrame, runs: pd.DataFrame, path: Path, metric: str = "accuracy") -> Path:
    plt = _plt()
    panels = _panels(runs)
    cals = sorted(set(runs["calibration"]) - {"none"}, key=lambda c: CAL_ORDER.get(c, 9))
    colors = _colors(cals)
    cal_avg, merged_avg = _avg(long, "calibrated"), _avg(long, "merged")
    experts = long[(long["stage"] == "experts") & (long["task"] == AVERAGE)].groupby(["backbone", "n_tasks"])["accuracy"].mean()
    base = long[(long["stage"] == "base") & (long["task"] == AVERAGE)].groupby(["backbone", "n_tasks"])["accuracy"].mean()
    n = len(panels)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow), squeeze=False, sharey=True)
    budgets_all = sorted(runs["budget"].unique())
    for ax, (bb, nt, merge) in zip(axes.flat, panels):
        sel = lambda d: d[(d["backbone"] == bb) & (d["n_tasks"] == nt) & (d["merge"] == merge)]  # noqa: E731
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
            g = c[c["calibration"] == cal].sort_values("budget")
            if len(g):
                ax.plot(g["budget"], g["accuracy"], marker="o", color=colors[cal], label=f"+ {cal}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets_all)
        ax.set_xticklabels([str(b) for b in budgets_all])
        ax.set_xlabel("calibration examples per task")
        ax.set_title(f"{bb}, {merge}" + (f", {nt} tasks" if _varying(runs, "n_tasks") else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"average {metric} (%)")
    fig.suptitle(f"{metric.capitalize()} vs calibration budget", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cost_lines(runs: pd.DataFrame) -> pd.DataFrame:
    cal = runs[runs["calibration"] != "none"]
    return cal.groupby(["backbone", "n_tasks", "merge", "calibration", "budget"], as_index=False)[["calibrate_s", "peak_mib"]].mean()


def figure_cost(runs: pd.DataFrame, path: Path) -> Path | None:
    plt = _plt()
    cost = _cost_lines(runs)
    if cost.empty:
        return None
    cals = sorted(cost["calibration"].unique(), key=lambda c: CAL_ORDER.get(c, 9))
    colors = _colors(cals)
    many_merges = cost["merge"].nunique() > 1
    many_tasks = cost["n_tasks"].nunique() > 1
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = sorted(set(runs.loc[runs["calibration"] != "none", "memory_kind"]))
    for (bb, nt, merge, cal), g in cost.groupby(["backbone", "n_tasks", "merge", "calibration"], sort=False):
        g = g.sort_values("budget")
        label = cal + (f" ({merge})" if many_merges else "") + (f", {nt} tasks" if many_tasks else "")
        k = sorted(cost["n_tasks"].unique()).index(nt) if many_tasks else 0
        kw = dict(color=colors[cal], ls=styles[k % 4], marker=markers[k % 4], label=label)
        ax_t.plot(g["budget"], g["calibrate_s"], **kw)
        ax_m.plot(g["budget"], g["peak_mib"], **kw)
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
    ax_m.set_ylabel(f"{' / '.join(kinds)} of the run (MiB)")
    ax_m.set_title("Peak memory", fontsize=10)
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
    panels = sorted(dict.fromkeys(zip(drift["backbone"], drift["n_tasks"], drift["merge"], drift["calibration"])),
                    key=lambda p: (str(p[0]), p[1], MERGE_ORDER.get(p[2], 9), p[2], CAL_ORDER.get(p[3], 9)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    for ax, (bb, nt, merge, cal) in zip(axes.flat, panels):
        d = drift[(drift["backbone"] == bb) & (drift["n_tasks"] == nt) & (drift["merge"] == merge) & (drift["calibration"] == cal)]
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
    if not _varying(runs, "n_tasks"):
        return None
    plt = _plt()
    cal_avg, merged_avg = _avg(long, "calibrated"), _avg(long, "merged")
    experts = long[(long["stage"] == "experts") & (long["task"] == AVERAGE)].groupby("n_tasks")["accuracy"].mean()
    cost = _cost_lines(runs)
    cals = sorted(set(runs["calibration"]) - {"none"}, key=lambda c: CAL_ORDER.get(c, 9))
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
            a = cal_avg[(cal_avg["calibration"] == cal) & (cal_avg["budget"] == budget)].groupby("n_tasks")["accuracy"].mean()
            c = cost[(cost["calibration"] == cal) & (cost["budget"] == budget)].groupby("n_tasks")[["calibrate_s", "peak_mib"]].mean()
            kw = dict(color=colors[cal], ls=styles[j % 4], marker="o", label=f"+ {cal}, n={budget}")
            if len(a):
                ax_a.plot(a.index, a.values, **kw)
            if len(c):
                ax_t.plot(c.index, c["calibrate_s"], **kw)
                ax_m.plot(c.index, c["peak_mib"], **kw)
    ticks = sorted(runs["n_tasks"].unique())
    for ax, ylabel, title in ((ax_a, f"average {metric} (%)", metric.capitalize()), (ax_t, "calibration wall-clock (s)", "Calibration time"),
                              (ax_m, "peak memory of the run (MiB)", "Peak memory")):
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


# ---- W&B ---------------------------------------------------------------------------------
def log_to_wandb(info: dict[str, Any], figures: list[Path], table: pd.DataFrame, out: Path) -> str | None:
    """Log the figures and the sweep table as one report run in the sweep's W&B group.
    Returns the W&B run folder, or None when the sweep did not log to W&B."""
    groups = sorted(info["groups"])
    if not groups:
        return None
    logger = info.get("logger") or {}
    mode = str(logger.get("mode") or "offline")
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=logger.get("project") or "featcal", entity=logger.get("entity"), group=groups[0],
        name=f"report-{groups[0]}", job_type="report", mode=mode, dir=str(out), reinit="finish_previous",
        config={"groups": groups},
    )
    try:
        payload: dict[str, Any] = {f"report/{p.stem}": wandb.Image(str(p)) for p in figures}
        clean = table.drop(columns=["kind"], errors="ignore").astype(object).where(table.notna(), None)
        payload["report/sweep_table"] = wandb.Table(dataframe=clean)
        run.log(payload)
        return getattr(run, "dir", None)
    finally:
        run.finish()


# ---- entry point -------------------------------------------------------------------------
def report(inputs: list[Path], out: Path, paper_dir: Path = DEFAULT_PAPER_DIR, use_wandb: bool = True) -> dict[str, Any]:
    long, runs, drift, info = load(inputs)
    out.mkdir(parents=True, exist_ok=True)
    table, cols = paper_table(long, runs)
    written: dict[str, Any] = {}

    header = (f"# Sweep report\n\n{runs['run_dir'].nunique()} runs from {', '.join(str(p) for p in inputs)}. "
              f"Each task's primary metric ({', '.join(sorted(info['metrics'] - {''})) or 'accuracy'}, %) of the final model (calibrated; merged when calibration is none), "
              "averaged over seeds; **bold**: best method per column. Budget: calibration examples per task "
              "(— : no calibration data used). Peak memory: "
              + ", ".join(sorted(set(runs["memory_kind"]))) + " of the whole run.\n")
    atomic_write_text(out / "table.md", header + "\n" + table_markdown(table, cols, runs))
    csv_cols = ["kind", "backbone", "n_tasks", "merge", "calibration", "budget"] + cols + ["calibrate_s", "merge_s", "peak_mib", "best"]
    atomic_write_text(out / "table.csv", table.reindex(columns=csv_cols).to_csv(index=False))
    written["tables"] = [out / "table.md", out / "table.csv"]

    paper = load_paper(paper_dir) if Path(paper_dir).is_dir() else None
    if paper is not None:
        matched, refs = compare(ours_for_paper(long), paper)
        if len(matched) and matched["paper"].notna().any():
            atomic_write_text(out / "vs_paper.md", comparison_markdown(matched, refs) + "\n")
            atomic_write_text(out / "vs_paper.csv", matched.to_csv(index=False))
            written["tables"] += [out / "vs_paper.md", out / "vs_paper.csv"]
        else:
            written["vs_paper"] = f"no published numbers for backbone(s) {sorted(set(runs['backbone']))}"

    metrics = info["metrics"] - {""}
    metric = next(iter(metrics)) if len(metrics) == 1 else "primary metric"
    figures = [figure_accuracy(long, runs, out / "accuracy_vs_budget.png", metric), figure_cost(runs, out / "cost.png"),
               figure_drift(drift, out / "drift.png"), figure_scaling(long, runs, out / "scaling.png", metric)]
    written["figures"] = [f for f in figures if f is not None]
    written["wandb"] = None
    if use_wandb:
        try:
            written["wandb"] = log_to_wandb(info, written["figures"], table, out)
        except Exception as err:  # the files are written either way
            written["wandb_error"] = f"{type(err).__name__}: {err}"
    written["table"] = table
    written["columns"] = cols
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featcal-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="sweep folders (holding run folders) and/or featcal-collect CSVs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first input>/report)")
    parser.add_argument("--paper-dir", type=Path, default=DEFAULT_PAPER_DIR, help="published numbers (results/paper)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to the sweep's W&B group")
    args = parser.parse_args(argv)
    first = args.inputs[0]
    out = args.out or ((first if first.is_dir() else first.parent) / "report")
    try:
        written = report(args.inputs, out, args.paper_dir, use_wandb=not args.no_wandb)
    except (FileNotFoundError, ValueError) as err:
        print(f"featcal-report: {err}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    for path in written["tables"] + written["figures"]:
        print(f"wrote {path}")
    if written.get("vs_paper"):
        print(f"vs paper: {written['vs_paper']}")
    if written.get("wandb"):
        print(f"W&B: report run in {Path(written['wandb']).parent}")
    if written.get("wandb_error"):
        print(f"W&B: not logged ({written['wandb_error']}); the files are written.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
