"""The reference-evaluation cache: experts and base scored once per model x task x eval
settings, reused by later jobs (unit level with counting evaluators, and through
``featcal.run.run`` on the tiny CLIP benchmark in the hub/local layouts)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from featcal.refcache import ReferenceCache, folder_fingerprint, model_identity, weights_hash

CONF = Path(__file__).resolve().parents[2] / "conf"
TASKS = ["a", "b", "c"]


def _models(seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(4, 3) for _ in TASKS]


class Counter:
    """A stand-in task pool evaluation: a score that depends on the model's weights."""

    def __init__(self):
        self.calls: list = []

    def score(self, model, task):
        return {"accuracy": float(model.weight.detach().sum()) + TASKS.index(task)}

    def expert(self, experts):
        def ev(i):
            self.calls.append(("expert", i))
            return {TASKS[i]: self.score(experts[i], TASKS[i])}
        return ev

    def base(self, base):
        def ev(only):
            self.calls.append(("base", only))
            idx = range(len(TASKS)) if only is None else only
            return {TASKS[i]: self.score(base, TASKS[i]) for i in idx}
        return ev


SETTINGS = {"backbone": {"x": 1}, "precision": "fp32"}


def test_experts_evaluated_once_then_reused(tmp_path):
    experts, c = _models(), Counter()
    first = ReferenceCache(SETTINGS, tmp_path)
    got = first.experts(experts, TASKS, c.expert(experts))
    assert first.status == {"experts": "evaluated"} and len(c.calls) == 3
    second = ReferenceCache(dict(SETTINGS), tmp_path)
    again = second.experts(experts, TASKS, c.expert(experts))
    assert second.status == {"experts": "reused"} and len(c.calls) == 3  # no new evaluation
    assert again == got  # JSON round trip of floats is exact


def test_other_weights_settings_or_disabled_are_not_reused(tmp_path):
    experts, c = _models(), Counter()
    ReferenceCache(SETTINGS, tmp_path).experts(experts, TASKS, c.expert(experts))
    with torch.no_grad():
        experts[1].weight[0, 0] += 1e-6  # one weight of one expert changes: only it is re-evaluated
    rc = ReferenceCache(SETTINGS, tmp_path)
    got = rc.experts(experts, TASKS, c.expert(experts))
    assert c.calls[3:] == [("expert", 1)] and rc.status["experts"] == "reused 2/3"
    assert got["b"] == c.score(experts[1], "b")
    other = ReferenceCache({**SETTINGS, "precision": "bf16"}, tmp_path)
    other.experts(experts, TASKS, c.expert(experts))
    assert len(c.calls) == 7 and other.status["experts"] == "evaluated"
    off = ReferenceCache(SETTINGS, tmp_path, enabled=False)
    off.experts(experts, TASKS, c.expert(experts))
    assert len(c.calls) == 10 and off.status["experts"] == "evaluated (disabled)"


def test_base_evaluates_only_missing_tasks(tmp_path):
    base, c = nn.Linear(4, 3), Counter()
    rc = ReferenceCache(SETTINGS, tmp_path)
    full = rc.base(base, TASKS, c.base(base))
    assert c.calls == [("base", None)]  # nothing stored: the ordinary all-task call
    # a job on a task subset then one on more tasks: only the new task is evaluated
    sub = ReferenceCache(SETTINGS, tmp_path).base(base, ["a", "b"], c.base(base))
    assert len(c.calls) == 1 and sub == {t: full[t] for t in ("a", "b")}
    path = ReferenceCache(SETTINGS, tmp_path)._path("base", model_identity(base), "c")
    path.unlink()
    rc2 = ReferenceCache(SETTINGS, tmp_path)
    again = rc2.base(base, TASKS, c.base(base))
    assert c.calls[1:] == [("base", [2])] and again == full and rc2.status["base"] == "reused 2/3"
    assert list(again) == TASKS


def test_corrupt_entry_is_reevaluated(tmp_path):
    experts, c = _models(), Counter()
    rc = ReferenceCache(SETTINGS, tmp_path)
    rc.experts(experts, TASKS, c.expert(experts))
    rc._path("expert", model_identity(experts[0]), "a").write_text("{not json")
    rc2 = ReferenceCache(SETTINGS, tmp_path)
    rc2.experts(experts, TASKS, c.expert(experts))
    assert c.calls[3:] == [("expert", 0)]


def test_concurrent_jobs_evaluate_once(tmp_path):
    experts, c = _models(), Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def slow(i):
        with lock:
            c.calls.append(("expert", i))
        return {TASKS[i]: c.score(experts[i], TASKS[i])}

    results = []

    def job():
        barrier.wait()
        results.append(ReferenceCache(SETTINGS, tmp_path).experts(experts, TASKS, slow))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.calls) == [("expert", 0), ("expert", 1), ("expert", 2)]
    assert results[0] == results[1]


def test_identities():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    assert weights_hash(a) != weights_hash(a.to(torch.bfloat16))  # the precision cast counts
    c = nn.Linear(4, 3)
    c.load_state_dict(a.state_dict())
    c.register_buffer("extra", torch.zeros(1))
    assert weights_hash(c) != weights_hash(b)


