"""The embedded default, exactly as a new user runs it: `featcal-run` with no overrides.

Cold: the benchmark is built into an empty cache (FEATCAL_CACHE), then merged with Task
Arithmetic, calibrated with FeatCal, evaluated and logged to an offline W&B run. This is
the slowest test (a few minutes on 2 CPU cores) and the one closest to what users see.
"""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.fixtures.wandb_records import read_offline_run


#: points FeatCal (default budget) must add over Task Arithmetic on the default build
CALIBRATION_GAIN = 1.0


@pytest.mark.slow
def test_featcal_run_default(tmp_path, default_suite_cache):
    env = dict(os.environ, FEATCAL_CACHE=str(default_suite_cache), HOME=str(tmp_path / "home"), WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(["featcal-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (res_file,) = list((tmp_path / "outputs").rglob("results.json"))
    res = json.loads(res_file.read_text())
    acc = res["score"]
    assert res["backbone"] == "embedded" and res["merge"] == "task_arithmetic" and res["calibration"] == "featcal"
    assert len(res["tasks"]) >= 6
    # the regime of real merging benchmarks (issue 11): base < merged < experts, merging
    # well worth doing (>= 8 points over the base) and a gap left to the experts (>= 10)
    assert acc["experts"]["average"] >= 90.0
    assert acc["merged"]["average"] >= acc["base"]["average"] + 8.0
    assert acc["merged"]["average"] <= acc["experts"]["average"] - 10.0
    # FeatCal raises accuracy over the merged model on the embedded benchmark
    assert acc["calibrated"]["average"] > acc["merged"]["average"] + CALIBRATION_GAIN
    # and reduces the final-block feature drift for every task
    drift = pd.read_csv(res_file.parent / "drift.csv")
    last = drift["block"].max()
    for task in res["tasks"]:
        before = drift[(drift.task == task) & (drift.block == last) & (drift["when"] == "before")].drift.item()
        after = drift[(drift.task == task) & (drift.block == last) & (drift["when"] == "after")].drift.item()
        assert after < before, task
    assert "| average" in proc.stdout
    # the results name the build they came from (issue 27): the portable CPU build
    (manifest,) = list((default_suite_cache / "embedded").glob("*/manifest.json"))
    manifest = json.loads(manifest.read_text())
    assert res["suite"] == {"name": "embedded", "spec_hash": manifest["spec_hash"], "content_hash": manifest["content_hash"],
                            "portable": True, "note": manifest["portability_note"]}
    (run,) = list(res_file.parent.glob("wandb/offline-run-*"))
    assert read_offline_run(run)["summary"]["score/calibrated/average"] == acc["calibrated"]["average"]
    # a rerun (warm cache, same seed) gives the same numbers
    again = tmp_path / "again"
    again.mkdir()
    proc2 = subprocess.run(["featcal-run"], cwd=again, env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-5000:]
    (res_file2,) = list((again / "outputs").rglob("results.json"))
    assert json.loads(res_file2.read_text())["score"] == acc
