"""A wheel built from this tree, installed into a fresh environment, runs from any folder:
the configs and the published numbers travel with it (pyproject ``data-files``,
``featcal/paths.py``), not only with the source checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_runs_outside_the_checkout(tmp_path, default_suite_cache):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    (wheel,) = dist.glob("featcal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/share/featcal/", 1)[1] for n in names if "/share/featcal/" in n}
    in_tree = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert in_tree <= shipped, sorted(in_tree - shipped)  # every config file travels
    assert {f"paper/{p.name}" for p in (ROOT / "results" / "paper").glob("*.csv")} <= shipped
    assert any(n.startswith("hydra_plugins/featcal_slurm/") for n in names)
    assert any(n.startswith("hydra_plugins/featcal_sweeper/") for n in names)

    # a fresh environment that borrows the installed dependencies (torch & co.) but not featcal:
    # --ignore-installed puts the wheel's featcal into the venv even where an editable one is visible
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEATCAL_CONF")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, env=env)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import featcal, featcal.paths as p; print(featcal.__file__); print(p.conf_dir()); print(p.paper_dir())"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split("\n")
    assert where[0].startswith(str(venv)), where  # the wheel's package, not the checkout's
    assert where[1].startswith(str(venv)) and where[2].startswith(str(venv)), where

    # the whole composed config, every group, from the wheel's own files
    job = subprocess.run([str(venv / "bin" / "featcal-run"), "--cfg", "job", "backbone=embedded_small", "merge=ties",
                          "calibration=surgery"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "_target_: featcal.calibration.surgery.Surgery" in job.stdout, job.stdout[-2000:]
    assert "_target_: featcal.merge.registry.TIES" in job.stdout and "per_task: 64" in job.stdout
    # the published numbers load from the wheel's copy
    paper = subprocess.run([str(py), "-c", "from featcal.report.paper import load_paper; print(len(load_paper()))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert paper.returncode == 0 and int(paper.stdout.strip().splitlines()[-1]) > 10, paper.stderr[-2000:]

    # and the embedded default end to end (`featcal-run`, no overrides but the logger and the run
    # folder), from that folder, on the wheel's code and configs; the suite build is shared with
    # test_default_run when both run in one session (the same files either way: the build is portable)
    run = subprocess.run([str(venv / "bin" / "featcal-run"), "logger=none", "hydra.run.dir=" + str(elsewhere / "run")],
                         cwd=elsewhere, env={**env, "FEATCAL_CACHE": str(default_suite_cache), "HOME": str(tmp_path / "home")},
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    import json

    res = json.loads((elsewhere / "run" / "results.json").read_text())
    assert res["backbone"] == "embedded" and res["merge"] == "task_arithmetic" and res["calibration"] == "featcal"
    acc = res["score"]
    # the regime of the default (base < merged < experts) and FeatCal's lift, from the wheel
    assert acc["base"]["average"] < acc["merged"]["average"] < acc["experts"]["average"]
    assert acc["calibrated"]["average"] > acc["merged"]["average"]
