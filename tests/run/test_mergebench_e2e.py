"""End to end through `python -m featcal.run` with the MergeBench backbone yaml pointed at
a tiny sharded Llama world (local folders, local JSON calibration data, local lm-eval
YAML tasks, eval.limit): streamed merge -> layer-streamed FeatCal -> lm-eval via HFLM."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.llm import TASKS, build_world
from tests.fixtures.mergebench import write_lm_eval_tasks, write_task_data

pytestmark = pytest.mark.slow


def test_featcal_run_mergebench_streamed_end_to_end(tmp_path):
    base, experts = build_world(tmp_path / "world", "llama", layers=2, steps=10)
    data = write_task_data(tmp_path, n=12)
    write_lm_eval_tasks(tmp_path)
    env = dict(os.environ)
    env.update(
        FEATCAL_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_SILENT="true",
    )
    out = tmp_path / "run"
    args = [
        "backbone=mergebench_llama32_3b", "merge=ties", "calibration=featcal", "logger=none", "device=cpu",
        f"backbone.adapter.tasks=[{','.join(TASKS)}]", f"backbone.adapter.base={base}",
        *[f"backbone.adapter.experts.{t}={experts[t]}" for t in TASKS],
        *[f"backbone.taskpool.datasets.{t}={data[t]}" for t in TASKS],
        "backbone.taskpool.lm_eval_tasks.instruction=[tiny_gen]", "backbone.taskpool.lm_eval_tasks.math=[tiny_mc]",
        "backbone.taskpool.lm_eval_tasks.coding=[tiny_mc,tiny_gen]",
        f"backbone.taskpool.lm_eval_include=[{tmp_path}]", "backbone.taskpool.lm_eval_defaults=false",
        "backbone.taskpool.max_length=64", "budget.per_task=6", "budget.batch_size=3", "eval.limit=4",
        "eval_batch_size=4", "evaluate_base=false", "calibration.progress=false", f"hydra.run.dir={out}",
    ]
    proc = subprocess.run([sys.executable, "-m", "featcal.run", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["metrics"]) == {"experts", "merged", "calibrated"}
    for stage, per_task in res["metrics"].items():
        assert set(per_task) == set(TASKS)
        for values in per_task.values():
            assert 0.0 <= values["score"] <= 100.0
    assert set(res["metrics"]["calibrated"]["coding"]) >= {"tiny_mc/acc", "tiny_gen/exact_match", "score"}
    # normalised scores next to the raw ones (merged ÷ expert, per category)
    for t in TASKS:
        if res["metrics"]["experts"][t]["score"] > 0:
            want = res["metrics"]["calibrated"][t]["score"] / res["metrics"]["experts"][t]["score"]
            assert res["metrics"]["calibrated"][t]["normalized"] == pytest.approx(want)
    # the layer-streamed path ran and the merged model is a normal HF folder on disk
    report = res["calibration_report"]
    assert report["settings"]["streamed"] is True and report["extra"]["memory"]["activation_mib"] > 0
    merged = list((tmp_path / "cache" / "merged").glob("*/model.safetensors.index.json"))
    assert len(merged) == 1 and (merged[0].parent / "tokenizer.json").is_file()
    # the per-block drift fell for every task at the last block
    last = max(r["block"] for r in res["drift"])
    for t in TASKS:
        rows = {r["when"]: r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == last}
        assert rows["after"] < rows["before"], (t, rows)
