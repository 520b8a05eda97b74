#!/usr/bin/env python
"""Put a sweep's collected results beside the published numbers in results/paper/*.csv.

    python experiments/compare_to_paper.py multirun/.../collected.csv [--out comparison.md] [--csv-out m.csv]

Kept for old commands: the comparison lives in ``featcal.sweep_report`` and
``featcal-report <sweep folder | collected.csv>`` writes it (``vs_paper.md``) together with
the sweep's tables and figures. Matching rules: see ``featcal.sweep_report.compare``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from featcal.sweep_report import DEFAULT_PAPER_DIR, compare, comparison_markdown, load_paper, ours_for_paper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_csv", type=Path, help="long CSV from featcal-collect")
    ap.add_argument("--paper-dir", type=Path, default=DEFAULT_PAPER_DIR)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: beside the sweep CSV)")
    ap.add_argument("--csv-out", type=Path, default=None, help="also write the matched rows as CSV")
    args = ap.parse_args(argv)
    matched, refs = compare(ours_for_paper(pd.read_csv(args.sweep_csv)), load_paper(args.paper_dir))
    text = comparison_markdown(matched, refs)
    print(text)
    out = args.out or args.sweep_csv.with_name(args.sweep_csv.stem + "_vs_paper.md")
    out.write_text(text + "\n")
    if args.csv_out:
        matched.to_csv(args.csv_out, index=False)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
