#!/usr/bin/env python
"""Put a sweep's collected results beside the published numbers in results/paper/*.csv.

    python experiments/compare_to_paper.py multirun/.../results.csv [--out comparison.md]

Input: the long CSV written by ``featcal-collect`` (columns run_dir, backbone, merge,
calibration, budget, task, stage, accuracy; stage is "experts", "merged" or
"calibrated"). Ours for a run is its "calibrated" accuracy (its "merged" accuracy
when calibration is none); expert rows become method "experts". Several runs of
one configuration (seeds) are averaged. The average over tasks is recomputed from
the per-task rows.

Paper rows are matched on (backbone, method, merge, budget); a paper row without a
budget (merge-only numbers, experts) matches every budget. A sweep backbone matches
a paper backbone when its name starts with it (clip_vit_b32_openclip -> clip_vit_b32).
The "tasks" column counts the tasks in our average (the paper averages all eight).
Published numbers from another protocol (the original, transductive Surgery) are
listed as references, not matched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from featcal.collect import metric_column

AVERAGE_NAMES = {"average", "avg", "mean"}
MATCH_PROTOCOLS = {"train-split calibration", "individual fine-tuned experts"}
DEFAULT_PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"


def load_paper(paper_dir: Path) -> pd.DataFrame:
    frames = [pd.read_csv(f, dtype={"budget": "string"}, keep_default_na=False) for f in sorted(Path(paper_dir).glob("*.csv"))]
    if not frames:
        raise SystemExit(f"no paper CSVs in {paper_dir}")
    paper = pd.concat(frames, ignore_index=True)
    paper["budget"] = paper["budget"].astype(str).str.strip()
    paper["accuracy"] = pd.to_numeric(paper["accuracy"])
    for col in ("protocol", "note", "source"):
        if col not in paper:
            paper[col] = ""
    return paper


def load_ours(sweep_csv: Path) -> pd.DataFrame:
    df = metric_column(pd.read_csv(sweep_csv), "accuracy")
    need = {"backbone", "merge", "calibration", "budget", "task", "stage", "accuracy"}
    missing = need - set(df.columns)
    if missing:
        raise SystemExit(f"{sweep_csv} lacks columns {sorted(missing)}")
    df = df[~df["task"].astype(str).str.lower().isin(AVERAGE_NAMES)].copy()
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
    avg["task"] = "average"
    return pd.concat([per_task, avg[per_task.columns]], ignore_index=True)


def _paper_backbone(ours: str, paper_backbones: list[str]) -> str | None:
    hits = [p for p in paper_backbones if ours == p or ours.startswith(p + "_") or ours.startswith(p)]
    return max(hits, key=len) if hits else None


def _fmt(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{x:.2f}"


def compare(ours: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched rows: ours vs paper per configuration and task, unmatched references)."""
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


def to_markdown(matched: pd.DataFrame, refs: pd.DataFrame) -> str:
    lines = ["# Our sweep vs the published numbers", ""]
    if matched.empty:
        lines += ["(no runs in the sweep CSV)", ""]
        return "\n".join(lines)
    order = {"experts": 0, "none": 1, "featcal": 2, "surgery": 3, "probsurgery": 4}
    avg = matched[matched["task"] == "average"].copy()
    avg["_o"] = avg["method"].map(lambda m: order.get(m, 9))
    avg["_b"] = pd.to_numeric(avg["budget"], errors="coerce").fillna(-1)
    avg = avg.sort_values(["backbone", "merge", "_o", "_b"])
    lines += ["## Average accuracy over tasks (%)", "",
              "| backbone | merge | method | budget | tasks | ours | paper | Δ (ours − paper) | runs | source |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in avg.iterrows():
        lines.append(f"| {r['backbone']} | {r['merge'] or '—'} | {r['method']} | {r['budget'] or '—'} | {r['tasks']} | {_fmt(r['ours'])} | "
                     f"{_fmt(r['paper'])} | {_fmt(r['delta'])} | {r['runs']} | {r['source']} |")
    lines.append("")
    tasks = [t for t in dict.fromkeys(matched["task"]) if t != "average"]
    lines += ["## Per task (%): ours / paper", ""]
    header = "| backbone | merge | method | budget | " + " | ".join(tasks) + " | average |"
    lines += [header, "|" + "---|" * (len(tasks) + 5)]
    for (bb, merge, method, budget), g in matched.groupby(["backbone", "merge", "method", "budget"], sort=False):
        cells = []
        for t in tasks + ["average"]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_csv", type=Path, help="long CSV from featcal-collect")
    ap.add_argument("--paper-dir", type=Path, default=DEFAULT_PAPER_DIR)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: beside the sweep CSV)")
    ap.add_argument("--csv-out", type=Path, default=None, help="also write the matched rows as CSV")
    args = ap.parse_args(argv)
    matched, refs = compare(load_ours(args.sweep_csv), load_paper(args.paper_dir))
    text = to_markdown(matched, refs)
    print(text)
    out = args.out or args.sweep_csv.with_name(args.sweep_csv.stem + "_vs_paper.md")
    out.write_text(text + "\n")
    if args.csv_out:
        matched.to_csv(args.csv_out, index=False)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
