"""FLAN-T5 / GLUE end to end through ``python -m featcal.run`` on the tiny offline T5 world
(``tests/fixtures/t5.py``, fixture ``w``), with FeatCal and with Surgery."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.t5 import EXPERT_TASKS


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["featcal", "surgery"])
def test_flan_t5_backbone_through_featcal_run(w, tmp_path, calibration):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HOME=str(tmp_path / "home"),
               FEATCAL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    overrides = [
        "backbone=flan_t5_base_glue",
        f"backbone.adapter.tasks=[{','.join(EXPERT_TASKS)}]",
        f"backbone.adapter.base={w['base']}",
        *[f"backbone.adapter.experts.{t}={w['experts'][t]}" for t in EXPERT_TASKS],
        f"backbone.taskpool.datasets={w['data']}",
        "backbone.taskpool.progress=false",
    ]
    cmd = [sys.executable, "-m", "featcal.run", *overrides, "merge=task_arithmetic", f"calibration={calibration}",
           "budget.per_task=8", "budget.batch_size=4", "eval_batch_size=8", "logger=none", "device=cpu", f"hydra.run.dir={out}"]
    if calibration == "surgery":
        cmd.append("calibration.iterations=5")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == EXPERT_TASKS
    assert res["primary_metric"] == {"cola": "accuracy", "mnli": "accuracy", "rte": "accuracy", "stsb": "spearman"}
    for stage in ("experts", "base", "merged", "calibrated"):
        assert set(res["score"][stage]) == set(EXPERT_TASKS) | {"average"}
    assert set(res["metrics"]["calibrated"]["stsb"]) == {"spearman"}
    assert res["timings"]["calibrate"] > 0
    if calibration == "featcal":
        blocks = {r["block"] for r in res["drift"]}
        assert blocks == {0, 1, 2, 3}  # two encoder blocks, then two decoder blocks
        for t in res["tasks"]:  # the last decoder block drifts less from every expert
            d = {r["when"]: r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == 3}
            assert d["after"] < d["before"], t
    else:
        extra = res["calibration_report"]["extra"]
        assert extra["l1_after_mean"] < extra["l1_before_mean"]
    assert "stsb" in proc.stdout  # the per-task table is printed
