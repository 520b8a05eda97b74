"""The CLIP ViT-B/32 backbone end to end through `featcal-run`, on tiny local stand-ins
for the hub models (4.x-layout base and experts) and datasets (save_to_disk folders)."""
import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.clip import make_tiny_clip_benchmark


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["featcal", "surgery"])
def test_clip_backbone_through_featcal_run(tmp_path, calibration):
    overrides = make_tiny_clip_benchmark(tmp_path / "bench", tasks=("mnist", "eurosat", "svhn"), n_train=16, n_test=12, layout="v4")
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "featcal.run", *overrides, "merge=task_arithmetic", f"calibration={calibration}",
           "budget.per_task=8", "logger=none", "device=cpu", f"hydra.run.dir={out}"]
    if calibration == "surgery":
        cmd.append("calibration.iterations=5")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"] == "clip_vit_b32" and res["tasks"] == ["mnist", "eurosat", "svhn"]
    for stage in ("experts", "base", "merged", "calibrated"):
        assert set(res["score"][stage]) == {"mnist", "eurosat", "svhn", "average"}
    assert res["timings"]["calibrate"] > 0
    if calibration == "featcal":  # the last block drifts less from every expert after calibration
        last = max(r["block"] for r in res["drift"])
        for t in res["tasks"]:
            d = {r["when"]: r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == last}
            assert d["after"] < d["before"], t
    else:
        assert res["calibration_report"]["extra"]["l1_after_mean"] < res["calibration_report"]["extra"]["l1_before_mean"]
