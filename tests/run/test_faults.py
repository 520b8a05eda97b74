"""Faults and bad input (issue 21), each driven by a monkeypatched failure (ENOSPC, EROFS,
a dead or live process id, SIGKILL of a subprocess sweep) rather than real mounts: the
exit code, one ``featcal:`` paragraph without a traceback, and every finished result
intact. Numbered as the issue's cases; the README's "What happens when ..." table lists them.

In-process runs use the tiny local CLIP benchmark (seconds); the subprocess ones are
marked ``slow``.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.fixtures.clip import make_tiny_clip_benchmark
from tests.fixtures.e2e import isolated_env
from featcal import errors
from featcal.errors import ConfigError, CorruptCache
from featcal.run import run

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TASKS = ("mnist", "eurosat")
CHEAP = ["logger=none", "device=cpu", "budget.per_task=8", "budget.batch_size=4", "calibration=none",
         "evaluate_experts=false", "evaluate_base=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    return make_tiny_clip_benchmark(tmp_path_factory.mktemp("bench"), tasks=TASKS, n_train=16, n_test=12)


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True, overrides=list(overrides))


def job(cfg):
    """The run's own keys (what run() keeps of a config composed with its hydra node)."""
    from omegaconf import OmegaConf

    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def guarded(cfg, out: Path, capsys, multirun: bool = False):
    """Run as featcal-run's task function does: (exit code, stdout, stderr)."""
    code = 0
    try:
        errors.guard(lambda: run(cfg, out), cfg, out, multirun, {})
    except SystemExit as ex:
        code = int(ex.code)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_paragraph(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.replace("\r", "\n").split("\n")  # (progress bars end in \r)
    starts = [i for i, line in enumerate(lines) if line.startswith("featcal:")]
    assert len(starts) == 1, stderr
    para = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:  # its continuation lines ("  - key: ...")
        if not line.startswith("  "):
            break
        para.append(line)
    return "\n".join(para)


def env_for(tmp_path: Path) -> dict[str, str]:
    e = isolated_env(tmp_path)
    e.pop("HYDRA_FULL_ERROR", None)  # the user's view: no tracebacks asked for
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def featcal_run(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "featcal.run", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------
# 1. a misspelled key is an error, with or without '+'


def test_1_key_added_with_plus_is_rejected_with_did_you_mean(bench, tmp_path, capsys):
    cfg = compose_cfg(*bench, *CHEAP, "+budget.per_tsk=2")
    code, out, err = guarded(cfg, tmp_path / "run", capsys)
    para = one_paragraph(err)
    assert code == 2 and "budget.per_tsk: unknown key" in para and "did you mean 'per_task'" in err
    assert "skipped" not in out and not (tmp_path / "run" / "results.json").exists()  # nothing ran


def test_1_plus_key_on_a_target_node_is_checked_against_its_signature(bench, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(compose_cfg(*bench, *CHEAP[:-3], "calibration=featcal", "+calibration.lamda=0.1"), tmp_path / "run")
    assert "calibration.lamda: unknown key" in str(err.value) and "did you mean 'lambda_ratio'" in str(err.value)
    # a real constructor argument added with + is fine (the merge function takes `seconds`)
    cfg = compose_cfg(*bench, *CHEAP, "merge._target_=tests.fixtures.fault_helpers.slow_task_arithmetic", "+merge.seconds=0")
    res = run(cfg, tmp_path / "ok")
    assert (tmp_path / "ok" / "results.json").exists() and res["score"]["calibrated"]["average"] >= 0


def test_1_every_shipped_config_has_only_known_keys():
    from featcal.strict import unknown_key_problems

    found = {}
    for group in ("backbone", "merge", "calibration", "logger", "experiment"):
        for f in sorted((CONF / group).glob("*.yaml")):
            problems = unknown_key_problems(compose_cfg(f"{group}={f.stem}"))
            if problems:
                found[f"{group}={f.stem}"] = problems
    assert found == {}


@pytest.mark.slow  # a featcal-run subprocess (fails in Hydra's composition: no model loads)
def test_1_unknown_key_without_plus_gets_featcal_message_exit_2(tmp_path):
    proc = featcal_run(["budget.per_tsk=8", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], env_for(tmp_path), tmp_path)
    para = one_paragraph(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "unknown config key 'budget.per_tsk'" in para and "did you mean 'per_task'" in para
    assert "+budget.per_tsk" not in proc.stderr  # Hydra's "append with +" hint is gone


# ---------------------------------------------------------------------------
# 2. a full or read-only disk at write time: table printed, scores kept, one paragraph


def _enospc_on(name: str, monkeypatch, module: str = "featcal.report.run_tables"):
    import featcal.utils as utils

    real = utils.atomic_write_text

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # a failed write names no file

    def failing(path, text):
        if Path(path).name == name:
            with monkeypatch.context() as m:  # the real atomic write, failing at its fsync
                m.setattr(os, "fsync", no_space)
                return real(path, text)
        return real(path, text)

    monkeypatch.setattr(f"{module}.atomic_write_text", failing)


def test_2_full_disk_at_write_time_keeps_scores_in_failed_json(bench, tmp_path, capsys, monkeypatch):
    cfg = compose_cfg(*bench, *CHEAP)
    reference = run(cfg, tmp_path / "ref")  # the same run with a working disk
    capsys.readouterr()
    _enospc_on("results.csv", monkeypatch)
    out_dir = tmp_path / "full"
    code, out, err = guarded(cfg, out_dir, capsys)
    para = one_paragraph(err)
    assert code == 2
    assert "| task" in out and "| average" in out  # the per-task table was printed before writing
    assert f"could not write {out_dir / 'results.csv'}" in para and "no space left" in para and "MiB free" in para
    assert str(out_dir / "failed.json") in para
    kept = json.loads((out_dir / "failed.json").read_text())
    assert kept["error"] == "ResultsNotWritten" and kept["results"]["score"] == reference["score"]
    assert kept["results"]["config_hash"] == reference["config_hash"]
    assert not (out_dir / "results.json").exists()  # not marked complete: resume redoes it


def test_2_read_only_folder_prints_scores_as_json_on_stderr(bench, tmp_path, capsys, monkeypatch):
    cfg = compose_cfg(*bench, *CHEAP)
    import featcal.utils as utils

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("featcal.report.run_tables.atomic_write_text", read_only)
    monkeypatch.setattr(utils, "atomic_write_text", read_only)  # failed.json too
    monkeypatch.setattr("featcal.envcheck._writable_dir", lambda p: None)  # the folder got read-only mid-run
    code, out, err = guarded(cfg, tmp_path / "ro", capsys)
    assert code == 2 and "Traceback" not in err
    err = err.replace("\r", "\n")
    (json_line,) = [line for line in err.splitlines() if line.startswith("featcal: results (JSON): ")]
    kept = json.loads(json_line.split(": ", 2)[2])
    para = [line for line in err.splitlines() if line.startswith("featcal: the run finished")]
    assert len(para) == 1 and "read-only file system" in para[0] and "printed above as JSON" in para[0]
    assert set(kept["score"]) == {"merged", "calibrated"} and kept["score"]["calibrated"]["average"] >= 0
    assert "| average" in out


# ---------------------------------------------------------------------------
# 4. no double runs, no orphans, a summary that counts what it printed


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_4_lock_contract_busy_and_stale(tmp_path):
    from featcal import lock

    job = tmp_path / "job"
    path = lock.acquire(job)
    rec = json.loads(path.read_text())
    assert set(rec) == {"pid", "host", "started"} and rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    assert isinstance(rec["started"], float) and abs(rec["started"] - time.time()) < 60
    lock.release(job)
    assert not path.exists()
    # a live process holds it: busy
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time()}))
        with pytest.raises(lock.JobBusy) as busy:
            lock.acquire(job)
        assert f"pid {sleeper.pid}" in busy.value.message() and "running in another process" in busy.value.message()
        assert json.loads(path.read_text())["pid"] == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process died: the lock is stale and taken over
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": time.time() - 100}))
    lock.acquire(job)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release(job)


def test_4_sigint_with_submitit_says_jobs_continue_and_how_to_stop(capsys):
    from featcal.resume import interrupted

    with pytest.raises(SystemExit) as ex:
        interrupted(["-m", "hydra/launcher=submitit_local", "budget.per_task=8,16"])
    err = capsys.readouterr().err
    assert ex.value.code == 130
    assert "keep running" in err and "kill <job id>" in err and ".submitit" in err


@pytest.mark.slow  # featcal-run subprocesses (a 2-job sweep)
def test_4_second_launcher_skips_a_live_job_and_takes_over_a_stale_one(bench, tmp_path):
    env = env_for(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", "merge=task_arithmetic,weight_average", *bench, *CHEAP]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        for n, pid in (("0", sleeper.pid), ("1", _dead_pid())):
            (sweep / n).mkdir(parents=True)
            (sweep / n / ".featcal.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 1.0}))
        proc = featcal_run(args, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipped {sweep / '0'}: it is running in another process (pid {sleeper.pid}" in proc.stdout
        assert not (sweep / "0" / "results.json").exists()  # not run twice
        assert json.loads((sweep / "0" / ".featcal.lock").read_text())["pid"] == sleeper.pid
        assert (sweep / "1" / "results.json").exists() and not (sweep / "1" / ".featcal.lock").exists()
        assert "0 jobs skipped (complete results for the same config), 1 ran, 1 skipped as running in another process" in proc.stdout
        # the other process is gone: a rerun runs job 0, skips job 1, and counts exactly that
        sleeper.kill()
        sleeper.wait()
        again = featcal_run(args, env, tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.count("skipped: complete results for the same config") == 1
        assert "1 jobs skipped (complete results for the same config), 1 ran," in again.stdout
        assert not list(sweep.glob("*/.featcal-outcome-*"))  # the summary removed its records
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow  # a joblib sweep subprocess, SIGKILLed while its jobs run
def test_4_sigkill_of_joblib_launcher_ends_its_workers(bench, tmp_path):
    env = env_for(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", *bench, *CHEAP,
            "merge._target_=tests.fixtures.fault_helpers.slow_task_arithmetic", "+merge.seconds=120", "seed=0,1"]
    launcher = subprocess.Popen([sys.executable, "-m", "featcal.run", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(pids) < 2:
            time.sleep(1)
            pids = []
            for n in ("0", "1"):
                with_lock = sweep / n / ".featcal.lock"
                if with_lock.exists():
                    try:
                        pids.append(int(json.loads(with_lock.read_text())["pid"]))
                    except ValueError:
                        pass
        assert len(pids) == 2, "both jobs should hold their lock while running"
        assert launcher.pid not in pids  # joblib workers, not the launcher
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        from featcal.lock import pid_alive

        deadline = time.time() + 20
        while time.time() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.5)
        assert not any(pid_alive(p) for p in pids), "workers outlived their killed launcher"
        assert not (sweep / "0" / "results.json").exists()  # killed mid-way: nothing half-written
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# 6. cache faults: read-only, misplaced, stale build folders


class _Spec:
    """A minimal suite: one file, its manifest."""

    def problem(self, folder: Path):
        from featcal.cache import manifest_problem

        return manifest_problem(folder, "h", 1, ["a.txt"])

    def build(self, tmp: Path):
        from featcal.cache import write_manifest

        tmp.mkdir(parents=True)
        (tmp / "a.txt").write_text("payload")
        write_manifest(tmp, {"spec_hash": "h", "build_version": 1})


def _read_only_lock(monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def lock(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
        yield  # pragma: no cover

    monkeypatch.setattr("featcal.cache.file_lock", lock)


def test_6_read_only_empty_cache_names_featcal_cache(tmp_path, monkeypatch):
    from featcal.cache import ensure_folder

    _read_only_lock(monkeypatch)
    s = _Spec()
    with pytest.raises(CorruptCache) as err:
        ensure_folder(tmp_path / "suite" / "h", s.problem, s.build, "test suite")
    text = str(err.value)
    assert "is not built yet" in text and "read-only" in text and "FEATCAL_CACHE" in text


def test_6_read_only_corrupt_cache_says_corrupt(tmp_path, monkeypatch):
    from featcal.cache import ensure_folder

    s = _Spec()
    folder = tmp_path / "suite" / "h"
    ensure_folder(folder, s.problem, s.build, "test suite")
    (folder / "a.txt").write_text("PAYLOAD")  # same size, other bytes
    _read_only_lock(monkeypatch)
    with pytest.raises(CorruptCache) as err:
        ensure_folder(folder, s.problem, s.build, "test suite")
    text = str(err.value)
    assert "is corrupt (checksum mismatch for a.txt)" in text and "read-only" in text and "FEATCAL_CACHE" in text
    assert (folder / "a.txt").read_text() == "PAYLOAD"  # left as it was


def test_6_cache_under_a_file(tmp_path):
    from featcal.cache import ensure_folder

    (tmp_path / "afile").write_text("x")
    s = _Spec()
    with pytest.raises(CorruptCache) as err:
        ensure_folder(tmp_path / "afile" / "suite" / "h", s.problem, s.build, "test suite")
    assert "is a file, not a folder" in str(err.value) and "FEATCAL_CACHE" in str(err.value)


def test_6_featcal_cache_pointing_at_a_file_fails_validation(tmp_path, monkeypatch):
    from featcal.envcheck import environment_problems

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FEATCAL_CACHE", str(tmp_path / "afile"))
    problems = environment_problems(compose_cfg("backbone=embedded_small", "logger=none"), tmp_path)
    assert len(problems) == 1 and "is under a file" in problems[0] and "FEATCAL_CACHE" in problems[0]


def test_6_stale_tmp_build_folder_is_removed(tmp_path):
    from featcal.cache import ensure_folder

    s = _Spec()
    stale = tmp_path / "suite" / ".tmp-h-999999-deadbeef"  # a build killed mid-way
    (stale / "half").mkdir(parents=True)
    other = tmp_path / "suite" / ".tmp-other-1-aa"  # another suite's: not ours to remove
    other.mkdir()
    ensure_folder(tmp_path / "suite" / "h", s.problem, s.build, "test suite")
    assert not stale.exists() and other.exists()
    assert s.problem(tmp_path / "suite" / "h") is None


# ---------------------------------------------------------------------------
# 7. device checks at validation


def test_7_cuda_without_cuda_fails_before_loading(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(*bench, *CHEAP, "device=cuda")
    import featcal.run as run_mod

    monkeypatch.setattr(run_mod, "_build", lambda node: pytest.fail("loaded something"))
    code, out, err = guarded(cfg, tmp_path / "run", capsys)
    para = one_paragraph(err)
    assert code == 2 and "device=cuda: CUDA is not available here" in para and "use device=cpu" in para


def test_7_device_index_and_mps(monkeypatch):
    from featcal.envcheck import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") is None and device_problem("cuda") is None
    assert "only 2 CUDA device(s) here (cuda:0 ... cuda:1)" in device_problem("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "MPS is not available" in device_problem("mps")


def test_7_read_only_or_full_run_folder(tmp_path, monkeypatch):
    import shutil as _shutil
    import tempfile

    from featcal.envcheck import environment_problems

    cfg = compose_cfg("logger=none")

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", erofs)
        (p,) = environment_problems(cfg, tmp_path)
        assert "is not writable (read-only file system)" in p and "hydra.run.dir" in p
    real = _shutil.disk_usage
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    (p,) = environment_problems(cfg, tmp_path)
    assert "1.0 MiB free" in p and "hydra.run.dir" in p


# ---------------------------------------------------------------------------
# 8. smaller: unknown tasks, the run folder at start, resume keys, stale advice


@pytest.mark.parametrize("budget", ["8", "all"])
def test_8_unknown_task_is_reported_as_unknown(budget):
    from featcal.config import validate

    from omegaconf import OmegaConf

    cfg = compose_cfg("backbone=embedded_small", "backbone.tasks=[inverted,mnist]", f"budget.per_task={budget}")
    with pytest.raises(ConfigError) as err:
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert "unknown task(s) ['mnist']" in str(err.value) and "has no size" not in str(err.value)
    assert "known: inverted, mirror, rot90, transpose" in str(err.value)


def test_8_resume_hash_ignores_presentation_and_resolves_auto(monkeypatch):
    from featcal.resume import config_hash

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    base = config_hash(job(compose_cfg("logger=wandb", "device=auto")))
    assert config_hash(job(compose_cfg("logger=none", "device=cpu"))) == base
    assert config_hash(job(compose_cfg("logger=wandb", "logger.mode=online", "calibration.progress=false", "debug=true"))) == base
    assert config_hash(job(compose_cfg("budget.per_task=8"))) != base
    assert config_hash(job(compose_cfg("device=cuda"))) != base


def test_8_resume_still_recognises_results_stored_under_the_old_hash(tmp_path, capsys):
    from featcal.resume import config_hash, previous_results

    cfg = job(compose_cfg("logger=none"))
    (tmp_path / "results.json").write_text(json.dumps({"config_hash": config_hash(cfg, legacy=True), "score": {}}))
    assert previous_results(cfg, tmp_path) is not None


@pytest.mark.slow  # featcal-run subprocesses that fail before any model loads
def test_8_unusable_run_folder_at_start(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = featcal_run(["logger=none", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], env_for(tmp_path), tmp_path)
    para = one_paragraph(proc.stderr)
    assert proc.returncode == 2 and "cannot create or write the run folder" in para and "hydra.run.dir" in para


def test_8_full_disk_at_start_is_a_featcal_message(tmp_path, capsys, monkeypatch):
    """Hydra writes .hydra/config.yaml into the new run folder: ENOSPC there."""
    import builtins

    import featcal.run as run_mod

    def full(path, mode="r", *a, **k):
        if str(path).startswith(str(tmp_path)) and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr("hydra.core.utils.open", full, raising=False)
    monkeypatch.setattr(sys, "argv", ["featcal-run", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(run_mod, "run", lambda cfg, out: pytest.fail("the run should not start"))
    with pytest.raises(SystemExit) as ex:
        run_mod.main()
    err = capsys.readouterr().err
    para = one_paragraph(err)
    assert ex.value.code == 2 and "the disk is full" in para and "hydra.run.dir" in para


def test_8_no_advice_shows_the_rejected_budget_syntax():
    import featcal.resume

    assert "budget=8" not in errors.memory_advice("calibrate").replace("budget.per_task=8", "")
    assert " budget=8" not in (featcal.resume.__doc__ or "")
