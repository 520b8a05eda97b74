"""Results that never mislead (issue 20, and 21.3 / 21.5): reports keyed by the whole
configuration, every job of a sweep accounted for, per-run memory, timing context, W&B as
its users expect it, result files that honour the umask.

Fast: synthetic run folders in the real layout (Hydra's ``.hydra/`` files, results.json /
results.csv as featcal.run writes them) and W&B offline runs of a few records."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featcal.report.config_keys import config_key
from featcal.report.run_tables import long_rows, per_task_table, rows_to_csv
from featcal.report.scan import scan_sweep
from featcal.utils import MemorySampler, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["inverted", "rot90"]

FEATCAL = {"_target_": "featcal.calibration.feature_calibration.FeatCal", "rho": 0.5, "alpha": 0.001}
SURGERY = {"_target_": "featcal.calibration.surgery.Surgery", "steps": 100, "lr": 0.001}


def write_run(folder: Path, *, calibration="featcal", cal_cfg=None, seed=0, budget=8, scores=(80.0, 70.0),
              suite=None, merge="task_arithmetic", peak=500.0, mtime=None, logger="none") -> Path:
    """A complete run folder as featcal.run leaves it (results.json, results.csv, .hydra/)."""
    folder.mkdir(parents=True, exist_ok=True)
    cal_cfg = dict(cal_cfg or (FEATCAL if calibration == "featcal" else SURGERY))
    config = {"seed": seed, "budget": {"per_task": budget, "split": "train", "batch_size": 16}, "device": "auto",
              "precision": "fp32", "eval_batch_size": 256, "resume": True, "logger": {"name": logger},
              "backbone": {"tasks": TASKS}, "merge": {"_target_": f"featcal.merge.registry.{merge.upper()}", "scaling_factor": 0.3},
              "calibration": cal_cfg}
    score = {"merged": {"inverted": 60.0, "rot90": 65.0, "average": 62.5},
             "calibrated": {"inverted": scores[0], "rot90": scores[1], "average": (scores[0] + scores[1]) / 2},
             "experts": {"inverted": 90.0, "rot90": 91.0, "average": 90.5}}
    metrics = {stage: {t: {"accuracy": v} for t, v in s.items() if t != "average"} for stage, s in score.items()}
    primary = {t: "accuracy" for t in TASKS}
    meta = {"backbone": "embedded_small", "merge": merge, "calibration": calibration, "budget": budget, "split": "train", "seed": seed}
    results = {**meta, "tasks": TASKS, "device": "cpu", "primary_metric": primary, "score": score, "metrics": metrics,
               "table": per_task_table(TASKS, score, primary), "timings": {"calibrate": 1.0 + seed, "merge": 0.1},
               "memory": {"peak_rss_mib": peak, "baseline_rss_mib": 300.0, "peak_rss_above_baseline_mib": peak - 300.0, "cuda_peak_mib": None},
               "drift": [], "loss_curve": [], "config": config, "config_hash": "0" * 16}
    if suite is not None:
        results["suite"] = suite
    (folder / ".hydra").mkdir(exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(json.dumps(config))
    (folder / ".hydra" / "overrides.yaml").write_text(f"- calibration={calibration}\n- seed={seed}\n")
    (folder / "results.csv").write_text(rows_to_csv(long_rows({"run_dir": str(folder), **meta}, metrics, score, primary)))
    atomic_write_json(folder / "results.json", results)
    if mtime is not None:
        os.utime(folder / "results.json", (mtime, mtime))
    return folder


def job_folder(folder: Path, overrides: list[str]) -> Path:
    """A Hydra job folder that never got to write results.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- 21.3 / 21.5: every job folder accounted for ----------------------------------------------
