"""User-fixable failures (issue 15): one `featcal: ...` paragraph, no traceback, exit code 2;
failed.json per run; a multirun sweep goes on past a failed job and featcal-report collect lists it.

The subprocess tests (marked ``slow``) run ``python -m featcal.run`` on tiny local models;
the others check the loaders' exceptions and the report logic in-process.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.fixtures.clip import make_tiny_clip, make_tiny_clip_benchmark, make_tiny_expert
from featcal import errors
from featcal.backbone.clip import CLIPVisionBackbone, load_clip_vision
from featcal.errors import (
    BudgetTooLarge,
    CheckpointMismatch,
    ConfigError,
    FeatcalError,
    SourceUnavailable,
    TaskMismatch,
)
from featcal.utils import StageTimer


def _tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def _truncate(folder: Path) -> Path:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f


# ---- the exception family -------------------------------------------------------------


def test_one_family_imported_from_one_module():
    root = Path(__file__).resolve().parents[2]
    names = r"(ConfigError|SourceUnavailable|CheckpointMismatch|BudgetTooLarge|TaskMismatch|CorruptCache|ResultsNotWritten)"
    pattern = re.compile(r"from featcal\.(?!errors\b)[\w.]+ import [^\n]*\b" + names + r"\b")
    hits = [f"{p.relative_to(root)}:{i}" for d in ("featcal", "tests", "experiments") for p in (root / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == [], f"import featcal's errors from featcal.errors only: {hits}"
    for cls in (ConfigError, BudgetTooLarge, TaskMismatch, SourceUnavailable, CheckpointMismatch, errors.CorruptCache):
        assert issubclass(cls, FeatcalError)
    assert issubclass(ConfigError, ValueError) and issubclass(SourceUnavailable, RuntimeError)
    err = SourceUnavailable("model 'x/y' is missing", "Download it.")
    assert str(err) == "model 'x/y' is missing. Download it." and err.one_line == "model 'x/y' is missing"
    with pytest.raises(TaskMismatch, match=r"\['a', 'b'\].*\['b', 'a'\]"):
        errors.check_tasks(["a", "b"], ["b", "a"])
    errors.check_tasks(["a"], ["a"])


def test_loading_context_names_the_key():
    with pytest.raises(SourceUnavailable) as info:
        with errors.loading("the expert of task 'mnist', set by backbone.adapter.experts.mnist"):
            raise SourceUnavailable("model folder '/x' does not exist", "Check the path.")
    assert "backbone.adapter.experts.mnist" in str(info.value) and "backbone.adapter.experts.mnist" in info.value.one_line


# ---- loaders ----------------------------------------------------------------------------


def test_clip_loader_rejects_a_llama_checkpoint(tmp_path):
    llama = _tiny_llama(tmp_path / "llama")
    with pytest.raises(CheckpointMismatch, match="llama") as info:
        load_clip_vision(str(llama))
    assert str(llama) in str(info.value)
    # without model_type in config.json the weights give it away
    cfg = json.loads((llama / "config.json").read_text())
    cfg.pop("model_type")
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="no CLIP vision tower weights"):
        load_clip_vision(str(llama))


def test_truncated_safetensors_names_the_file(tmp_path):
    make_tiny_clip(tmp_path / "clip")
    f = _truncate(tmp_path / "clip")
    with pytest.raises(SourceUnavailable, match="truncated or corrupt") as info:
        load_clip_vision(str(tmp_path / "clip"))
    assert str(f) in str(info.value) and info.value.__cause__ is not None  # the safetensors error is chained


def test_expert_of_another_shape_is_a_checkpoint_mismatch(tmp_path):
    make_tiny_clip(tmp_path / "base")
    make_tiny_expert(tmp_path / "base", tmp_path / "expert", seed=1)
    cfg = json.loads((tmp_path / "expert" / "config.json").read_text())
    cfg["intermediate_size"] = 48  # config and weights disagree
    (tmp_path / "expert" / "config.json").write_text(json.dumps(cfg))
    backbone = CLIPVisionBackbone(["mnist"], str(tmp_path / "base"), {"mnist": str(tmp_path / "expert")})
    backbone.load_base()
    with pytest.raises(CheckpointMismatch, match="size mismatch|does not fit") as info:
        backbone.load_expert("mnist")
    assert "backbone.adapter.experts.mnist" in str(info.value)
    # a tower of another width than the base: both load, but they cannot be merged
    from featcal.backbone.clip import check_same_architecture

    other = tmp_path / "other"
    make_tiny_clip(other)
    base = load_clip_vision(str(tmp_path / "base"))
    wider = load_clip_vision(str(other))
    wider.visual_projection = torch.nn.Linear(32, 8, bias=False)
    with pytest.raises(CheckpointMismatch, match="not the same architecture"):
        check_same_architecture(base, wider, "base", str(other))


def test_llm_loader_errors(tmp_path):
    from featcal.backbone.llama import LlamaBackbone
    from featcal.io.lazy import load_causal_lm

    make_tiny_clip(tmp_path / "clip")
    with pytest.raises(CheckpointMismatch, match="'clip' checkpoint, which is not a causal language model"):
        load_causal_lm(str(tmp_path / "clip"))
    llama = _tiny_llama(tmp_path / "llama")
    assert load_causal_lm(str(llama)) is not None
    deeper = tmp_path / "deeper"
    shutil.copytree(llama, deeper)
    cfg = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointMismatch, match="do not cover the model .*model.layers.1"):
        load_causal_lm(str(deeper))
    (deeper / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(CheckpointMismatch, match="shapes differ"):
        load_causal_lm(str(deeper))
    (deeper / "config.json").write_text(json.dumps(cfg))
    bad = _truncate(deeper)
    backbone = LlamaBackbone(["a"], str(llama), {"a": str(deeper)})
    with pytest.raises(SourceUnavailable, match="truncated or corrupt") as info:
        backbone.load_expert("a")
    assert str(bad) in str(info.value) and "backbone.adapter.experts.a" in str(info.value)


def test_missing_local_folder_and_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceUnavailable, match="does not exist"):
        load_clip_vision(str(tmp_path / "nope"))
    from featcal.io.datasets import hub_failure_reason
    from featcal.io.hub import offline_advice, offline_hint

    msg = hub_failure_reason("model", "owner/model") + ". " + offline_advice("model", "owner/model")
    assert "owner/model" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download owner/model" in msg
    assert "'owner/model'" in offline_hint("model", "owner/model") and "hf download owner/model" in offline_hint("model", "owner/model")


# ---- the report ---------------------------------------------------------------------------


def _cfg(**over):
    base = {"precision": "fp32", "eval_batch_size": 256, "debug": False,
            "calibration": {"_target_": "featcal.calibration.feature_calibration.FeatCal", "pass_tokens": 4096, "batch_size": 16},
            "budget": {"per_task": 64}}
    base.update(over)
    return OmegaConf.create(base)


def test_guard_single_run_exits_2_with_one_paragraph(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def fail():
        timer = StageTimer()
        with timer.stage("load"):
            try:
                raise OSError("low-level detail")
            except OSError as err:
                raise SourceUnavailable("model 'x/y' is missing", "Download it.") from err

    with pytest.raises(SystemExit) as info:
        errors.guard(fail, _cfg(), tmp_path, multirun=False, job={"overrides": ["a=1"]})
    assert info.value.code == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("featcal: model 'x/y' is missing. Download it.")
    assert "Traceback" not in err and "low-level detail" not in err
    record = json.loads((tmp_path / "failed.json").read_text())
    assert record["error"] == "SourceUnavailable" and record["stage"] == "load" and record["overrides"] == ["a=1"]
    assert record["reason"] == "model 'x/y' is missing" and record["exit_code"] == 2


def test_guard_debug_shows_the_chain(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def fail():
        try:
            raise OSError("low-level detail")
        except OSError as err:
            raise SourceUnavailable("model 'x/y' is missing") from err

    with pytest.raises(SystemExit):
        errors.guard(fail, _cfg(debug=True), tmp_path, multirun=False)
    err = capsys.readouterr().err
    assert "Traceback" in err and "low-level detail" in err and "featcal: model 'x/y' is missing" in err


def test_guard_multirun_returns_and_success_clears_failed(tmp_path, capsys):
    out = errors.guard(lambda: (_ for _ in ()).throw(BudgetTooLarge("budget 64 > 16 examples of task 'mnist'")), _cfg(), tmp_path, multirun=True, job={"job_num": 3})
    assert out is None and (tmp_path / "failed.json").exists()
    assert "job #3 failed" in capsys.readouterr().err
    assert errors.guard(lambda: 7, _cfg(), tmp_path, multirun=True) == 7
    assert not (tmp_path / "failed.json").exists()  # a rerun that succeeds leaves no stale failure


def test_guard_reraises_crashes_but_records_them(tmp_path):
    with pytest.raises(ZeroDivisionError):
        errors.guard(lambda: 1 / 0, _cfg(), tmp_path, multirun=True)
    record = json.loads((tmp_path / "failed.json").read_text())
    assert record["kind"] == "crash" and record["error"] == "ZeroDivisionError" and record["exit_code"] == 1


def test_guard_unwraps_hydra_instantiation_errors(tmp_path):
    from hydra.utils import instantiate

    node = {"_target_": "featcal.errors.check_tasks", "pool_tasks": ["a"], "backbone_tasks": ["b"]}
    with pytest.raises(SystemExit) as info:
        errors.guard(lambda: instantiate(node), _cfg(), tmp_path, multirun=False)
    assert info.value.code == 2
    assert json.loads((tmp_path / "failed.json").read_text())["error"] == "TaskMismatch"


def test_out_of_memory_names_the_stage_and_its_knobs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def oom(stage):
        def fn():
            with StageTimer().stage(stage):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fn

    with pytest.raises(SystemExit) as info:
        errors.guard(oom("calibrate"), _cfg(), tmp_path, multirun=False)
    assert info.value.code == errors.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "out of GPU memory during stage 'calibrate'" in err
    assert "calibration.pass_tokens=2048 (now 4096)" in err and "precision=bf16" in err and "budget" in err
    with pytest.raises(SystemExit):
        errors.guard(oom("evaluate_merged"), _cfg(precision="bf16"), tmp_path, multirun=False)
    err = capsys.readouterr().err
    assert "eval_batch_size=128 (now 256)" in err and "pass_tokens" not in err and "precision=bf16" not in err
    assert json.loads((tmp_path / "failed.json").read_text())["kind"] == "out_of_memory"
    assert errors.guard(oom("calibrate"), _cfg(), tmp_path, multirun=True) is None  # a sweep goes on
    assert errors.sweep_exit_code([{"exit_code": 3}]) == 3 and errors.sweep_exit_code([{"exit_code": 3}, {"exit_code": 2}]) == 2


def test_out_of_memory_advice_lists_the_configured_calibrators_own_knobs():
    """The calibrate-stage knobs under ``calibration.`` come from the calibrator class's
    ``memory_knobs`` declaration, not from a list in errors.py."""
    from featcal.calibration.base import NoCalibration
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.calibration.surgery import ProbSurgery, Surgery

    assert FeatCal.memory_knobs == {"pass_tokens": "half", "drift_examples": "half"}
    assert Surgery.memory_knobs == ProbSurgery.memory_knobs == {"batch_size": "half"}
    assert NoCalibration.memory_knobs == {}

    def advice(target, stage="calibrate"):
        cfg = _cfg(calibration={"_target_": target, "pass_tokens": 4096, "drift_examples": 8, "batch_size": 16},
                   budget={"per_task": 64, "batch_size": 32})
        return errors.memory_advice(stage, cfg)

    fc = advice("featcal.calibration.feature_calibration.FeatCal")
    assert "calibration.pass_tokens=2048 (now 4096)" in fc and "calibration.drift_examples=4 (now 8)" in fc
    assert "calibration.batch_size" not in fc and "budget.batch_size=16 (now 32)" in fc and "budget.per_task=32 (now 64)" in fc
    sg = advice("featcal.calibration.surgery.Surgery")
    assert "calibration.batch_size=8 (now 16)" in sg and "pass_tokens" not in sg and "drift_examples" not in sg
    none = advice("featcal.calibration.base.NoCalibration")
    assert "calibration." not in none and "budget.per_task=32 (now 64)" in none
    # loading the calibration data: the run's batch size, whatever the calibrator
    assert advice("featcal.calibration.surgery.Surgery", "calibration_data") == "budget.batch_size=16 (now 32); or device=cpu"


def test_collect_lists_failed_jobs(tmp_path, capsys):
    from featcal.report.collect import failed_table

    for num, value in ((0, "8"), (1, "9999")):
        run = tmp_path / str(num)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- budget.per_task={value}\n- logger=none\n")
    errors.write_failed(tmp_path / "1", {"error": "BudgetTooLarge", "reason": "budget 9999 too large", "stage": "calibration_data",
                                         "overrides": ["budget.per_task=9999", "logger=none"]})
    rows = failed_table(tmp_path)
    assert rows == [{"run": "1", "status": "failed", "overrides": "budget.per_task=9999", "stage": "calibration_data",
                     "error": "BudgetTooLarge", "reason": "budget 9999 too large"}]


# ---- through featcal-run ------------------------------------------------------------------


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HOME=str(tmp_path / "home"), FEATCAL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]),
    )
    return env


def featcal_run(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "featcal.run", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


FAST = ["calibration=none", "evaluate_experts=false", "evaluate_base=false", "logger=none", "device=cpu", "budget.per_task=4"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny two-task CLIP world, a Llama folder and a truncated copy of an expert."""
    root = tmp_path_factory.mktemp("errors_bench")
    overrides = make_tiny_clip_benchmark(root, tasks=("mnist", "eurosat"), n_train=8, n_test=8)
    _tiny_llama(root / "llama")
    shutil.copytree(root / "clip_expert_eurosat", root / "truncated_expert")
    _truncate(root / "truncated_expert")
    return root, overrides


