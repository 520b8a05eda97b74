"""``featcal-report`` (the default command, also ``featcal-report report``): a sweep's tables,
its comparison with the published numbers, and figures.

    featcal-report multirun/2026-11-26/17-05-00                  # -> multirun/.../report/
    featcal-report multirun/a multirun/b --out results/my_report  # several sweeps in one report
    featcal-report multirun/.../collected.csv                     # a featcal-report collect CSV

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

The other commands of the tool (``featcal-report <command> -h``): ``collect`` (one CSV and a
Markdown table of a sweep, ``featcal.report.collect``), ``table`` (TA vs TA + each
calibrator per budget, ``featcal.report.calibration_table``), ``paper`` (a collected CSV
beside the published numbers, ``featcal.report.paper``), ``figures`` (only the figures).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from featcal.report.figures import figure_accuracy, figure_cost, figure_drift, figure_scaling
from featcal.report.load import load
from featcal.report.paper import DEFAULT_PAPER_DIR, compare, comparison_markdown, load_paper, ours_for_paper
from featcal.report.sweep_tables import config_columns, paper_table, table_latex, table_markdown
from featcal.report.wandb_report import log_to_wandb
from featcal.utils import atomic_write_text


def _header(inputs: list[Path], runs: pd.DataFrame, info: dict[str, Any], table: pd.DataFrame) -> str:
    """The first paragraph of table.md: what the rows are and how they were made."""
    cfg_cols = config_columns(runs)
    seeds = int(table["n"].max()) if "n" in table and table["n"].notna().any() else 1
    return (f"# Sweep report\n\n{runs['run_dir'].nunique()} runs from {', '.join(str(p) for p in inputs)}. "
            f"Each task's primary metric ({', '.join(sorted(info['metrics'] - {''})) or 'accuracy'}, %) of the final model (calibrated; merged when calibration is none). "
            "One row per configuration: settings that differ between runs of one merge x calibration are named in the "
            "labels" + (f" or shown as columns ({', '.join(cfg_cols)})" if cfg_cols else "") + "; "
            + ("runs identical but for the seed are averaged: mean ± std over n seeds. " if seeds > 1 else "one seed per configuration (n = 1). ")
            + "**Bold**: best mean per column. Budget: calibration examples per task (— : no calibration data used). "
            "Peak memory: " + "; ".join(sorted(set(runs["memory_kind"]))) + ".\n")


def _notes(info: dict[str, Any], table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(Markdown sections below the tables, one-line notes for stdout): duplicate runs,
    calibration-free runs shown once, corrupt offline W&B runs, incomplete jobs."""
    sections: list[str] = []
    notes: list[str] = []
    if info["duplicates"]:
        rows = [{"configuration": d["label"], "kept (newest)": d["kept"], "not averaged": ", ".join(d["dropped"])} for d in info["duplicates"]]
        sections.append(f"## Duplicate runs ({len(rows)}): same configuration and seed, only the newest is used\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        notes += [f"duplicate: {d['label']}: kept {d['kept']}, not averaged: {', '.join(d['dropped'])}" for d in info["duplicates"]]
    if table.attrs.get("collapsed"):
        def _vals(v: list) -> str:
            return " / ".join("—" if x is None else f"{x:.1f}" for x in v)
        rows = [{"configuration": d["label"], "budgets": " / ".join(str(b) for b in d["budgets"]),
                 "calibrate s": _vals(d["calibrate_s"]), "merge s": _vals(d["merge_s"]), "peak MiB": _vals(d["peak_mib"])}
                for d in table.attrs["collapsed"]]
        sections.append(f"## Calibration-free runs shown once ({len(rows)}): the same configuration run at several budgets "
                        "(no calibration data used, identical scores); the table's cost columns are their mean, each run's own below\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        notes += [f"shown once: {r['configuration']} ran at budgets {r['budgets']} with identical scores; "
                  f"cost columns are the mean (peak MiB {r['peak MiB']})" for r in rows]
    if info["wandb_problems"]:
        rows = [{"offline W&B run": str(run), "problem": problem} for run, problem in info["wandb_problems"]]
        sections.append(f"## Corrupt or incomplete offline W&B runs ({len(rows)}): do not `wandb sync` them; "
                        "featcal-run of their configuration sets them aside and logs the results again\n\n"
                        + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        notes += [f"W&B: corrupt or incomplete offline run {run}: {problem}" for run, problem in info["wandb_problems"]]
    for sweep in info["sweeps"]:
        md = sweep.markdown()
        if md:
            sections.append(f"<!-- {sweep.root} -->\n" + md)
            notes += sweep.lines()
    return sections, notes


def _write_tables(out: Path, header: str, sections: list[str], table: pd.DataFrame, cols: list[str], runs: pd.DataFrame) -> list[Path]:
    """table.md, table.tex and table.csv."""
    cfg_cols = config_columns(runs)
    atomic_write_text(out / "table.md", header + "\n" + table_markdown(table, cols, runs) + ("\n" + "\n".join(sections) if sections else ""))
    atomic_write_text(out / "table.tex", table_latex(table, cols, runs))
    stds = [f"{c}_std" for c in cols if f"{c}_std" in table.columns]
    csv_cols = (["kind", "backbone", "n_tasks", "merge", "calibration", "budget", *cfg_cols, "n"]
                + cols + stds + ["calibrate_s", "merge_s", "peak_mib", "best", "merge_name", "calibration_name", "config_id"])
    labelled = table.assign(merge_name=table["merge"], calibration_name=table["calibration"],
                            merge=table["merge_label"], calibration=table["calibration_label"])
    atomic_write_text(out / "table.csv", labelled.reindex(columns=csv_cols).to_csv(index=False))
    return [out / "table.md", out / "table.tex", out / "table.csv"]


def _write_vs_paper(out: Path, long: pd.DataFrame, runs: pd.DataFrame, paper_dir: Path, written: dict[str, Any]) -> None:
    """vs_paper.md / vs_paper.csv where published numbers exist for the sweep's backbones."""
    paper = load_paper(paper_dir) if Path(paper_dir).is_dir() else None
    if paper is None:
        return
    matched, refs = compare(ours_for_paper(long), paper)
    if len(matched) and matched["paper"].notna().any():
        atomic_write_text(out / "vs_paper.md", comparison_markdown(matched, refs) + "\n")
        atomic_write_text(out / "vs_paper.csv", matched.to_csv(index=False))
        written["tables"] += [out / "vs_paper.md", out / "vs_paper.csv"]
    else:
        written["vs_paper"] = f"no published numbers for backbone(s) {sorted(set(runs['backbone']))}"


def write_figures(long: pd.DataFrame, runs: pd.DataFrame, drift: pd.DataFrame, info: dict[str, Any], out: Path) -> list[Path]:
    """The figures that apply to the sweep (accuracy_vs_budget, cost, drift, scaling)."""
    metrics = info["metrics"] - {""}
    metric = next(iter(metrics)) if len(metrics) == 1 else "primary metric"
    figures = [figure_accuracy(long, runs, out / "accuracy_vs_budget.png", metric), figure_cost(runs, out / "cost.png"),
               figure_drift(drift, out / "drift.png"), figure_scaling(long, runs, out / "scaling.png", metric)]
    return [f for f in figures if f is not None]


def report(inputs: list[Path], out: Path, paper_dir: Path = DEFAULT_PAPER_DIR, use_wandb: bool = True) -> dict[str, Any]:
    """The whole report of ``inputs`` into ``out``: tables, the comparison with the published
    numbers, figures, and the W&B report run. Returns what was written and the notes."""
    long, runs, drift, info = load(inputs)
    out.mkdir(parents=True, exist_ok=True)
    table, cols = paper_table(long, runs)
    sections, notes = _notes(info, table)
    written: dict[str, Any] = {"notes": notes}
    written["tables"] = _write_tables(out, _header(inputs, runs, info, table), sections, table, cols, runs)
    _write_vs_paper(out, long, runs, paper_dir, written)
    written["figures"] = write_figures(long, runs, drift, info, out)
    written["wandb"] = None
    if use_wandb:
        try:
            written["wandb"] = log_to_wandb(info, written["figures"], table, out)
        except Exception as err:  # the files are written either way
            written["wandb_error"] = f"{type(err).__name__}: {err}"
    written["table"] = table
    written["columns"] = cols
    return written


def default_out(inputs: list[Path]) -> Path:
    """``<first input>/report`` (a folder) or ``report/`` beside a CSV."""
    first = inputs[0]
    return (first if first.is_dir() else first.parent) / "report"


def main(argv: list[str] | None = None) -> int:
    """``featcal-report <sweep folders | collected CSVs> [--out DIR] [--paper-dir DIR] [--no-wandb]``."""
    parser = argparse.ArgumentParser(prog="featcal-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="sweep folders (holding run folders) and/or featcal-report collect CSVs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first input>/report)")
    parser.add_argument("--paper-dir", type=Path, default=DEFAULT_PAPER_DIR, help="published numbers (results/paper)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to the sweep's W&B group")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.inputs)
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


def figures_main(argv: list[str] | None = None) -> int:
    """``featcal-report figures <sweep folders | collected CSVs> [--out DIR]``: the figures alone."""
    parser = argparse.ArgumentParser(prog="featcal-report figures", description="Only the figures of a sweep report "
                                     "(accuracy_vs_budget.png, cost.png, drift.png, scaling.png), the same files featcal-report writes.")
    parser.add_argument("inputs", nargs="+", type=Path, help="sweep folders (holding run folders) and/or featcal-report collect CSVs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first input>/report)")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.inputs)
    try:
        long, runs, drift, info = load(args.inputs)
    except (FileNotFoundError, ValueError) as err:
        print(f"featcal-report figures: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for path in write_figures(long, runs, drift, info, out):
        print(f"wrote {path}")
    return 0
