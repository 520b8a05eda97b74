"""End to end through the real console scripts: featcal-run and featcal-report collect.

Runs use the small embedded build (same code as the default, fewer/smaller models),
cached once per test session; W&B runs are read back from their offline files.
"""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.fixtures.wandb_records import read_offline_run
from tests.fixtures.e2e import isolated_env, run_module

pytestmark = pytest.mark.slow  # subprocess runs of featcal-run

SMALL = ["backbone=embedded_small"]


def featcal_run(args, env, cwd, check=True, timeout=900):
    return run_module("featcal.run", args, env, cwd, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return isolated_env(tmp_path_factory.mktemp("e2e"))


def offline_runs(run_dir: Path):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_single_run_writes_results_and_wandb(env, tmp_path):
    out = tmp_path / "run"
    proc = featcal_run(SMALL + ["calibration=featcal", "budget.per_task=32", "save_calibrated=true", f"hydra.run.dir={out}"], env, tmp_path)
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert set(res["score"]) == {"experts", "base", "merged", "calibrated"}
    for stage in res["score"].values():
        assert set(stage) == set(tasks) | {"average"}
        assert all(0.0 <= v <= 100.0 for v in stage.values())
    assert res["primary_metric"] == {t: "accuracy" for t in tasks}
    for stage in ("load", "merge", "evaluate_merged", "calibrate", "evaluate_calibrated"):
        assert res["timings"][stage] >= 0.0
    assert res["memory"]["peak_rss_mib"] > 0
    # the table is printed
    for task in tasks:
        assert task in proc.stdout
    assert "| task" in proc.stdout and "calibrated" in proc.stdout
    # long CSV readable by pandas, consistent with the JSON
    df = pd.read_csv(out / "results.csv")
    assert {"run_dir", "backbone", "merge", "calibration", "budget", "stage", "task", "metric", "value", "primary"} <= set(df.columns)
    row = df[(df.stage == "calibrated") & (df.task == "average")]
    assert row.metric.item() == "accuracy" and row.value.item() == pytest.approx(res["score"]["calibrated"]["average"])
    # per-block drift before and after FeatCal: FeatCal lowered the last block's drift for every task
    drift = pd.read_csv(out / "drift.csv")
    assert set(drift["when"]) == {"before", "after"} and set(drift["task"]) == set(tasks)
    last = drift[drift.block == drift.block.max()]
    for task in tasks:
        rows = last[last.task == task].set_index("when")["drift"]
        assert rows["after"] < rows["before"], task
    # W&B offline run: config, summary metrics, tables
    (run,) = offline_runs(out)
    logged = read_offline_run(run)
    assert logged["config"]["run"]["merge"] == "task_arithmetic"  # the merge group's choice
    assert "name" not in logged["config"]["merge"]
    assert logged["config"]["budget"]["per_task"] == 32
    for stage, per_task in res["metrics"].items():
        for task, values in per_task.items():
            assert logged["summary"][f"accuracy/{stage}/{task}"] == pytest.approx(values["accuracy"])
        assert logged["summary"][f"score/{stage}/average"] == pytest.approx(res["score"][stage]["average"])
    assert logged["summary"]["time/calibrate"] == pytest.approx(res["timings"]["calibrate"])
    keys = {k.split("/")[0] for k in logged["summary"]}
    assert {"per_task", "feature_drift"} <= keys
    assert logged["group"] is None
    # the calibrated model was saved as a plain Hugging Face folder, and it is not the merged model
    from transformers import CLIPVisionModelWithProjection

    saved = CLIPVisionModelWithProjection.from_pretrained(str(out / "calibrated_model")).state_dict()
    from featcal.backbone.clip import load_clip_vision
    from featcal.merge import task_arithmetic

    (folder,) = [p for p in Path(env["FEATCAL_CACHE"], "embedded").iterdir() if p.is_dir() and not p.name.startswith(".")]
    base = load_clip_vision(str(folder / "base"))
    experts = [load_clip_vision(str(folder / "experts" / t), projection_source=str(folder / "base")) for t in tasks]
    merged = task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3)
    changed = [k for k in merged if not torch.allclose(saved[k], merged[k], atol=1e-6)]
    assert changed and all(".encoder.layers." in k for k in changed)  # FeatCal changes blocks only