def _replace(overrides, key, value):
    return [o for o in overrides if not o.startswith(key + "=")] + [f"{key}={value}"]


def test_clip_pool_budget_too_large_and_unreadable_head_cache(tmp_path, bench):
    from featcal.tasks.clip_vision import CLIPVisionTaskPool

    root, _ = bench

    def pool():
        return CLIPVisionTaskPool(["mnist"], str(root / "clip_base"), datasets={"mnist": str(root / "clip_data_mnist")},
                                  cache_dir=str(tmp_path / "heads"), device="cpu")

    with pytest.raises(BudgetTooLarge, match="budget 9 .*8 examples") as info:
        pool().calibration_indices("mnist", 9, seed=0)
    assert "budget.per_task=8" in str(info.value)
    first = pool().build_heads()["mnist"]
    cached = pool().head_cache_file("mnist")
    cached.write_bytes(cached.read_bytes()[:20])  # a cut-off cache file is rebuilt, not fatal
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = pool().build_heads()["mnist"]
    torch.testing.assert_close(again.class_embeddings, first.class_embeddings)
    with pytest.raises(ConfigError, match="unknown CLIP tasks"):
        CLIPVisionTaskPool(["no-such-task"], str(root / "clip_base"))


@pytest.mark.slow
def test_run_missing_hub_model_offline(tmp_path):
    proc = featcal_run(["backbone=clip_vit_b32", *FAST, f"hydra.run.dir={tmp_path / 'r'}"], _env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # checked before anything loads: every missing model and dataset in one message
    assert "featcal: 17 model/dataset source(s) not available" in proc.stderr
    assert "  - model 'openai/clip-vit-base-patch32' is not in the hub cache" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "hf download openai/clip-vit-base-patch32" in proc.stderr
    assert "backbone.adapter.base" in proc.stderr
    assert json.loads((tmp_path / "r" / "failed.json").read_text())["error"] == "SourceUnavailable"


@pytest.mark.slow
def test_run_missing_local_folder_and_debug(tmp_path):
    missing = tmp_path / "no_such_model"
    args = ["backbone=clip_vit_b32", f"backbone.adapter.base={missing}", *FAST, f"hydra.run.dir={tmp_path / 'r'}"]
    proc = featcal_run(args, _env(tmp_path), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"model folder '{missing}' does not exist" in proc.stderr
    # debug=true: the full traceback, then the same paragraph and exit code
    proc = featcal_run(args + ["debug=true"], _env(tmp_path), tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "featcal.errors.SourceUnavailable" in proc.stderr
    assert re.search(r"^featcal: \d+ model/dataset source\(s\) not available", proc.stderr, re.M)


@pytest.mark.slow
def test_run_checkpoint_of_the_wrong_architecture(tmp_path, bench):
    root, overrides = bench
    args = _replace(overrides, "backbone.adapter.experts.mnist", root / "llama") + FAST + [f"hydra.run.dir={tmp_path / 'r'}"]
    proc = featcal_run(args, _env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"'{root / 'llama'}' is a 'llama' checkpoint" in proc.stderr
    assert "backbone.adapter.experts.mnist" in proc.stderr
    assert json.loads((tmp_path / "r" / "failed.json").read_text())["error"] == "CheckpointMismatch"


@pytest.mark.slow
def test_sweep_with_a_truncated_checkpoint_goes_on_and_collect_reports_both(tmp_path, bench):
    root, overrides = bench
    sweep = tmp_path / "sweep"
    args = ["-m", *_replace(overrides, "backbone.adapter.experts.eurosat", f"{root / 'truncated_expert'},{root / 'clip_expert_eurosat'}"),
            *FAST, f"hydra.sweep.dir={sweep}"]
    proc = featcal_run(args, _env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    bad = root / "truncated_expert" / "model.safetensors"
    assert f"weights file '{bad}'" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert "1 job(s) of the sweep" in proc.stderr
    assert (sweep / "0" / "failed.json").exists() and not (sweep / "0" / "results.json").exists()
    assert (sweep / "1" / "results.json").exists() and not (sweep / "1" / "failed.json").exists()

    col = subprocess.run([sys.executable, "-m", "featcal.report", "collect", str(sweep)], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert col.returncode == 0, col.stderr
    assert "Failed jobs (1)" in col.stdout and "truncated or corrupt" in col.stdout and "1 runs, 1 failed" in col.stdout
    md = (sweep / "collected.md").read_text()
    assert "clip_vit_b32" in md and "Failed jobs (1)" in md and "SourceUnavailable" in md
    import pandas as pd

    failed = pd.read_csv(sweep / "failed.csv")
    assert failed["run"].astype(str).tolist() == ["0"] and "truncated_expert" in failed["overrides"].item()
    assert pd.read_csv(sweep / "collected.csv")["run_dir"].nunique() == 1