def test_a_model_on_disk_is_identified_through_its_adapter(tmp_path):
    """The identity of an on-disk model is its folder's fingerprint and its read settings, as
    the model adapter reports them (the same key as before the storage API)."""
    from transformers import AutoModelForCausalLM

    from featcal.io.lazy import LazyCausalLM
    from featcal.backbone.llama import LlamaBackbone
    from tests.fixtures.llm import config

    AutoModelForCausalLM.from_config(config("llama")).save_pretrained(tmp_path)
    lazy = LazyCausalLM(tmp_path, "bfloat16", "sdpa")
    adapter = LlamaBackbone([], base="", experts=[])
    assert model_identity(lazy, adapter) == f"folder:{folder_fingerprint(tmp_path)}|torch.bfloat16|sdpa"
    assert model_identity(LazyCausalLM(tmp_path, "float32", "sdpa"), adapter) != model_identity(lazy, adapter)
    assert model_identity(lazy) is None  # no adapter to ask: not cached, evaluated
    linear = nn.Linear(2, 2)
    assert model_identity(linear, adapter) == model_identity(linear) == "weights:" + weights_hash(linear)


def test_folder_fingerprint(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    fp = folder_fingerprint(tmp_path)
    assert fp == folder_fingerprint(tmp_path)
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "model.safetensors"))  # another header
    assert folder_fingerprint(tmp_path) != fp


# ---- through the run, on the tiny CLIP benchmark ------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    from tests.fixtures.clip import make_tiny_clip_benchmark

    return make_tiny_clip_benchmark(tmp_path_factory.mktemp("bench"), tasks=("mnist", "eurosat"), n_train=16, n_test=12)


def _cfg(bench, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=[*bench, "logger=none", "device=cpu", "budget.per_task=8", "budget.batch_size=4",
                                  "calibration=none", *overrides])


def test_run_reuses_reference_scores(bench, tmp_path, monkeypatch, capsys):
    from featcal.run import run

    monkeypatch.setenv("FEATCAL_CACHE", str(tmp_path / "cache"))
    r1 = run(_cfg(bench, "merge=task_arithmetic"), tmp_path / "r1")
    assert r1["reference_cache"] == {"experts": "evaluated", "base": "evaluated"}
    # another merge and batch size: the references are the same models, same settings
    r2 = run(_cfg(bench, "merge=weight_average", "eval_batch_size=5"), tmp_path / "r2")
    assert r2["reference_cache"] == {"experts": "reused", "base": "reused"}
    assert "reference cache: experts reused" in capsys.readouterr().out
    for stage in ("experts", "base"):
        assert r2["metrics"][stage] == r1["metrics"][stage]
    assert json.loads((tmp_path / "r2" / "results.json").read_text())["reference_cache"]["experts"] == "reused"
    # a setting that changes scores (the precision) is a new entry
    r3 = run(_cfg(bench, "merge=task_arithmetic", "precision=bf16"), tmp_path / "r3")
    assert r3["reference_cache"] == {"experts": "evaluated", "base": "evaluated"}
    # disabled: evaluated, and the numbers equal the cached ones (the cache changes nothing)
    r4 = run(_cfg(bench, "merge=task_arithmetic", "reference_cache=false"), tmp_path / "r4")
    assert r4["reference_cache"] == {"experts": "evaluated (disabled)", "base": "evaluated (disabled)"}
    assert r4["metrics"]["experts"] == r1["metrics"]["experts"] and r4["metrics"]["base"] == r1["metrics"]["base"]


# ---- presets: no identical jobs ------------------------------------------------------
def _jobs(preset: str, *extra: str):
    """The preset's swept jobs as Hydra's basic sweeper lists them, and a composer."""
    import itertools

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", *extra], return_hydra_config=True)
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]

        def composer(overrides):
            return compose(config_name="config", overrides=[f"experiment={preset}", *extra, *overrides])

        yield cfg, jobs, composer


def test_embedded_table_runs_calibration_none_once():
    from featcal.sweeper import unique_jobs

    for cfg, jobs, composer in _jobs("embedded_table"):
        assert cfg.hydra.sweeper._target_ == "hydra_plugins.featcal_sweeper.DedupSweeper"
        assert len(jobs) == 12
        keep, dropped = unique_jobs(jobs, composer)
    assert len(keep) == 10 and len(dropped) == 2
    assert all("calibration=none" in j for j, _ in dropped)
    assert sum("calibration=none" in j for j in keep) == 1
    # every calibrator that reads data keeps its three budgets
    for cal in ("featcal", "surgery", "probsurgery"):
        assert sum(f"calibration={cal}" in j for j in keep) == 3


def test_a_merge_that_reads_data_keeps_every_budget():
    from featcal.sweeper import unique_jobs

    for _cfg, jobs, composer in _jobs("embedded_table", "merge=regmean"):
        keep, dropped = unique_jobs(jobs, composer)
    assert len(keep) == 12 and dropped == []  # RegMean reads the calibration set: budgets differ


def test_embedded_scaling_drops_only_budget_duplicates():
    from featcal.sweeper import unique_jobs

    for _cfg, jobs, composer in _jobs("embedded_scaling"):
        keep, dropped = unique_jobs(jobs, composer)
    assert len(jobs) == 27 and len(keep) == 21
    assert sum("calibration=none" in j for j in keep) == 3  # once per task count