def test_sweep_shares_group_collects_and_is_deterministic(env, tmp_path):
    sweep = tmp_path / "sweep"
    featcal_run(
        SMALL + ["-m", "merge=task_arithmetic,ties", "calibration=featcal", "budget.per_task=32", f"hydra.sweep.dir={sweep}"],
        env,
        tmp_path,
    )
    runs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(runs) == 2
    groups = {read_offline_run(offline_runs(r)[0])["group"] for r in runs}
    assert len(groups) == 1 and next(iter(groups)).startswith("sweep-")
    # featcal-report collect: one CSV and one Markdown table
    proc = subprocess.run(
        [sys.executable, "-m", "featcal.report", "collect", str(sweep)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(sweep / "collected.csv")
    assert set(df["merge"]) == {"task_arithmetic", "ties"} and df["run_dir"].nunique() == 2
    assert "ties" in (sweep / "collected.md").read_text()
    # same seed, same numbers, in a separate process
    single = tmp_path / "again"
    featcal_run(SMALL + ["merge=task_arithmetic", "calibration=featcal", "budget.per_task=32", "logger=none", f"hydra.run.dir={single}"], env, tmp_path)
    ta_run = next(r for r in runs if json.loads((r / "results.json").read_text())["merge"] == "task_arithmetic")
    a = json.loads((ta_run / "results.json").read_text())["metrics"]
    b = json.loads((single / "results.json").read_text())["metrics"]
    assert a == b


def test_run_completes_when_wandb_cannot_start(env, tmp_path):
    out = tmp_path / "run"
    proc = featcal_run(
        SMALL + ["calibration=none", "budget.per_task=8", "evaluate_experts=false", "evaluate_base=false", "logger.mode=online", f"hydra.run.dir={out}"],
        env,
        tmp_path,
    )
    # no network here: W&B says so, names logger.mode=offline and logs offline instead
    assert "logging offline instead" in proc.stdout and "logger.mode=offline" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["wandb"]["mode"] == "offline" and res["wandb"]["status"] == "logged"
    assert len(offline_runs(out)) == 1


def test_bad_config_fails_before_loading(env, tmp_path):
    e = dict(env, FEATCAL_CACHE=str(tmp_path / "fresh_cache"))
    proc = featcal_run(SMALL + ["budget.per_task=-4", "merge.scaling_factor=3", f"hydra.run.dir={tmp_path / 'r'}"], e, tmp_path, check=False)
    assert proc.returncode == 2
    assert "budget.per_task=-4" in proc.stderr and "merge.scaling_factor=3" in proc.stderr
    assert not (tmp_path / "fresh_cache").exists()  # nothing was built or loaded
    assert not (tmp_path / "r" / "results.json").exists()
    proc = featcal_run(["merge=average"], e, tmp_path, check=False)
    assert proc.returncode != 0 and "weight_average" in proc.stderr


def test_cfg_job_prints_config(env, tmp_path):
    proc = featcal_run(["--cfg", "job"], env, tmp_path)
    assert "backbone:" in proc.stdout and "featcal.merge.registry.TASK_ARITHMETIC" in proc.stdout


def test_surgery_run_logs_loss_curve(env, tmp_path):
    out = tmp_path / "run"
    featcal_run(
        SMALL + ["calibration=surgery", "calibration.iterations=25", "budget.per_task=16", "evaluate_base=false", f"hydra.run.dir={out}"],
        env,
        tmp_path,
    )
    res = json.loads((out / "results.json").read_text())
    assert res["calibration"] == "surgery"
    curve = res["loss_curve"]
    assert curve and curve[-1]["loss"] < curve[0]["loss"]
    # the modules moved the merged representations towards the experts', and changed the model's scores
    extra = res["calibration_report"]["extra"]
    assert extra["l1_after_mean"] < extra["l1_before_mean"]
    assert res["metrics"]["calibrated"] != res["metrics"]["merged"]
    (run,) = offline_runs(out)
    logged = [h["calibration/loss"] for h in read_offline_run(run)["history"] if "calibration/loss" in h]
    assert logged == pytest.approx([p["loss"] for p in curve])
