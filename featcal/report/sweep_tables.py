"""The paper-layout tables of a sweep: one row per configuration (seeds averaged), the
experts and base model as reference rows, the best mean per column in bold; Markdown and
LaTeX renderings (``table.md`` / ``table.tex``)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

AVERAGE = "average"
MERGE_ORDER = {"weight_average": 0, "task_arithmetic": 1, "ties": 2, "dare": 3, "regmean": 4, "adamerging": 5}
CAL_ORDER = {"none": 0, "featcal": 1, "featcal_paper": 2, "surgery": 3, "probsurgery": 4, "probsurgery_shared": 5}


def _ordered_tasks(long: pd.DataFrame) -> list[str]:
    return [t for t in dict.fromkeys(long["task"]) if t != AVERAGE]


def varies(runs: pd.DataFrame, col: str) -> bool:
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


def fmt(v: Any, digits: int = 2) -> str:
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
    present = [c for c in cols if c in g.columns and g[c].notna().any()]
    show_n = "n" in g.columns and (g["n"].fillna(1) > 1).any()
    header = ["merge", "calibration", "budget", *cfg_cols] + (["n"] if show_n else []) + present + ["calibrate s", "merge s", "peak MiB"]
    cells, bold = [], []
    for _, r in g.iterrows():
        best = set(str(r["best"]).split(";")) if r.get("best") else set()
        row = [str(r["merge_label"]), str(r["calibration_label"]), "—" if pd.isna(r["budget"]) else str(int(r["budget"]))]
        row += ["" if r["kind"] == "reference" else fmt(r.get(c)) for c in cfg_cols]
        if show_n:
            row.append("" if r["kind"] == "reference" or pd.isna(r.get("n")) else str(int(r["n"])))
        for c in present:
            text = fmt(r[c])
            sd = r.get(f"{c}_std")
            if sd is not None and not pd.isna(sd) and text != "—":
                text += f" ± {sd:.2f}"
            row.append(text)
        if r["kind"] == "reference":
            row += ["", "", ""]
        else:
            row += [fmt(r.get("calibrate_s"), 1), fmt(r.get("merge_s"), 1), fmt(r.get("peak_mib"), 0)]
        cells.append(row)
        bold.append([False] * (len(header) - len(present) - 3) + [c in best for c in present] + [False] * 3)
    return pd.DataFrame(cells, columns=header), pd.DataFrame(bold, columns=header)


def _sections(table: pd.DataFrame, runs: pd.DataFrame):
    show_tasks = varies(runs, "n_tasks")
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

