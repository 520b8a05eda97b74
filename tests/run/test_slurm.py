"""Sweeps on a real SLURM scheduler (issue 28), through ``hydra/launcher=slurm``.

Needs a running cluster (``sinfo`` shows an idle node): CI starts a one-node one with
``.ci/slurm/start.sh`` (and sets FEATCAL_REQUIRE_SLURM=1, so a cluster that did not come
up fails these tests instead of skipping them). Elsewhere they skip with the reason.

One sweep folder, in order (each test builds on the previous one):

1. two jobs whose runs hang (a ``setup`` line puts a ``sitecustomize`` on the job's path
   that makes the run sleep): one is cancelled with ``scancel`` once it has started, the
   other is killed by SLURM at its 1-minute time limit. Both are reported as not finished
   by the launch, and ``featcal-report collect`` lists both folders as incomplete;
2. the same command again (without the hang): only those two jobs are submitted and
   both finish with complete results (the 2-job sweep through SLURM);
3. the same command once more: nothing is submitted.

Small on purpose: embedded_small, budget 8, logger=none, no expert/base evaluation.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.e2e import isolated_env

ROOT = Path(__file__).resolve().parents[2]


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client commands (sinfo/sbatch) on this machine; start a cluster with .ci/slurm/start.sh (root)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()[:200]} (start the cluster with .ci/slurm/start.sh)"
    if not re.search(r"^(idle|mixed|allocated)", r.stdout, re.M):
        return f"no usable SLURM node (sinfo states: {r.stdout.split()})"
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("FEATCAL_REQUIRE_SLURM") == "1":
            pytest.fail(f"FEATCAL_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0].rstrip("*")
    return partition


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cluster):
    from featcal.utils import cache_root

    root = tmp_path_factory.mktemp("slurm")
    env = isolated_env(root)
    env["FEATCAL_CACHE"] = str(cache_root())  # the shared embedded suite
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    hang = root / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(
        "import featcal.utils, time\n"
        "def _hang(seed):\n"
        "    time.sleep(3600)\n"
        "featcal.utils.seed_everything = _hang\n"
    )
    args = [
        "-m", "hydra/launcher=slurm", f"hydra.launcher.partition={cluster}", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=10",
        "device=cpu", "backbone=embedded_small", "budget.per_task=8", "logger=none",
        "evaluate_experts=false", "evaluate_base=false", "calibration=none,featcal", f"hydra.sweep.dir={root / 'sweep'}",
    ]
    return {"root": root, "env": env, "args": args, "dir": root / "sweep", "hang": hang}


def _launch(sweep, *extra, background=False):
    cmd = [sys.executable, "-m", "featcal.run", *sweep["args"], *extra]
    if background:
        return subprocess.Popen(cmd, env=sweep["env"], cwd=sweep["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=sweep["env"], cwd=sweep["root"], capture_output=True, text=True, timeout=900)


def _submitted(sweep) -> list[Path]:
    return sorted((sweep["dir"] / ".submitit").glob("*/*_submission.sh")) if (sweep["dir"] / ".submitit").is_dir() else []


def _squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T", "-j", job_id.split("_")[0]],
                          capture_output=True, text=True).stdout


@pytest.mark.slow
def test_cancelled_and_timed_out_jobs_are_incomplete(sweep):
    """scancel one running job; let SLURM kill the other at its time limit."""
    proc = _launch(sweep, "hydra.launcher.timeout_min=1",
                   f'hydra.launcher.setup=["export PYTHONPATH={sweep["hang"]}:$PYTHONPATH"]', background=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (sweep["dir"] / "1" / ".hydra" / "config.yaml").exists():
            time.sleep(2)
        assert (sweep["dir"] / "1" / ".hydra" / "config.yaml").exists(), "job #1 never started"
        scripts = _submitted(sweep)
        assert len(scripts) == 1
        array_id = scripts[0].parent.name
        subprocess.run(["scancel", f"{array_id}_1"], check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert re.search(r"job #1 \(SLURM job \S+_1\) did not finish: CANCELLED", out), out
    assert re.search(r"job #0 \(SLURM job \S+_0\) did not finish: TIMEOUT", out), out  # its time limit
    # sacct is off on the CI cluster: one line, no flood
    assert out.count("Bypassing sacct") == 0 and out.count("job states come from squeue") == 1, out
    for n in ("0", "1"):
        assert not (sweep["dir"] / n / "results.json").exists()
        assert (sweep["dir"] / n / "slurm.out").resolve().is_file()  # the job's log, linked next to its run
    # the report lists both folders as incomplete (featcal-report collect's contract: results20)
    col = subprocess.run([sys.executable, "-m", "featcal.report", "collect", str(sweep["dir"])], env=sweep["env"],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (col.stdout + col.stderr).splitlines() if "incomplete" in ln]
    for n in ("0", "1"):  # e.g. "incomplete: 1 (killed or crashed) calibration=featcal"
        mine = [ln for ln in lines if re.search(rf"(^|[\s/:]){n}([\s/:(]|$)", ln)
                and any(s in ln for s in ("killed or crashed", "failed", "running"))]
        assert mine, (n, col.stdout, col.stderr)


@pytest.mark.slow
def test_resume_reruns_only_the_incomplete_jobs(sweep):
    before = _submitted(sweep)
    res = _launch(sweep)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    new = [s for s in _submitted(sweep) if s not in before]
    assert len(new) == 1  # one array holding the two incomplete jobs
    script = new[0].read_text()
    assert "#SBATCH --array=0-1" in script
    assert "#SBATCH --job-name=featcal-embedded_small-0-1" in script  # named after the sweep, not "run"
    assert "gpus" not in script and "gres" not in script  # device=cpu: no GPU request
    scores = {}
    for n in ("0", "1"):
        results = json.loads((sweep["dir"] / n / "results.json").read_text())
        assert "score" in results and results["config"]["device"] == "cpu"
        scores[results["calibration"]] = results["score"]["calibrated"]["average"]
        assert (sweep["dir"] / n / "slurm.out").resolve().is_file()
    assert set(scores) == {"none", "featcal"} and scores["featcal"] > scores["none"]
    out = res.stdout + res.stderr
    assert "Bypassing sacct" not in out and out.count("job states come from squeue") == 1


@pytest.mark.slow
def test_finished_sweep_submits_nothing(sweep):
    before = _submitted(sweep)
    mtimes = {n: (sweep["dir"] / n / "results.json").stat().st_mtime_ns for n in ("0", "1")}
    res = _launch(sweep)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _submitted(sweep) == before
    assert "nothing submitted" in res.stdout + res.stderr
    assert {n: (sweep["dir"] / n / "results.json").stat().st_mtime_ns for n in ("0", "1")} == mtimes


@pytest.mark.parametrize("devices, given, want", [
    ({"cpu"}, None, None), ({"auto"}, None, 1), ({"cuda"}, None, 1), ({"cpu", "cuda:1"}, None, 1),
    ({"cpu"}, 2, 2), ({"cuda"}, 0, None),
])
def test_gpu_request_follows_device(devices, given, want):
    """No cluster needed: what the launcher gives submitit for a sweep's devices."""
    from featcal.slurm import job_params

    p = job_params({"name": "auto", "gpus_per_node": given, "mem_gb": 4}, {"embedded_small"}, devices, [0, 1, 2])
    assert p.get("gpus_per_node") == want and p["mem_gb"] == 4
    assert p["name"] == "featcal-embedded_small-0-2"
    assert job_params({"name": "mine", "gpus_per_node": None}, {"a", "b"}, {"cpu"}, [0, 2])["name"] == "mine"
    assert job_params({"name": "auto", "gpus_per_node": None}, {"a", "b"}, {"cpu"}, [0, 2])["name"] == "featcal-a+b-0,2"
