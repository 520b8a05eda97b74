"""Our sweep beside the published numbers (``results/paper/*.csv``): ``vs_paper.md`` /
``vs_paper.csv`` of ``featcal-report``, and ``featcal-report paper <collected.csv>``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from featcal.paths import paper_dir as _paper_dir
from featcal.report.sweep_tables import AVERAGE, CAL_ORDER, fmt
from featcal.utils import atomic_write_text

MATCH_PROTOCOLS = {"train-split calibration", "individual fine-tuned experts", "merge only (no calibration data)"}
DEFAULT_PAPER_DIR = _paper_dir()  # results/paper in a checkout, the wheel's copy when installed


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
        lines.append(f"| {r['backbone']} | {r['merge'] or '—'} | {r['label']} | {r['budget'] or '—'} | {r['tasks']} | {fmt(r['ours'])} | "
                     f"{fmt(r['paper'])} | {fmt(r['delta'])} | {r['runs']} | {r['source']} |")
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
            cells.append(fmt(ours) if paper is None or pd.isna(paper) else f"{fmt(ours)} / {fmt(paper)}")
        lines.append(f"| {bb} | {merge or '—'} | {method} | {budget or '—'} | " + " | ".join(cells) + " |")
    lines.append("")
    if len(refs):
        lines += ["## Published references under other protocols (not matched)", "",
                  "| backbone | merge | method | task | accuracy | protocol | source |", "|---|---|---|---|---|---|---|"]
        for _, r in refs.iterrows():
            lines.append(f"| {r['backbone']} | {r['merge']} | {r['method']} | {r['task']} | {fmt(r['accuracy'])} | {r['protocol']} | {r['source']} |")
        lines.append("")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    """``featcal-report paper <collected.csv> [--paper-dir DIR] [--out FILE] [--csv-out FILE]``."""
    ap = argparse.ArgumentParser(prog="featcal-report paper", description="Put a sweep's collected results beside the published "
                                 "numbers in results/paper/*.csv (featcal-report writes the same comparison as vs_paper.md).")
    ap.add_argument("sweep_csv", type=Path, help="long CSV from featcal-report collect")
    ap.add_argument("--paper-dir", type=Path, default=DEFAULT_PAPER_DIR)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: beside the sweep CSV)")
    ap.add_argument("--csv-out", type=Path, default=None, help="also write the matched rows as CSV")
    args = ap.parse_args(argv)
    try:
        matched, refs = compare(ours_for_paper(pd.read_csv(args.sweep_csv)), load_paper(args.paper_dir))
    except (FileNotFoundError, ValueError) as err:
        print(f"featcal-report paper: {err}", file=sys.stderr)
        return 2
    text = comparison_markdown(matched, refs)
    print(text)
    out = args.out or args.sweep_csv.with_name(args.sweep_csv.stem + "_vs_paper.md")
    atomic_write_text(out, text + "\n")
    if args.csv_out:
        matched.to_csv(args.csv_out, index=False)
    print(f"wrote {out}", file=sys.stderr)
    return 0