@pytest.fixture()
def messy_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", budget=8)
    failed = job_folder(sweep / "1", ["calibration=featcal", "budget.per_task=9999"])
    (failed / "failed.json").write_text(json.dumps({"error": "BudgetTooLarge", "reason": "budget 9999 too large for task rot90\nsecond line",
                                                   "stage": "calibration_data", "overrides": ["budget.per_task=9999"]}))
    killed = job_folder(sweep / "2", ["calibration=featcal", "budget.per_task=32"])
    (killed / ".featcal.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": time.time()}))
    running = job_folder(sweep / "3", ["calibration=featcal", "budget.per_task=64"])
    (running / ".featcal.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    job_folder(sweep / "4", ["calibration=featcal", "budget.per_task=128"])  # killed before it took a lock
    bad = write_run(sweep / "5", budget=256)
    (bad / "results.json").write_text('{"backbone": "embedded_small", "score": {')  # cut off mid-write by a full disk
    return sweep


def test_scan_sweep_lists_incomplete_and_unreadable_jobs(messy_sweep):
    sweep = scan_sweep(messy_sweep)
    assert [f.name for f, _ in sweep.complete] == ["0"]
    status = {j["run"]: j for j in sweep.incomplete}
    assert {k: v["status"] for k, v in status.items()} == {"1": "failed", "2": "killed or crashed", "3": "running", "4": "killed or crashed"}
    assert status["1"]["reason"].startswith("budget 9999 too large") and "\n" not in status["1"]["reason"]
    assert status["2"]["overrides"] == "budget.per_task=32" and "gone" in status["2"]["reason"]
    assert status["3"]["reason"] == f"pid {os.getpid()}"
    (bad,) = sweep.unreadable
    assert bad["path"].endswith(os.path.join("5", "results.json")) and "JSONDecodeError" in bad["error"]


def test_featcal_collect_goes_on_past_unreadable_results_and_names_every_job(messy_sweep, capsys):
    from featcal.report.collect import main

    assert main([str(messy_sweep)]) == 0
    out = capsys.readouterr().out
    for run, status in (("1", "failed"), ("2", "killed or crashed"), ("3", "running"), ("4", "killed or crashed")):
        assert any(line.startswith("incomplete:") and f" {run} " in line and status in line for line in out.splitlines()), (run, out)
    assert f"unreadable: {messy_sweep / '5' / 'results.json'}" in out
    assert "1 runs, 1 failed, 3 incomplete (killed, crashed or running), 1 unreadable" in out
    collected = pd.read_csv(messy_sweep / "collected.csv")
    assert collected["run_dir"].nunique() == 1
    md = (messy_sweep / "collected.md").read_text()
    assert "Incomplete jobs (4)" in md and "Unreadable results (1)" in md
    inc = pd.read_csv(messy_sweep / "incomplete.csv")
    assert sorted(inc["status"].fillna("")) == sorted(["failed", "killed or crashed", "running", "killed or crashed", ""])


def test_featcal_report_lists_incomplete_jobs(messy_sweep, tmp_path, capsys):
    from featcal.report.sweep import main

    assert main([str(messy_sweep), "--no-wandb", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "incomplete: 2 (killed or crashed)" in out and "incomplete: 3 (running)" in out and "incomplete: 1 (failed)" in out
    text = (tmp_path / "rep" / "table.md").read_text()
    assert "Incomplete jobs (4)" in text and "Unreadable results (1)" in text


# ---- reports keyed by the configuration -----------------------------------------------------
@pytest.fixture()
def ablation(tmp_path):
    """featcal default and its rho/alpha ablation (seed 0 each), surgery with two seeds, the
    default run again from another sweep (a duplicate), and a featcal run of another build."""
    root = tmp_path / "runs"
    now = time.time()
    write_run(root / "a" / "0", scores=(82.0, 80.0), mtime=now - 100)
    write_run(root / "a" / "1", cal_cfg={**FEATCAL, "rho": 1.0, "alpha": 0}, scores=(79.0, 77.0))
    write_run(root / "a" / "2", calibration="surgery", seed=0, scores=(75.0, 70.0), peak=800.0)
    write_run(root / "a" / "3", calibration="surgery", seed=1, scores=(77.0, 73.0), peak=820.0)
    write_run(root / "b" / "0", scores=(84.0, 80.0), mtime=now)  # same config and seed as a/0, newer
    return root


def test_report_keys_rows_by_configuration_seeds_and_duplicates(ablation, tmp_path):
    from featcal.report.sweep import report

    out = tmp_path / "rep"
    written = report([ablation], out, use_wandb=False)
    table = pd.read_csv(out / "table.csv")
    methods = table[table["kind"] == "method"].set_index("calibration")
    assert sorted(methods.index) == ["featcal (rho=0.5, alpha=0.001)", "featcal (rho=1.0, alpha=0)", "surgery"]
    # the ablation is its own row, never averaged into the default
    assert methods.loc["featcal (rho=1.0, alpha=0)", "average"] == pytest.approx(78.0)
    # the duplicate of the default (same config, same seed) is not averaged: the newest is used
    assert methods.loc["featcal (rho=0.5, alpha=0.001)", "average"] == pytest.approx(82.0)
    assert methods.loc["featcal (rho=0.5, alpha=0.001)", "n"] == 1
    (dup,) = [n for n in written["notes"] if n.startswith("duplicate:")]
    assert str(ablation / "b" / "0") in dup and str(ablation / "a" / "0") in dup
    # two seeds of one configuration: mean ± sample std, n = 2
    s = methods.loc["surgery"]
    assert s["n"] == 2 and s["average"] == pytest.approx(73.75) and s["inverted"] == pytest.approx(76.0)
    assert s["average_std"] == pytest.approx(np.std([72.5, 75.0], ddof=1)) and s["inverted_std"] == pytest.approx(np.std([75, 77], ddof=1))
    assert s["peak_mib"] == pytest.approx(510.0)  # the runs' own: peak above their start (800, 820 - 300)
    md = (out / "table.md").read_text()
    assert "73.75 ± 1.77" in md and "| n " in md.replace("|   n ", "| n ")
    assert "**82.00**" in md  # best average among the methods in bold
    assert "Duplicate runs (1)" in md
    assert "peak host RSS of the run above its start" in md
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and r"featcal (rho=1.0, alpha=0)" in tex
    assert r"\bfseries 82.00" in tex or r"\textbf{82.00}" in tex
    assert r"task\_arithmetic" in tex


NONE = {"_target_": "featcal.calibration.base.NoCalibration"}


def test_report_shows_a_calibration_free_config_once_and_says_which_runs_it_stands_for(tmp_path):
    """TA + none run at budgets 8 and 32 (identical scores: no calibration data used) is one
    row, with the mean of the two runs' costs, and the report lists both runs' own costs;
    runs whose scores differ are never collapsed."""
    from featcal.report.sweep import report

    root = tmp_path / "runs"
    write_run(root / "0", calibration="none", cal_cfg=NONE, budget=8, scores=(60.0, 65.0), peak=700.0)
    write_run(root / "1", calibration="none", cal_cfg=NONE, budget=32, scores=(60.0, 65.0), peak=400.0)
    write_run(root / "2", calibration="none", cal_cfg=NONE, budget=8, merge="ties", scores=(61.0, 66.0))
    write_run(root / "3", calibration="none", cal_cfg=NONE, budget=32, merge="ties", scores=(62.0, 66.0))
    written = report([root], tmp_path / "rep", use_wandb=False)
    table = pd.read_csv(tmp_path / "rep" / "table.csv")
    ta = table[(table["kind"] == "method") & (table["merge_name"] == "task_arithmetic")]
    assert len(ta) == 1 and pd.isna(ta["budget"].iloc[0]) and ta["average"].iloc[0] == pytest.approx(62.5)
    assert ta["peak_mib"].iloc[0] == pytest.approx(np.mean([700.0 - 300.0, 400.0 - 300.0]))
    ties = table[(table["kind"] == "method") & (table["merge_name"] == "ties")]
    assert sorted(ties["budget"]) == [8, 32] and sorted(ties["average"]) == [63.5, 64.0]
    (note,) = [n for n in written["notes"] if n.startswith("shown once:")]
    assert "8 / 32" in note and "400.0 / 100.0" in note
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "Calibration-free runs shown once (1)" in md


def test_report_build_column_keeps_suite_builds_apart(tmp_path):
    from featcal.report.sweep import report

    root = tmp_path / "runs"
    write_run(root / "0", scores=(80.0, 80.0), suite={"name": "embedded_small", "spec_hash": "s", "content_hash": "aaaa", "portable": True})
    write_run(root / "1", scores=(70.0, 70.0), suite={"name": "embedded_small", "spec_hash": "s", "content_hash": "bbbb", "portable": True})
    report([root], tmp_path / "rep", use_wandb=False)
    table = pd.read_csv(tmp_path / "rep" / "table.csv")
    methods = table[table["kind"] == "method"]
    assert sorted(methods["build"]) == ["aaaa", "bbbb"] and sorted(methods["average"]) == [70.0, 80.0]
    assert "| build" in (tmp_path / "rep" / "table.md").read_text().replace("|  build", "| build")


def test_collect_labels_configurations_and_report_from_its_csv(ablation, tmp_path):
    from featcal.report.collect import main
    from featcal.report.sweep import report

    assert main([str(ablation / "a"), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "collected.md").read_text()
    assert "featcal (rho=1.0, alpha=0)" in md and "featcal (rho=0.5, alpha=0.001)" in md
    moved = pd.read_csv(tmp_path / "collected.csv")
    moved["run_dir"] = "/nonexistent/" + moved["run_dir"].astype(str)  # run folders gone: the CSV alone
    moved.to_csv(tmp_path / "moved.csv", index=False)
    table = report([tmp_path / "moved.csv"], tmp_path / "rep", use_wandb=False)["table"]
    methods = table[table["kind"] == "method"].set_index("calibration_label")
    assert methods.loc["featcal (rho=1.0, alpha=0)", "average"] == pytest.approx(78.0)
    assert methods.loc["surgery", "n"] == 2


def test_config_key_leaves_out_seed_and_presentation_keys():
    a = {"config": {"seed": 0, "logger": {"name": "wandb", "mode": "offline"}, "resume": True, "calibration": {"rho": 0.5}},
         "device": "cuda:0", "suite": {"content_hash": "abc"}}
    b = json.loads(json.dumps(a))
    b["config"].update(seed=3, resume=False, logger={"name": "none"})
    assert config_key(a) == config_key(b) == {"calibration.rho": "0.5", "device": "cuda", "build": "abc"}


def test_figures_follow_configurations_with_seed_bands(ablation, tmp_path):
    from featcal.report.figures import _avg
    from featcal.report.load import load

    long, runs, _drift, _info = load([ablation])
    avg = _avg(long, runs, "calibrated")
    lines = set(avg["line"])
    assert lines == {"featcal (rho=0.5, alpha=0.001)", "featcal (rho=1.0, alpha=0)", "surgery"}
    s = avg[avg["line"] == "surgery"].iloc[0]
    assert s["n"] == 2 and s["std"] == pytest.approx(np.std([72.5, 75.0], ddof=1))


# ---- per-run memory -------------------------------------------------------------------------
def _job(mib: int) -> dict:
    """One sweep job: a sampler from its start, ``mib`` MiB touched and freed inside it."""
    sampler = MemorySampler(interval=0.005).start()
    block = np.ones(mib * 2**20 // 8)  # touched: resident
    time.sleep(0.1)
    del block
    return sampler.stop()


def test_memory_of_a_light_job_after_a_heavy_one_is_its_own():
    """Three jobs in one process (Hydra's basic launcher, or one reused joblib worker):
    heavy, light, light. ru_maxrss stays at the heavy job's peak; each run's sampled peak
    is its own."""
    import resource

    heavy, light, light2 = _job(400), _job(40), _job(40)
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert heavy["peak_rss_above_baseline_mib"] > 350
    for light_run in (light, light2):
        assert 30 < light_run["peak_rss_above_baseline_mib"] < 120
        assert light_run["peak_rss_mib"] < heavy["peak_rss_mib"] - 250
        assert light_run["peak_rss_mib"] < lifetime - 250  # what the old report showed


def test_memory_per_run_in_a_reused_joblib_worker():
    joblib = pytest.importorskip("joblib")
    with joblib.parallel_backend("loky", n_jobs=1):
        results = joblib.Parallel()(joblib.delayed(_job)(mib) for mib in (400, 40, 40))
    heavy, light, _ = results
    assert heavy["peak_rss_above_baseline_mib"] > 350 and light["peak_rss_above_baseline_mib"] < 120
    assert light["peak_rss_mib"] < heavy["peak_rss_mib"] - 250


def test_stage_timer_records_stage_peaks_cpu_time_and_context():
    from featcal.utils import StageTimer

    sampler = MemorySampler(interval=0.005).start()
    timer = StageTimer(memory=sampler)
    with timer.stage("small"):
        a = np.ones(20 * 2**20 // 8)
        time.sleep(0.05)
    del a
    with timer.stage("big"):
        b = np.ones(200 * 2**20 // 8)
        time.sleep(0.05)
    del b
    mem = sampler.stop()
    stages = mem["stage_peak_rss_mib"]
    assert stages["big"] - mem["baseline_rss_mib"] > 180 and stages["small"] - mem["baseline_rss_mib"] < 100
    ctx = timer.context["big"]
    assert ctx["torch_threads"] >= 1 and ctx["cpus_usable"] >= 1 and len(ctx["loadavg"]) == 3
    assert timer.cpu_seconds["big"] >= 0 and timer.seconds["big"] >= 0.05


# ---- files honour the umask -------------------------------------------------------------------
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "table.md", "x\n")
        atomic_write_json(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("table.md", "results.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


# ---- W&B ---------------------------------------------------------------------------------------
def _compose(overrides=(), env=None):
    from hydra import compose, initialize_config_dir

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        from omegaconf import OmegaConf

        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_wandb_settings_follow_the_environment():
    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        assert k not in os.environ or pytest.skip(f"{k} set in the test environment")
    cfg = _compose()
    assert (cfg.logger.mode, cfg.logger.project, cfg.logger.entity) == ("offline", "featcal", None)
    cfg = _compose(env={"WANDB_MODE": "disabled", "WANDB_PROJECT": "myproj", "WANDB_ENTITY": "me"})
    assert (cfg.logger.mode, cfg.logger.project, cfg.logger.entity) == ("disabled", "myproj", "me")
    cfg = _compose(["logger.mode=online"], env={"WANDB_MODE": "disabled"})
    assert cfg.logger.mode == "online"  # the command line wins


def _results(tmp_path: Path) -> dict:
    folder = write_run(tmp_path / "job")
    res = json.loads((folder / "results.json").read_text())
    res["loss_curve"] = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(3)]
    return res


def test_wandb_disabled_writes_no_run(tmp_path):
    from featcal.wandb_log import WandbLogger

    res = _results(tmp_path)
    logger = WandbLogger({"mode": "disabled"}, tmp_path / "job", {}, name="n", group=None, rid="fc-x")
    logger.log_results(res)
    logger.finish()
    assert not (tmp_path / "job" / "wandb").exists() and not logger.active
    assert logger.record()["mode"] == "disabled" and logger.record()["status"] == "disabled"


@pytest.mark.slow  # starts W&B (wandb-core) twice: ~10-30 s on a loaded machine
def test_wandb_run_as_dashboards_expect_and_rerun_replaces_it(tmp_path):
    from tests.fixtures.wandb_records import read_offline_run

    from featcal.wandb_log import WandbLogger
    from featcal.wandb_runfile import check_offline_run, offline_runs

    res = _results(tmp_path)
    job = tmp_path / "job"
    kw = dict(name="task_arithmetic+featcal n=8 seed=0", group="sweep-x", rid="fc-0123456789abcdef",
              tags=["embedded_small", "task_arithmetic", "featcal", "experiment:embedded_table"])
    logger = WandbLogger({"mode": "offline", "project": "p"}, job, {"seed": 0}, **kw)
    logger.log_results(res, {"results": job / "results.json"})
    logger.finish()
    assert logger.error is None and logger.record()["status"] == "logged"
    (run,) = offline_runs(job)
    data = read_offline_run(run)
    assert data["id"] == "fc-0123456789abcdef" and data["group"] == "sweep-x" and data["job_type"] == "run"
    assert sorted(data["tags"]) == sorted(kw["tags"]) and data["name"] == kw["name"] and data["project"] == "p"
    assert data["summary"]["score/calibrated/average"] == pytest.approx(75.0)
    # scalars live in the summary only: no one-point histories of them
    assert not any(k.startswith(("score/", "accuracy/", "time/", "memory/")) for h in data["history"] for k in h)
    assert any("per_task_scores/_type" in h for h in data["history"])
    assert data["metrics"].get("calibration/loss") == "calibration/step"
    assert [h["calibration/loss"] for h in data["history"] if "calibration/loss" in h] == pytest.approx([1.0, 0.5, 1 / 3])
    assert any(a["type"] == "results" and a["files"] == ["results.json"] for a in data["artifacts"])
    # a rerun of the same configuration replaces its offline run (one run to sync, same id)
    again = WandbLogger({"mode": "offline", "project": "p"}, job, {"seed": 0}, **kw)
    again.finish()
    (run2,) = offline_runs(job)
    assert run2 != run and run2.name.endswith("fc-0123456789abcdef")
    # an empty run file (a full disk, a kill) is reported, not taken for a success
    (f,) = run2.glob("run-*.wandb")
    assert check_offline_run(run2) is None
    header = f.read_bytes()[:7]
    f.write_bytes(header)  # a killed job's run: the header, no records
    assert "no records" in check_offline_run(run2)
    f.write_bytes(b"")
    assert "empty" in check_offline_run(run2)


@pytest.mark.slow  # starts W&B once
def test_finished_run_whose_wandb_failed_is_logged_on_the_next_invocation(tmp_path, monkeypatch):
    """resume finds complete results whose W&B logging failed: they are logged from
    results.json, nothing is recomputed (the backbone is never built)."""
    from tests.fixtures.wandb_records import read_offline_run

    from featcal import run as run_mod
    from featcal import wandb_log
    from featcal.resume import config_hash
    from featcal.wandb_runfile import offline_runs

    cfg = _compose(["backbone=embedded_small", "budget.per_task=8", "logger.mode=offline"], env={})
    out = tmp_path / "job"
    res = _results(tmp_path)
    res["config_hash"] = config_hash(cfg)
    res["wandb"] = {"id": None, "mode": "offline", "status": "failed", "error": "CommError: no key"}
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "results.json", res)
    stale = out / "wandb" / f"offline-run-20260101_000000-{wandb_log.run_id(config_hash(cfg))}"
    stale.mkdir(parents=True)  # a killed attempt's empty run
    monkeypatch.setattr(run_mod, "_run_measured", lambda *a, **k: pytest.fail("recomputed"))
    got = run_mod.run(cfg, out)
    assert got["score"] == res["score"]
    stored = json.loads((out / "results.json").read_text())
    assert stored["wandb"]["status"] == "logged" and stored["wandb"]["mode"] == "offline" and stored["wandb"]["id"].startswith("fc-")
    assert stored["score"] == res["score"] and stored["config_hash"] == res["config_hash"]
    (run,) = offline_runs(out)  # the stale empty run is gone
    assert not stale.exists()
    assert read_offline_run(run)["summary"]["score/calibrated/average"] == pytest.approx(75.0)
    # logged now: the next invocation leaves W&B alone
    mtime = (out / "results.json").stat().st_mtime_ns
    run_mod.run(cfg, out)
    assert (out / "results.json").stat().st_mtime_ns == mtime and offline_runs(out) == [run]


@pytest.mark.slow  # starts W&B once
def test_online_without_network_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    from featcal.wandb_log import WandbLogger

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    start = time.perf_counter()
    logger = WandbLogger({"mode": "online"}, tmp_path, {}, name="n", group=None, rid="fc-online")
    logger.finish()
    out = capsys.readouterr().out
    assert logger.mode == "offline" and logger.active and logger.error is None
    assert "logger.mode=offline" in out and "127.0.0.1:9" in out
    assert logger.record()["mode"] == "offline"
    assert time.perf_counter() - start < 120  # the probe itself is immediate; wandb's start dominates


@pytest.mark.slow  # starts W&B twice
def test_report_run_is_one_per_sweep_and_reads_the_group_from_results(tmp_path):
    from tests.fixtures.wandb_records import read_offline_run

    from featcal.report.load import load
    from featcal.report.wandb_report import log_to_wandb, report_run_id
    from featcal.wandb_runfile import offline_runs

    root = tmp_path / "sweep"
    for n, cal in enumerate(("featcal", "surgery")):
        folder = write_run(root / str(n), calibration=cal)
        res = json.loads((folder / "results.json").read_text())
        res["wandb"] = {"id": f"fc-{n}", "group": "sweep-2026-12-06_10-00-00", "project": "proj", "entity": None,
                        "mode": "offline", "status": "logged"}
        atomic_write_json(folder / "results.json", res)
    long, runs, _drift, info = load([root])
    assert info["groups"] == {"sweep-2026-12-06_10-00-00"} and info["logger"]["project"] == "proj"
    table = pd.DataFrame({"kind": ["method"], "average": [1.0]})
    out = tmp_path / "report"
    for _ in range(2):  # featcal-report twice: the second updates the same report run
        log_to_wandb(info, [], table, out)
    (run,) = offline_runs(out)
    data = read_offline_run(run)
    assert data["id"] == report_run_id("sweep-2026-12-06_10-00-00") and data["job_type"] == "report"
    assert data["group"] == "sweep-2026-12-06_10-00-00" and data["project"] == "proj"


def test_wandb_mode_disabled_from_the_environment_starts_no_wandb(tmp_path, monkeypatch):
    """WANDB_MODE=disabled reaches logger.mode and featcal.run starts no W&B run, not even
    to fill in a finished run that never logged."""
    from featcal import run as run_mod
    from featcal.resume import config_hash

    cfg = _compose(["backbone=embedded_small", "budget.per_task=8"], env={"WANDB_MODE": "disabled"})
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "disabled"
    out = tmp_path / "job"
    res = _results(tmp_path)
    res["config_hash"] = config_hash(cfg)
    atomic_write_json(out / "results.json", res)
    import wandb

    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called"))
    assert run_mod.run(cfg, out)["score"] == res["score"]
    assert not (out / "wandb").exists()


# ---- issue 22: one reporting tool, its commands ------------------------------------------------
def test_featcal_report_commands_collect_table_paper_figures(tmp_path, monkeypatch, capsys):
    from featcal.report.cli import main

    sweep = tmp_path / "sweep"
    write_run(sweep / "0", budget=8, scores=(80.0, 70.0))
    write_run(sweep / "1", budget=32, scores=(84.0, 76.0))
    assert main(["collect", str(sweep), "--out", str(tmp_path / "c")]) == 0
    collected = tmp_path / "c" / "collected.csv"
    assert pd.read_csv(collected)["run_dir"].nunique() == 2
    # table: TA vs TA + calibrator per budget; gap closed = (75 - 62.5) / (90.5 - 62.5) at budget 8
    assert main(["table", str(collected), "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "## budget 8 per task" in table and "## budget 32 per task" in table
    assert "| 8      | 62.50 | 75.00      | 44.64" in table and "| 32     | 62.50 | 80.00      | 62.50" in table
    # paper: no published numbers for this backbone, the comparison says so in its tables
    assert main(["paper", str(collected), "--out", str(tmp_path / "p.md")]) == 0
    assert (tmp_path / "p.md").read_text().startswith("# Our sweep vs the published numbers")
    # figures: the same files as the full report, and nothing else
    assert main(["figures", str(sweep), "--out", str(tmp_path / "f")]) == 0
    assert main([str(sweep), "--no-wandb", "--out", str(tmp_path / "r")]) == 0
    figs = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert figs == ["accuracy_vs_budget.png", "cost.png"]
    for name in figs:
        assert (tmp_path / "f" / name).read_bytes() == (tmp_path / "r" / name).read_bytes(), name
    # `report` names the default command: a sweep folder called like a command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep").rename(tmp_path / "collect")
    assert main(["report", "collect", "--no-wandb", "--out", "r2"]) == 0
    assert (tmp_path / "r2" / "table.md").read_text() == (tmp_path / "r" / "table.md").read_text().replace(str(sweep), "collect")
    capsys.readouterr()
    assert main(["collect", str(tmp_path / "missing")]) == 2
    assert "featcal-report collect: no such folder" in capsys.readouterr().err


def test_featcal_report_table_refuses_to_average_configurations(tmp_path, capsys):
    from featcal.report.cli import main

    sweep = tmp_path / "sweep"
    write_run(sweep / "0", budget=8, seed=0)
    write_run(sweep / "1", budget=8, seed=1, scores=(82.0, 72.0))
    assert main(["collect", str(sweep)]) == 0
    capsys.readouterr()
    assert main(["table", str(sweep / "collected.csv"), "--out", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcal-report table: several runs for task_arithmetic+featcal at budget 8") and "featcal-report <sweep>" in err
    assert not (tmp_path / "t.md").exists()
