"""featcal-report: a sweep's tables, its comparison with the published numbers, and figures.

    featcal-report multirun/2026-11-26/17-05-00                  # -> multirun/.../report/
    featcal-report multirun/a multirun/b --out results/my_report  # several sweeps in one report
    featcal-report multirun/.../collected.csv                     # a featcal-collect CSV

Writes into the output folder (default ``<first input>/report``, or beside a CSV):

- ``table.md`` / ``table.tex`` / ``table.csv``: the paper layout, one row per
  configuration -- merge x calibrator x budget (x task count), and every other config key
  whose value differs between runs of one merge x calibrator, named in the label
  (``featcal (rho=1.0, alpha=0)``) or shown as a column (``build`` for suites built
  differently). Runs identical but for the seed are averaged: ``mean ± std`` with ``n``;
  the same configuration and seed twice is flagged (only the newest is used), never
  averaged. One column per task plus the average; the best mean of each column among the
  methods is bold (listed in the CSV's ``best`` column); the experts and the base model are
  reference rows above them. Calibration and merge wall-clock and the run's own peak memory
  close each row. Incomplete jobs (failed, running, killed or crashed) and unreadable
  results are listed below the tables and on stdout.
- ``vs_paper.md`` / ``vs_paper.csv``: ours beside ``results/paper/*.csv`` where a published
  number exists for the backbone (CLIP ViT-B/32, ...).
- ``accuracy_vs_budget.png``: average accuracy against the calibration budget, one line
  per configuration (a band of ± one std where several seeds ran), with the merged model and the experts as reference lines (one panel per merge
  and task count).
- ``cost.png``: calibration wall-clock and peak memory per calibrator against the budget.
- ``drift.png``: FeatCal's per-block feature drift (merged vs experts) before and after
  calibration (only when a FeatCal run reported it).
- ``scaling.png``: accuracy, wall-clock and memory against the number of merged tasks (only
  when it varies, e.g. ``experiment=embedded_scaling``).

When the runs logged to W&B (their results.json records the W&B group, project and mode),
the figures and a ``wandb.Table`` of the whole sweep are logged to the sweep's group as its
one report run (``job_type=report``, the same id on every call: a new report updates it);
``--no-wandb`` skips it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from featcal.collect import config_key, label_configurations, scan_sweep
from featcal.paths import paper_dir as _paper_dir
from featcal.utils import atomic_write_text
from featcal.wandb_log import offline_run_problems

log = logging.getLogger(__name__)

AVERAGE = "average"
MERGE_ORDER = {"weight_average": 0, "task_arithmetic": 1, "ties": 2, "dare": 3, "regmean": 4, "adamerging": 5}
CAL_ORDER = {"none": 0, "featcal": 1, "featcal_paper": 2, "surgery": 3, "probsurgery": 4, "probsurgery_shared": 5}
MATCH_PROTOCOLS = {"train-split calibration", "individual fine-tuned experts", "merge only (no calibration data)"}
DEFAULT_PAPER_DIR = _paper_dir()  # results/paper in a checkout, the wheel's copy when installed
FIGURES = ("accuracy_vs_budget.png", "cost.png", "drift.png", "scaling.png")


# ---- loading ---------------------------------------------------------------------------
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


def load(inputs: Iterable[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(long accuracy rows, one row per run, drift rows, info) from sweep folders (every
    job folder below them, ``featcal.collect.scan_sweep``) or featcal-collect CSVs (their
    run folders' ``results.json`` are read too when they still exist).

    Runs are labelled by their whole configuration (``featcal.collect.label_configurations``:
    ``merge_label``, ``calibration_label``, ``config_id`` and a column per other differing
    config key); of two runs with the same configuration and seed only the newest is kept and
    both are listed in ``info["duplicates"]``. ``info`` also holds the W&B group, project and
    mode the runs recorded in their results.json, the incomplete jobs and unreadable files."""
    long: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    keys: list[dict[str, str]] = []
    drift: list[dict[str, Any]] = []
    info: dict[str, Any] = {"groups": set(), "logger": {}, "metrics": set(), "sweeps": [], "duplicates": [], "wandb_problems": []}

    def add_results(results: dict[str, Any], run_dir: Path) -> None:
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
        runs.append(rec)
        keys.append(config_key(results))
        meta = {k: rec[k] for k in META}
        info["metrics"].update((results.get("primary_metric") or {"": "accuracy"}).values())
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
            sweep = scan_sweep(path)
            info["sweeps"].append(sweep)
            for folder, results in sweep.complete:
                add_results(results, folder)
        elif path.suffix == ".csv" and path.is_file():
            df = pd.read_csv(path)
            need = {"run_dir", "backbone", "merge", "calibration", "budget", "stage", "task"}
            if need - set(df.columns):
                raise ValueError(f"{path} lacks columns {sorted(need - set(df.columns))} (a featcal-collect CSV has them)")
            if "metric" in df.columns:  # one row per (stage, task, metric): keep each task's primary metric
                df = df[df["primary"].astype(str).str.lower().isin(("true", "1"))].copy()
                info["metrics"].update(df.loc[df["task"] != AVERAGE, "metric"])
                df["accuracy"] = df["value"]
            else:
                info["metrics"].add("accuracy")
            for run_dir, g in df.groupby("run_dir", sort=False):
                res = Path(str(run_dir)) / "results.json"
                if res.is_file():
                    with contextlib.suppress(OSError, ValueError):
                        add_results(json.loads(res.read_text()), res.parent)
                        continue
                first = g.iloc[0]
                tasks = sorted(set(g["task"]) - {AVERAGE})
                cuda = first.get("cuda_peak_mib")
                has_cuda = cuda is not None and not pd.isna(cuda) and float(cuda) > 0
                own = first.get("rss_above_start_mib")
                scope = "run" if own is not None and not pd.isna(own) else "process"
                rec = {
                    "run_dir": str(run_dir), "backbone": first["backbone"], "merge": first["merge"],
                    "calibration": first["calibration"], "budget": int(first["budget"]), "seed": first.get("seed"),
                    "n_tasks": len(tasks), "calibrate_s": first.get("calibrate_seconds"), "merge_s": first.get("merge_seconds"),
                    "peak_mib": float(cuda) if has_cuda else (float(own) if scope == "run" else first.get("peak_rss_mib")),
                    "memory_kind": "CUDA peak of the run" if has_cuda else (
                        "peak host RSS of the run above its start" if scope == "run" else "peak host RSS of the process (older results: whole process lifetime)"),
                    "group": None, "mtime": 0.0,
                }
                runs.append(rec)
                raw = first.get("config")
                keys.append(json.loads(raw) if isinstance(raw, str) else {})
                for _, r in g.iterrows():
                    long.append({**{k: rec[k] for k in META}, "stage": r["stage"], "task": r["task"], "accuracy": float(r["accuracy"])})
        else:
            raise FileNotFoundError(f"{path}: neither a sweep folder nor a CSV file")
    if not runs:
        raise FileNotFoundError("no complete runs (results.json) in " + ", ".join(map(str, inputs)))
    runs_df = label_configurations(pd.DataFrame(runs), keys)
    cfg_cols = list(runs_df.attrs["config_columns"])
    # the same configuration and seed more than once (two sweeps, a rerun): keep the newest, say so
    keep = pd.Series(True, index=runs_df.index)
    for (_cid, seed), g in runs_df.groupby(["config_id", "seed"], dropna=False, sort=False):
        if len(g) > 1:
            newest = g["mtime"].idxmax()
            keep[g.index.difference([newest])] = False
            info["duplicates"].append({"label": f"{g['merge_label'].iloc[0]} + {g['calibration_label'].iloc[0]}, budget {g['budget'].iloc[0]}, seed {seed}",
                                       "kept": g.loc[newest, "run_dir"], "dropped": list(g.loc[g.index != newest, "run_dir"])})
    runs_df = runs_df[keep].reset_index(drop=True)
    runs_df.attrs["config_columns"] = cfg_cols
    labels = runs_df[["run_dir", "merge_label", "calibration_label", "config_id", *cfg_cols]]
    long_df = pd.DataFrame(long).merge(labels, on="run_dir", how="inner")
    drift_df = pd.DataFrame(drift)
    if len(drift_df):
        drift_df = drift_df.merge(labels, on="run_dir", how="inner")
    return long_df, runs_df, drift_df, info


