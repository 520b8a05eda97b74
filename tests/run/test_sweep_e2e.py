"""Sweeps end to end through the real console scripts: resuming, submitit's local executor,
merges that read the calibration set, task subsets, and featcal-report (tables, PNGs, W&B)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.wandb_records import read_offline_run
from tests.fixtures.e2e import isolated_env, run_module

SMALL = ["backbone=embedded_small"]
CHEAP = SMALL + ["calibration=none", "evaluate_base=false", "evaluate_experts=false", "logger=none"]
ROOT = Path(__file__).resolve().parents[2]


def featcal(module, args, env, cwd, timeout=900):
    return run_module(module, args, env, cwd, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = isolated_env(tmp_path_factory.mktemp("sweep"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def stamps(sweep: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}


@pytest.mark.slow  # subprocess runs of featcal-run
def test_resume_skips_complete_jobs_and_reruns_the_lost_one(env, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "merge=task_arithmetic,ties", f"hydra.sweep.dir={sweep}", *CHEAP]
    first = featcal("featcal.run", [*args, "budget.per_task=8"], env, tmp_path)
    assert "0 jobs skipped" in first.stdout and "2 ran" in first.stdout
    before = stamps(sweep)
    assert set(before) == {"0", "1"}
    stored = json.loads((sweep / "0" / "results.json").read_text())
    assert len(stored["config_hash"]) == 16
    # job 1 was "killed": no results.json (a crashed job never writes one)
    (sweep / "1" / "results.json").unlink()
    again = featcal("featcal.run", [*args, "budget.per_task=8"], env, tmp_path)
    assert again.stdout.count("skipped: complete results for the same config in") == 1
    assert f"skipped: complete results for the same config in {sweep / '0'}" in again.stdout
    assert "1 jobs skipped" in again.stdout and "1 ran" in again.stdout
    after = stamps(sweep)
    assert after["0"] == before["0"]  # untouched
    assert json.loads((sweep / "1" / "results.json").read_text())["merge"] == "ties"
    # another config in the same folders is not "the same results": both rerun
    other = featcal("featcal.run", [*args, "budget.per_task=16"], env, tmp_path)
    assert "skipped:" not in other.stdout and "0 jobs skipped" in other.stdout
    assert all(json.loads((sweep / n / "results.json").read_text())["budget"] == 16 for n in ("0", "1"))
    # resume=false reruns complete jobs of the same config
    mtimes = stamps(sweep)
    forced = featcal("featcal.run", [*args, "budget.per_task=16", "resume=false"], env, tmp_path)
    assert "skipped:" not in forced.stdout
    assert all(stamps(sweep)[n] != mtimes[n] for n in ("0", "1"))


@pytest.mark.slow  # subprocess runs of featcal-run
def test_submitit_local_sweep_runs_data_merges_in_processes_and_resumes(env, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "merge=regmean,adamerging",
            "budget.per_task=16", f"hydra.sweep.dir={sweep}", *CHEAP]
    proc = featcal("featcal.run", args, env, tmp_path)
    assert "Submitit 'local' sweep" in proc.stdout + proc.stderr
    results = {n: json.loads((sweep / n / "results.json").read_text()) for n in ("0", "1")}
    assert [results[n]["merge"] for n in ("0", "1")] == ["regmean", "adamerging"]
    for res in results.values():
        assert res["budget"] == 16 and "calibration_data" in res["timings"]
        assert all(0.0 <= v <= 100.0 for v in res["score"]["merged"].values())
    # each job ran in its own submitit process, whose output submitit kept
    outs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(outs) == 2
    pids = {res_line for f in outs for res_line in f.read_text().splitlines() if "results:" in res_line}
    assert len(pids) == 2
    # relaunched into the same folder: both jobs are complete, both skipped
    again = featcal("featcal.run", args, env, tmp_path)
    assert "2 jobs skipped" in again.stdout and "0 ran" in again.stdout
    logs = "".join(f.read_text() for f in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("skipped: complete results for the same config") == 2


@pytest.mark.slow  # subprocess runs of featcal-run
def test_light_job_after_a_heavy_one_reports_its_own_memory(env, tmp_path):
    """Three jobs in one process (Hydra's basic launcher): 4 merged tasks with FeatCal, then
    1 task twice. Each reports its own peak (above its start), not the process's lifetime
    ru_maxrss that only climbs."""
    sweep = tmp_path / "sweep"
    featcal("featcal.run", SMALL + ["-m", "backbone.tasks=[inverted,rot90,mirror,transpose],[inverted],[rot90]",
                                    "calibration=featcal", "budget.per_task=8", "evaluate_base=false", "evaluate_experts=false",
                                    "logger=none", f"hydra.sweep.dir={sweep}"], env, tmp_path)
    mem = [json.loads((sweep / n / "results.json").read_text())["memory"] for n in ("0", "1", "2")]
    heavy, light = mem[0]["peak_rss_above_baseline_mib"], [m["peak_rss_above_baseline_mib"] for m in mem[1:]]
    assert all(x < heavy / 2 and x < heavy - 100 for x in light), mem
    for m in mem:
        assert m["baseline_rss_mib"] <= m["peak_rss_mib"] and set(m["stage_peak_rss_mib"]) >= {"load", "merge", "calibrate"}
        assert max(m["stage_peak_rss_mib"].values()) <= m["peak_rss_mib"] + 1e-6


def test_scaling_preset_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=embedded_scaling"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    counts = [len(chunk.split(",")) for chunk in params["backbone.tasks"].strip("[]").split("],[")]
    assert counts == [2, 4, 7]
    assert set(params.calibration.split(",")) == {"none", "featcal", "surgery"}
    assert [int(b) for b in str(params["budget.per_task"]).split(",")] == [8, 32, 128]
    assert cfg.backbone.adapter._target_.endswith("EmbeddedBackbone") and len(cfg.backbone.spec.tasks) == 7 and cfg.evaluate_experts


@pytest.fixture(scope="module")
def report_sweep(env, tmp_path_factory):
    """A small scaling sweep logged to W&B (offline): 2 and 4 tasks x none/featcal x budgets 8/16."""
    cwd = tmp_path_factory.mktemp("report")
    sweep = cwd / "sweep"
    featcal("featcal.run", SMALL + ["-m", "backbone.tasks=[inverted,rot90],[inverted,rot90,mirror,transpose]",
                                    "calibration=none,featcal", "budget.per_task=8,16", "evaluate_base=false",
                                    f"hydra.sweep.dir={sweep}"], env, cwd)
    return sweep, cwd


@pytest.mark.slow  # subprocess runs of featcal-run
def test_task_subsets_run_the_selected_experts(report_sweep):
    sweep, _ = report_sweep
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(results) == 8
    assert {tuple(r["tasks"]) for r in results} == {("inverted", "rot90"), ("inverted", "rot90", "mirror", "transpose")}
    for r in results:
        assert set(r["score"]["experts"]) == set(r["tasks"]) | {"average"}


@pytest.mark.slow  # subprocess runs of featcal-run
def test_report_tables_figures_and_wandb(env, report_sweep):
    sweep, cwd = report_sweep
    proc = featcal("featcal.report", [str(sweep)], env, cwd)
    out = sweep / "report"
    table = pd.read_csv(out / "table.csv")
    methods = table[table["kind"] == "method"]
    # rows merge x calibrator x budget per task count; calibration=none is budget-free (one row)
    for n_tasks in (2, 4):
        sub = methods[methods["n_tasks"] == n_tasks]
        assert sorted(zip(sub["calibration"], sub["budget"].fillna(0).astype(int))) == [("featcal", 8), ("featcal", 16), ("none", 0)]
        best_avg = sub["average"].max()
        marked = sub[sub["best"].fillna("").str.split(";").map(lambda cols: "average" in cols)]
        assert len(marked) >= 1 and (marked["average"] == best_avg).all()
    refs = table[table["kind"] == "reference"]
    assert set(refs["merge"]) == {"experts"} and len(refs) == 2
    text = (out / "table.md").read_text()
    assert "## embedded_small, 2 tasks" in text and "## embedded_small, 4 tasks" in text
    assert f"**{best_avg:.2f}**" in text
    # figures: valid PNGs
    for name in ("accuracy_vs_budget.png", "cost.png", "drift.png", "scaling.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert "no published numbers" in proc.stdout and not (out / "vs_paper.md").exists()
    # W&B: one report run in the sweep's group, with the figures as images and the sweep table
    sweep_run = next((sweep / "0" / "wandb").glob("offline-run-*"))
    group = read_offline_run(sweep_run)["group"]
    (report_run,) = (out / "wandb").glob("offline-run-*")
    logged = read_offline_run(report_run)
    assert logged["group"] == group and group.startswith("sweep-")
    row = next(h for h in logged["history"] if "report/sweep_table/_type" in h)  # nested keys come back flattened
    assert row["report/sweep_table/_type"] == "table-file" and row["report/sweep_table/nrows"] == len(table)
    for name in ("accuracy_vs_budget", "cost", "drift", "scaling"):
        assert row[f"report/{name}/_type"] == "image-file"
        assert (report_run / "files" / row[f"report/{name}/path"]).read_bytes() == (out / f"{name}.png").read_bytes()
    table_file = next((report_run / "files").rglob("sweep_table*.table.json"))
    logged_table = json.loads(table_file.read_text())
    assert len(logged_table["data"]) == len(table) and "average" in logged_table["columns"]


@pytest.mark.slow  # subprocess runs of featcal-run
def test_report_from_collected_csv_matches_the_folder(env, report_sweep, tmp_path):
    from featcal.report.sweep import report

    sweep, cwd = report_sweep
    featcal("featcal.report", ["collect", str(sweep), "--out", str(tmp_path)], env, cwd)
    from_dir = report([sweep], tmp_path / "dir", use_wandb=False)["table"]
    collected = pd.read_csv(tmp_path / "collected.csv")
    collected["run_dir"] = "/nonexistent/" + collected["run_dir"].astype(str)  # the run folders are gone: the CSV alone
    collected.to_csv(tmp_path / "moved.csv", index=False)
    featcal("featcal.report", [str(tmp_path / "moved.csv"), "--no-wandb", "--out", str(tmp_path / "rep")], env, cwd)
    from_csv = pd.read_csv(tmp_path / "rep" / "table.csv")
    key = ["kind", "n_tasks", "merge", "calibration", "budget"]
    for t in (from_csv, from_dir):
        t["calibration"] = t["calibration"].fillna("")  # reference rows have none; a CSV reads "" back as NaN
    both = from_csv.merge(from_dir[key + ["average"]], on=key, suffixes=("_csv", "_dir"))
    assert len(both) == len(from_dir) == 8
    assert (both["average_csv"] - both["average_dir"]).abs().max() < 1e-9
    assert (tmp_path / "rep" / "accuracy_vs_budget.png").exists() and not (tmp_path / "rep" / "drift.png").exists()
    assert not (tmp_path / "rep" / "wandb").exists()


def test_paper_command_compares_a_collected_csv(tmp_path):
    rows = []
    for t, acc in (("mnist", 99.0), ("svhn", 90.0)):
        rows.append(dict(run_dir="r0", backbone="clip_vit_b32", merge="task_arithmetic", calibration="featcal", budget=256, task=t, stage="calibrated", accuracy=acc))
    csv = tmp_path / "collected.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    proc = subprocess.run([sys.executable, "-m", "featcal.report", "paper", str(csv), "--csv-out", str(tmp_path / "m.csv")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    m = pd.read_csv(tmp_path / "m.csv")
    assert m[(m.task == "mnist")]["paper"].item() == pytest.approx(98.81)
    assert m[(m.task == "average")]["ours"].item() == pytest.approx(94.5)
