"""The embedded text-to-text suite: synthetic tasks, tokenizer, the normal T5 loaders, the
pool's scorer, and the merge regime (its cache's determinism, reuse and corruption
handling: ``test_suite_cache.py``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from featcal.backbone.t5 import load_t5, load_t5_tokenizer
from featcal.suites.embedded_t5.adapter import EmbeddedT5Backbone
from featcal.suites.embedded_t5.build import (
    build,
    cache_path,
    ensure_built,
    make_task_data,
    make_tokenizer,
    read_manifest,
)
from featcal.suites.embedded_t5.data import DEFAULT_TASKS, PRETRAIN, TASKS, vocabulary
from featcal.suites.embedded_t5.pool import EmbeddedT5TaskPool
from featcal.suites.embedded_t5.spec import EmbeddedT5Spec, expected_split_sizes

from tests.fixtures.embedded import EMBEDDED_T5_TINY as TINY  # a tiny build (a few seconds)
from tests.fixtures.embedded import assert_same_files_on_a_lower_isa, build_as_a_user



@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("cache")
    spec = EmbeddedT5Spec.from_config(TINY)
    folder = ensure_built(spec, cache, device="cpu", progress=False)
    return spec, cache, folder


def _yaml(name: str):
    from featcal.config import compose

    return compose([f"backbone={name}"])  # the preset with its model and task pool (conf/model, conf/taskpool)


# ---- tasks and tokenizer ------------------------------------------------------------------
def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    assert len(vocab) == len(vocabulary())  # no duplicates
    rng = random.Random(0)
    for name, task in TASKS.items():
        labels = []
        for _ in range(400):
            prompt, word, y = task.example(rng)
            assert set(prompt.split()) <= vocab, name
            assert word == task.labels[y] and word in vocab
            labels.append(y)
        # every label occurs, none dominates
        counts = [labels.count(i) for i in range(len(task.labels))]
        assert min(counts) > 0.3 * len(labels) / len(task.labels), (name, counts)
    for name, gen in PRETRAIN.items():
        for _ in range(200):
            src, tgt = gen(rng)
            assert set(src.split()) | set(tgt.split()) <= vocab, name


def test_task_answers_follow_their_rule():
    rng = random.Random(1)
    for _ in range(200):
        prompt, word, _ = TASKS["length"].example(rng)
        n = len(prompt.split()) - len("is the list short or long ?".split())
        assert word == ("short" if n <= 4 else "long")
        prompt, word, _ = TASKS["majority"].example(rng)
        ws = prompt.split()
        assert word == ("red" if ws.count("red") - 1 > ws.count("blue") - 1 else "blue")
        prompt, word, _ = TASKS["has_number"].example(rng)
        inner = prompt.split("'")[1].split()
        assert word == ("yes" if any(w.isdigit() for w in inner) else "no")


def test_task_data_is_deterministic_and_seeded():
    spec = EmbeddedT5Spec.from_config(TINY)
    a, b = make_task_data(spec, "sentiment"), make_task_data(spec, "sentiment")
    assert a == b
    assert len(a["train"]) == spec.n_train and len(a["test"]) == spec.n_test
    other = make_task_data(EmbeddedT5Spec.from_config({**TINY, "seed": 1}), "sentiment")
    assert other != a


def test_tokenizer_round_trip(tmp_path):
    tok = make_tokenizer()
    tok.save_pretrained(str(tmp_path))
    loaded = load_t5_tokenizer(str(tmp_path))
    text = "is the list dog cat short or long ?"
    ids = loaded(text)["input_ids"]
    assert ids[-1] == loaded.eos_token_id == 1 and loaded.pad_token_id == 0
    assert loaded.unk_token_id not in ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert ids == tok(text)["input_ids"]


# ---- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["embedded_t5", "embedded_t5_small"])
def test_yaml_split_sizes_match_code(name):
    cfg = _yaml(name)
    spec = OmegaConf.to_container(cfg.backbone.spec, resolve=True)
    sizes = expected_split_sizes(spec)
    assert OmegaConf.to_container(cfg.backbone.train_sizes) == sizes["train"]
    assert OmegaConf.to_container(cfg.backbone.test_sizes) == sizes["test"]
    if name == "embedded_t5":
        assert min(sizes["train"].values()) >= 256
        assert len(spec["tasks"]) >= 6


def test_default_yaml_is_the_default_spec():
    spec = OmegaConf.to_container(_yaml("embedded_t5").backbone.spec, resolve=True)
    assert EmbeddedT5Spec.from_config(spec) == EmbeddedT5Spec()
    assert EmbeddedT5Spec().tasks == DEFAULT_TASKS


def test_spec_rejects_unknown_keys_and_tasks():
    with pytest.raises(ValueError, match="unknown embedded_t5 spec key"):
        EmbeddedT5Spec.from_config({"dmodel": 8})
    with pytest.raises(ValueError, match="unknown embedded_t5 task"):
        EmbeddedT5Spec.from_config({"tasks": ["sentiment", "nope"]})
    with pytest.raises(ValueError, match="disagree"):
        EmbeddedT5Backbone(tasks=["sentiment"], spec={"tasks": ["length"]})
    assert EmbeddedT5Backbone.validate_config({"spec": {"tasks": ["nope"]}})
    assert EmbeddedT5TaskPool.validate_config({"spec": {"pretrain_mix": 2.0}})
    assert EmbeddedT5TaskPool.validate_config({"spec": dict(TINY)}) == []


# ---- build and cache ------------------------------------------------------------------------
def test_folders_load_through_the_normal_t5_loaders(built):
    spec, _, folder = built
    from transformers import T5ForConditionalGeneration

    for sub in ["base"] + [f"experts/{t}" for t in spec.tasks]:
        model = load_t5(str(folder / sub))
        assert isinstance(model, T5ForConditionalGeneration)
        assert model.config.feed_forward_proj == "gated-gelu"
        # FLAN-T5's (T5 v1.1) head: no d_model^-0.5 scaling of the decoder output
        assert model.config.scale_decoder_outputs is False
        assert model.config.d_model == spec.d_model and model.config.num_layers == spec.layers
        tok = load_t5_tokenizer(str(folder / sub))
        assert len(tok) == model.config.vocab_size == len(vocabulary())
    # experts differ from the base (they were fine-tuned)
    base = load_t5(str(folder / "base")).state_dict()
    expert = load_t5(str(folder / "experts" / spec.tasks[0])).state_dict()
    assert any(not torch.equal(base[k], expert[k]) for k in base)


# ---- adapter and pool ---------------------------------------------------------------------
def test_hydra_instantiation_and_pool_scores_like_the_build(built, tmp_path):
    spec, cache, folder = built
    cfg = _yaml("embedded_t5_small")
    cfg.backbone.spec = OmegaConf.create(spec.to_dict())
    cfg.backbone.cache_dir = str(cache)
    cfg.backbone.taskpool.progress = False
    adapter = instantiate(OmegaConf.to_container(cfg.backbone.adapter, resolve=True))
    pool = instantiate(OmegaConf.to_container(cfg.backbone.taskpool, resolve=True))
    assert isinstance(adapter, EmbeddedT5Backbone) and isinstance(pool, EmbeddedT5TaskPool)
    assert adapter.tasks == pool.names == list(spec.tasks)
    assert adapter.folder == folder == pool.folder  # the already-built cache, no rebuild
    base = adapter.load_base()
    experts = adapter.load_experts()
    manifest = read_manifest(folder)["metrics"]
    got_base = pool.evaluate(lambda i: base, "cpu", batch_size=16)
    got_experts = pool.evaluate(lambda i: experts[i], "cpu", batch_size=16)
    for t in spec.tasks:
        assert pool.primary_metric(t) == "accuracy"
        assert got_base[t]["accuracy"] == pytest.approx(manifest["base"][t])
        assert got_experts[t]["accuracy"] == pytest.approx(manifest["experts"][t])
    calib = pool.calibration_set(8, seed=0, batch_size=4)
    assert [len(c) for c in calib] == [2] * len(spec.tasks)
    assert set(calib[0][0]) == {"input_ids", "attention_mask"}
    assert int(calib[0][0]["attention_mask"].sum(1).min()) > 3
    with pytest.raises(ValueError):
        pool.calibration_set(spec.n_train + 1, seed=0, batch_size=4)


# ---- the regime (the small build, same code as the default) ------------------------------------
def _average(d):
    return sum(d.values()) / len(d)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """The small build as a user's machine makes it: this CPU's own kernel settings in the
    environment, the experts trained by 2 pinned workers."""
    tmp_path = tmp_path_factory.mktemp("small-t5")
    spec = EmbeddedT5Spec.from_config(OmegaConf.to_container(_yaml("embedded_t5_small").backbone.spec, resolve=True))
    build_as_a_user(ensure_built, spec, tmp_path, device="cpu", progress=False)
    return spec, tmp_path


@pytest.mark.slow
def test_small_build_is_the_same_on_a_lower_instruction_set_and_one_worker(small_build, tmp_path, monkeypatch):
    """Issue 27 (see test_embedded.py's twin): a second build under the kernel environment of
    a CPU with a lower instruction set, with 1 worker, gives every file the same sha256."""
    spec, cache = small_build
    first = read_manifest(cache_path(spec, cache))
    assert first["build_workers"] == 2
    assert_same_files_on_a_lower_isa(
        first, lambda workers: build(spec, tmp_path / "again", device="cpu", progress=False, workers=workers), monkeypatch)


@pytest.mark.slow
def test_small_build_is_in_the_real_merge_regime(small_build, one_thread):
    """base < TA (λ = 0.3) < experts with TA ≥ 8 points below the experts and clearly
    above the base; weight averaging between base and experts."""
    spec, tmp_path = small_build
    pool = EmbeddedT5TaskPool(spec=spec, cache_dir=str(tmp_path), progress=False)
    adapter = EmbeddedT5Backbone(spec=spec, cache_dir=str(tmp_path))
    base = adapter.load_base()
    experts = adapter.load_experts()
    bsd = base.state_dict()
    esd = [e.state_dict() for e in experts]

    def merged(lam):
        m = load_t5(str(adapter.folder / "base"))
        m.load_state_dict({k: bsd[k] + lam * sum(s[k] - bsd[k] for s in esd) for k in bsd})
        return m

    def avg(model_for_task):
        return _average({t: v["accuracy"] for t, v in pool.evaluate(model_for_task, "cpu", batch_size=100).items()})

    b, e = avg(lambda i: base), avg(lambda i: experts[i])
    ta, wa = merged(0.3), merged(1.0 / len(esd))
    t, w = avg(lambda i: ta), avg(lambda i: wa)
    assert b + 3.0 < t <= e - 8.0, (b, t, e)
    assert b < w < e, (b, w, e)


# ---- end to end through featcal-run ---------------------------------------------------------
@pytest.mark.slow
def test_featcal_run_embedded_t5(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, FEATCAL_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"), HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    tiny = [f"backbone.spec.{k}={v}" for k, v in TINY.items() if k not in ("tasks", "n_train")]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "featcal.run", "backbone=embedded_t5_small", "calibration=featcal", "budget.per_task=8",
         "budget.batch_size=4", "logger=none", f"hydra.run.dir={out}", *tiny],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| accuracy |" in proc.stdout and "embedded_t5_small" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    tasks = OmegaConf.to_container(_yaml("embedded_t5_small").backbone.spec.tasks)
    assert results["tasks"] == tasks
    assert set(results["primary_metric"].values()) == {"accuracy"}
    for stage in ("base", "experts", "merged", "calibrated"):
        assert set(results["score"][stage]) == set(tasks) | {"average"}
        assert all(0.0 <= v <= 100.0 for v in results["score"][stage].values())
    # the run's expert and base numbers are the build's (same scorer, same data)
    spec = EmbeddedT5Spec.from_config(results["config"]["backbone"]["spec"])
    manifest = read_manifest(ensure_built(spec, tmp_path / "cache"))["metrics"]
    for t in tasks:
        assert results["score"]["experts"][t] == pytest.approx(manifest["experts"][t])
        assert results["score"]["base"][t] == pytest.approx(manifest["base"][t])
    # and the results name the build they came from
    folder = ensure_built(spec, tmp_path / "cache")
    assert results["suite"] == {
        "name": "embedded_t5", "spec_hash": spec.spec_hash(), "content_hash": read_manifest(folder)["content_hash"],
        "portable": True, "note": read_manifest(folder)["portability_note"],
    }
