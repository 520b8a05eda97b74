"""experiments/bench_llm_memory.py runs end to end on a tiny decoder (its figures come from
the script on real sizes, never from a test): every mode finishes, the streamed and the
in-memory calibrated models are written, and the report has one row per depth with the
ratio computed from its own columns."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_depth_series_runs_and_reports_its_own_ratios(tmp_path):
    out = tmp_path / "mem"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_llm_memory.py"), "--depths", "2,3", "--widths", "",
           "--hidden", "64", "--tasks", "2", "--n", "2", "--seq", "16", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["depth"].unique()) == [2, 3]
    assert sorted(df["mode"].unique()) == ["in-memory", "streaming", "streaming-seq"] and len(df) == 6
    assert (df["wall_s"] > 0).all() and (df["peak_above_baseline_mib"] > 0).all()
    table = out.with_suffix(".md").read_text()
    for depth in (2, 3):
        rows = df[df["depth"] == depth].set_index("mode")
        line = next(l for l in table.splitlines() if l.startswith(f"| {depth} | 64 |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        # the wall ratio column is streaming / in-memory of this depth's own rows
        assert cells[10] == f"{rows.loc['streaming', 'wall_s'] / rows.loc['in-memory', 'wall_s']:.2f}x"
        assert cells[7] == f"{rows.loc['in-memory', 'wall_s']:.1f}"
