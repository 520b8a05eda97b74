"""experiments/bench_suite_build.py part 1 runs (its timings are a script's, never a test's):
the default spec's base step under the three kernel settings, each in a child process, and
the ratios it prints are those of the CPU seconds it prints."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pin_costs_are_printed_from_the_measured_seconds():
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_suite_build.py"), "--steps", "1", "--suites", "embedded"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seconds = {name: float(s) for name, s in re.findall(r"embedded\s+(native|pinned|baseline)\s+\(\w+\): ([\d.]+) CPU s",
                                                          proc.stdout)}
    assert set(seconds) == {"native", "pinned", "baseline"} and all(s > 0 for s in seconds.values()), proc.stdout
    ratios = dict(re.findall(r"(pinned/native|baseline/native) ([\d.]+)", proc.stdout))
    # printed with two decimals from the unrounded seconds; ours come from seconds printed with
    # one decimal (±0.05 s each), which bounds the difference
    for other in ("pinned", "baseline"):
        ratio = seconds[other] / seconds["native"]
        bound = ratio * (0.05 / seconds["native"] + 0.05 / seconds[other]) + 0.005
        assert float(ratios[f"{other}/native"]) == pytest.approx(ratio, abs=bound)
