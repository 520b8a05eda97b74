"""experiments/embedded_report.py on the default build (the session's default suite cache,
built by the default run's test when it ran first): its per-task base and expert scores
are those the build measured itself (``manifest.json``: the build's own embedding and head
code, not the task pool's evaluation the report uses), its averages are the means of its
rows, and its Markdown renders from its JSON alone."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_report_agrees_with_the_build_and_with_itself(tmp_path, default_suite_cache):
    out, raw = tmp_path / "report.md", tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "embedded_report.py"), "--cache-dir", str(default_suite_cache),
           "--out", str(out), "--json", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(raw.read_text())
    manifest = json.loads((Path(report["folder"]) / "manifest.json").read_text())
    acc, tasks = report["accuracy"], report["tasks"]
    for row, measured in (("base (zero-shot)", "base_zero_shot"), ("experts", "experts")):
        for task in tasks:
            assert acc[row][task] == pytest.approx(manifest["metrics"][measured][task], abs=1e-3), (row, task)
    for row, scores in acc.items():
        per_task = [scores[t] for t in tasks]
        assert f"**{sum(per_task) / len(per_task):.2f}**" in out.read_text(), row
    # --from-json re-renders the same Markdown
    again = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "embedded_report.py"), "--from-json", str(raw),
                           "--out", str(again)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.read_text() == out.read_text()