# ---- tables ----------------------------------------------------------------------------
def _ordered_tasks(long: pd.DataFrame) -> list[str]:
    return [t for t in dict.fromkeys(long["task"]) if t != AVERAGE]


def _varying(runs: pd.DataFrame, col: str) -> bool:
    return runs[col].nunique(dropna=False) > 1


def config_columns(runs: pd.DataFrame) -> list[str]:
    """The extra config columns ``load`` found (keys that differ between runs of one
    backbone x merge x calibration, other than ``merge.*`` / ``calibration.*``)."""
    return [c for c in runs.attrs.get("config_columns", []) if c in runs.columns]


def line_label(r: Any, cfg_cols: list[str]) -> str:
    """A run's label for figure lines: its calibration label and its other config columns."""
    extra = [f"{c}={r[c]}" for c in cfg_cols if str(r[c]) != "—"]
    return str(r["calibration_label"]) + (f" [{', '.join(extra)}]" if extra else "")


METHOD_KEYS = ["backbone", "n_tasks", "merge", "calibration", "merge_label", "calibration_label", "budget"]
COST = ["calibrate_s", "merge_s", "peak_mib"]


def method_rows(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (backbone, task count, merge and calibration with their
    differing settings, budget, other differing config keys): the final model's score
    (calibrated; merged when calibration is none) per task as the mean over the seeds that
    ran it, with ``<task>_std`` (sample std, NaN for one seed) and ``n`` (seeds). A
    calibration-free configuration whose numbers do not depend on the budget (a data-free
    merge) is kept once with budget NaN."""
    cfg_cols = config_columns(runs)
    keys = METHOD_KEYS + cfg_cols + ["config_id"]
    final = long[long["stage"] == "calibrated"]
    per_run = final.pivot_table(index="run_dir", columns="task", values="accuracy", aggfunc="first")
    tasks = list(per_run.columns)
    data = runs.set_index("run_dir")[keys + COST].join(per_run, how="inner").reset_index()
    grouped = data.groupby(keys, dropna=False, sort=False)
    mean = grouped[tasks + COST].mean()
    std = grouped[tasks].std(ddof=1).add_suffix("_std")
    n = grouped.size().rename("n")
    wide = pd.concat([mean, std, n], axis=1).reset_index()
    out, collapsed = [], []
    budget_free = [k for k in keys if k not in ("budget", "config_id")]
    for _, g in wide.groupby(budget_free, sort=False, dropna=False):
        if g["calibration"].iloc[0] == "none" and len(g) > 1:
            vals = g[tasks].to_numpy(dtype=float)
            if np.allclose(vals, vals[0], rtol=0.0, atol=1e-9, equal_nan=True):
                # one configuration run at several (unused) budgets: shown once, and said so;
                # its cost columns are the mean over those runs, each run's own values are listed
                row = g.iloc[[0]].copy()
                row["budget"] = math.nan
                for c in COST:
                    row[c] = g[c].mean()
                row["n"] = int(g["n"].max())
                out.append(row)
                collapsed.append({
                    "label": f"{g['merge_label'].iloc[0]} + {g['calibration_label'].iloc[0]}",
                    "budgets": [None if pd.isna(b) else int(b) for b in g["budget"]],
                    **{c: [None if pd.isna(v) else float(v) for v in g[c]] for c in COST},
                })
                continue
        out.append(g)
    rows = pd.concat(out, ignore_index=True)
    rows["_c"] = rows["calibration"].map(lambda c: CAL_ORDER.get(c, 9))
    rows["_m"] = rows["merge"].map(lambda m: MERGE_ORDER.get(m, 9))
    rows = rows.sort_values(["backbone", "n_tasks", "_m", "merge_label", "_c", "calibration_label", *cfg_cols, "budget"],
                            na_position="first").drop(columns=["_c", "_m"])
    rows = rows.reset_index(drop=True)
    rows.attrs["collapsed"] = collapsed
    return rows


def reference_rows(long: pd.DataFrame) -> pd.DataFrame:
    """Experts (each on its own task) and the base model, per backbone and task count
    (mean over the runs that evaluated them)."""
    out = []
    for stage, label in (("experts", "experts"), ("base", "base (zero-shot)")):
        sub = long[long["stage"] == stage]
        if not len(sub):
            continue
        wide = sub.pivot_table(index=["backbone", "n_tasks"], columns="task", values="accuracy", aggfunc="mean").reset_index()
        wide["merge"] = wide["merge_label"] = label
        wide["calibration"] = wide["calibration_label"] = ""
        wide["budget"] = math.nan
        out.append(wide)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def paper_table(long: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The paper-layout table (reference rows first, then one row per configuration) and its
    task columns; ``best`` lists the columns where a row's mean is the best among methods."""
    tasks = _ordered_tasks(long)
    methods = method_rows(long, runs)
    collapsed = methods.attrs.get("collapsed", [])
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
    table.attrs["config_columns"] = config_columns(runs)
    table.attrs["collapsed"] = collapsed
    return table, cols


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def display_frame(table: pd.DataFrame, cols: list[str], runs: pd.DataFrame, g: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(text cells, bold mask) of one table section: merge, calibration, budget, the other
    differing config columns, n (seeds), each task as ``mean ± std`` where n > 1, the
    average, calibration and merge wall-clock and peak memory."""
    g = table if g is None else g
    cfg_cols = [c for c in table.attrs.get("config_columns", config_columns(runs)) if c in g.columns]
    present = [c for c in cols if g[c].notna().any()]
    show_n = "n" in g.columns and (g["n"].fillna(1) > 1).any()
    header = ["merge", "calibration", "budget", *cfg_cols] + (["n"] if show_n else []) + present + ["calibrate s", "merge s", "peak MiB"]
    cells, bold = [], []
    for _, r in g.iterrows():
        best = set(str(r["best"]).split(";")) if r.get("best") else set()
        row = [str(r["merge_label"]), str(r["calibration_label"]), "—" if pd.isna(r["budget"]) else str(int(r["budget"]))]
        row += ["" if r["kind"] == "reference" else _fmt(r.get(c)) for c in cfg_cols]
        if show_n:
            row.append("" if r["kind"] == "reference" or pd.isna(r.get("n")) else str(int(r["n"])))
        for c in present:
            text = _fmt(r[c])
            sd = r.get(f"{c}_std")
            if sd is not None and not pd.isna(sd) and text != "—":
                text += f" ± {sd:.2f}"
            row.append(text)
        if r["kind"] == "reference":
            row += ["", "", ""]
        else:
            row += [_fmt(r.get("calibrate_s"), 1), _fmt(r.get("merge_s"), 1), _fmt(r.get("peak_mib"), 0)]
        cells.append(row)
        bold.append([False] * (len(header) - len(present) - 3) + [c in best for c in present] + [False] * 3)
    return pd.DataFrame(cells, columns=header), pd.DataFrame(bold, columns=header)


def _sections(table: pd.DataFrame, runs: pd.DataFrame):
    show_tasks = _varying(runs, "n_tasks")
    for (backbone, n_tasks), g in table.groupby(["backbone", "n_tasks"], sort=False):
        yield f"{backbone}" + (f", {n_tasks} tasks" if show_tasks else ""), g


def table_markdown(table: pd.DataFrame, cols: list[str], runs: pd.DataFrame) -> str:
    """Markdown (pandas ``to_markdown``), one section per backbone and task count, the best
    mean per column in bold."""
    lines = []
    for title, g in _sections(table, runs):
        cells, bold = display_frame(table, cols, runs, g)
        cells = cells.where(~bold, "**" + cells + "**")
        lines += [f"## {title}", "", cells.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def table_latex(table: pd.DataFrame, cols: list[str], runs: pd.DataFrame) -> str:
    """LaTeX (pandas ``Styler.to_latex``, booktabs rules), one tabular per section, the best
    mean per column in bold."""
    parts = []
    for title, g in _sections(table, runs):
        cells, bold = display_frame(table, cols, runs, g)
        styler = cells.style.hide(axis="index").format(escape="latex")
        styler = styler.apply(lambda _df: bold.replace({True: "font-weight: bold;", False: ""}), axis=None)
        tex = styler.to_latex(hrules=True, convert_css=True, column_format="l" * cells.shape[1])
        title_tex = title.replace("_", r"\_")
        parts.append(f"% {title}\n\\paragraph{{{title_tex}}}\n" + tex.replace("±", r"$\pm$"))
    return "\n".join(parts)


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
    # configurations stay apart (an ablation is not averaged into the default): labelled by
    # their differing settings, matched to the paper by the calibrator's name
    mine["label"] = mine["calibration_label"].astype(str) if "calibration_label" in mine else mine["method"]
    mine["config"] = mine["config_id"].astype(str) if "config_id" in mine else ""
    experts = df[stage == "experts"].copy()
    experts["method"] = experts["label"] = "experts"
    experts["merge"] = ""
    experts["budget"] = ""
    experts["config"] = ""
    rows = pd.concat([mine, experts], ignore_index=True)
    keys = ["backbone", "method", "label", "config", "merge", "budget", "task"]
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
            "backbone": r["backbone"], "method": r["method"], "label": r.get("label", r["method"]), "merge": r["merge"], "budget": r["budget"], "task": r["task"],
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
        lines.append(f"| {r['backbone']} | {r['merge'] or '—'} | {r['label']} | {r['budget'] or '—'} | {r['tasks']} | {_fmt(r['ours'])} | "
                     f"{_fmt(r['paper'])} | {_fmt(r['delta'])} | {r['runs']} | {r['source']} |")
    lines.append("")
    tasks = [t for t in dict.fromkeys(matched["task"]) if t != AVERAGE]
    lines += ["## Per task (%): ours / paper", ""]
    lines += ["| backbone | merge | method | budget | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 5)]
    for (bb, merge, method, budget), g in matched.groupby(["backbone", "merge", "label", "budget"], sort=False):
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
        ax.set_title(f"{bb}, {merge}" + (f", {nt} tasks" if _varying(runs, "n_tasks") else ""), fontsize=10)
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
    if not _varying(runs, "n_tasks"):
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


# ---- W&B ---------------------------------------------------------------------------------
def report_run_id(group: str) -> str:
    """The W&B id of a sweep's report run: the same for every featcal-report of that group,
    so a new report updates its run instead of adding one."""
    return "report-" + hashlib.sha256(group.encode()).hexdigest()[:12]


def log_to_wandb(info: dict[str, Any], figures: list[Path], table: pd.DataFrame, out: Path) -> str | None:
    """Log the figures and the sweep table as the sweep's one report run (``job_type=report``)
    in the W&B group, project and mode its runs recorded in their results.json. Returns the
    W&B run folder, or None when the sweep did not log to W&B."""
    groups = sorted(info["groups"])
    if not groups:
        return None
    logger = info.get("logger") or {}
    mode = str(logger.get("mode") or "offline")
    if mode == "disabled":
        return None
    import wandb

    from featcal.wandb_log import check_offline_run, remove_offline_runs

    run_id = report_run_id(groups[0])
    if mode == "offline":  # the previous report of this sweep, not synced: replaced, not doubled
        remove_offline_runs(out, run_id)
    run = wandb.init(
        project=logger.get("project") or "featcal", entity=logger.get("entity"), group=groups[0], id=run_id, resume="allow",
        name=f"report {groups[0]}", job_type="report", mode=mode, dir=str(out), reinit="finish_previous",
        config={"groups": groups}, tags=["report"],
    )
    try:
        payload: dict[str, Any] = {f"report/{p.stem}": wandb.Image(str(p)) for p in figures}
        clean = table.drop(columns=["kind"], errors="ignore").astype(object).where(table.notna(), None)
        payload["report/sweep_table"] = wandb.Table(dataframe=clean)
        run.log(payload)
        folder = getattr(run, "dir", None)
    finally:
        run.finish()
        with contextlib.suppress(Exception):
            wandb.teardown()  # the offline run file is complete once W&B's service stops
    if mode == "offline" and folder:  # a full disk truncates the file without an error
        problem = check_offline_run(Path(folder).parent)
        if problem:
            raise RuntimeError(f"the offline report run is corrupt or incomplete: {problem}")
    return folder


# ---- entry point -------------------------------------------------------------------------
def report(inputs: list[Path], out: Path, paper_dir: Path = DEFAULT_PAPER_DIR, use_wandb: bool = True) -> dict[str, Any]:
    long, runs, drift, info = load(inputs)
    out.mkdir(parents=True, exist_ok=True)
    table, cols = paper_table(long, runs)
    written: dict[str, Any] = {"notes": []}
    cfg_cols = config_columns(runs)
    seeds = int(table["n"].max()) if "n" in table and table["n"].notna().any() else 1

    header = (f"# Sweep report\n\n{runs['run_dir'].nunique()} runs from {', '.join(str(p) for p in inputs)}. "
              f"Each task's primary metric ({', '.join(sorted(info['metrics'] - {''})) or 'accuracy'}, %) of the final model (calibrated; merged when calibration is none). "
              "One row per configuration: settings that differ between runs of one merge x calibration are named in the "
              "labels" + (f" or shown as columns ({', '.join(cfg_cols)})" if cfg_cols else "") + "; "
              + ("runs identical but for the seed are averaged: mean ± std over n seeds. " if seeds > 1 else "one seed per configuration (n = 1). ")
              + "**Bold**: best mean per column. Budget: calibration examples per task (— : no calibration data used). "
              "Peak memory: " + "; ".join(sorted(set(runs["memory_kind"]))) + ".\n")
    sections = []
    if info["duplicates"]:
        rows = [{"configuration": d["label"], "kept (newest)": d["kept"], "not averaged": ", ".join(d["dropped"])} for d in info["duplicates"]]
        sections.append(f"## Duplicate runs ({len(rows)}): same configuration and seed, only the newest is used\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        written["notes"] += [f"duplicate: {d['label']}: kept {d['kept']}, not averaged: {', '.join(d['dropped'])}" for d in info["duplicates"]]
    if table.attrs.get("collapsed"):
        def _vals(v: list) -> str:
            return " / ".join("—" if x is None else f"{x:.1f}" for x in v)
        rows = [{"configuration": d["label"], "budgets": " / ".join(str(b) for b in d["budgets"]),
                 "calibrate s": _vals(d["calibrate_s"]), "merge s": _vals(d["merge_s"]), "peak MiB": _vals(d["peak_mib"])}
                for d in table.attrs["collapsed"]]
        sections.append(f"## Calibration-free runs shown once ({len(rows)}): the same configuration run at several budgets "
                        "(no calibration data used, identical scores); the table's cost columns are their mean, each run's own below\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        written["notes"] += [f"shown once: {r['configuration']} ran at budgets {r['budgets']} with identical scores; "
                             f"cost columns are the mean (peak MiB {r['peak MiB']})" for r in rows]
    if info["wandb_problems"]:
        rows = [{"offline W&B run": str(run), "problem": problem} for run, problem in info["wandb_problems"]]
        sections.append(f"## Corrupt or incomplete offline W&B runs ({len(rows)}): do not `wandb sync` them; "
                        "featcal-run of their configuration sets them aside and logs the results again\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        written["notes"] += [f"W&B: corrupt or incomplete offline run {run}: {problem}" for run, problem in info["wandb_problems"]]
    for sweep in info["sweeps"]:
        md = sweep.markdown()
        if md:
            sections.append(f"<!-- {sweep.root} -->\n" + md)
            written["notes"] += sweep.lines()
    atomic_write_text(out / "table.md", header + "\n" + table_markdown(table, cols, runs) + ("\n" + "\n".join(sections) if sections else ""))
    atomic_write_text(out / "table.tex", table_latex(table, cols, runs))
    stds = [f"{c}_std" for c in cols if f"{c}_std" in table.columns]
    csv_cols = (["kind", "backbone", "n_tasks", "merge", "calibration", "budget", *cfg_cols, "n"]
                + cols + stds + ["calibrate_s", "merge_s", "peak_mib", "best", "merge_name", "calibration_name", "config_id"])
    labelled = table.assign(merge_name=table["merge"], calibration_name=table["calibration"],
                            merge=table["merge_label"], calibration=table["calibration_label"])
    atomic_write_text(out / "table.csv", labelled.reindex(columns=csv_cols).to_csv(index=False))
    written["tables"] = [out / "table.md", out / "table.tex", out / "table.csv"]

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
    for note in written["notes"]:
        print(note)
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
