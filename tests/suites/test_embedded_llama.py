"""The embedded LLM suite (backbone=embedded_llama): data rules, tokenizer and prompt, the
cached sharded build, lm-eval on the suite's YAMLs against an independent scorer, the merge
regime of the small build and `featcal-run` end to end (streaming on) with the calibrators."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featcal.suites.embedded_llama import build as el
from featcal.suites.embedded_llama import data

from tests.fixtures.embedded import ISA_VARS, assert_same_files_on_a_lower_isa, build_as_a_user, lower_isa_env

ROOT = Path(__file__).resolve().parents[2]
#: a tiny build (seconds): the layout, loaders, lm-eval plumbing; not the regime
TINY = dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, n_train=40, n_test=8, pretrain_steps=3,
            pretrain_batch=8, finetune_steps=2, finetune_batch=8, shard_size="20KB")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny build as a user's machine makes it: this CPU's own kernel settings in the
    environment, pinned children, the experts trained by 2 workers."""
    cache = tmp_path_factory.mktemp("llama_cache")
    spec = el.EmbeddedLlamaSpec.from_config(TINY)
    with pytest.MonkeyPatch.context() as mp:
        for var in ISA_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("FEATCAL_BUILD_WORKERS", "2")
        folder = el.ensure_built(spec, cache, progress=False)
    return spec, folder, cache


def _yaml(name: str) -> dict:
    from omegaconf import OmegaConf

    from featcal.config import compose

    return OmegaConf.to_container(compose([f"backbone={name}"]).backbone)  # the preset with its model and task pool


def _rows(n: int = 200, seed: int = 0):
    rng = random.Random(seed)
    for name, task in data.TASKS.items():
        for _ in range(n):
            yield name, task.example(rng)


# ---- data and tokenizer -----------------------------------------------------------
def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(data.vocabulary())
    for name, row in _rows():
        for col, value in row.items():
            if isinstance(value, str) and col != "language":
                assert set(value.split()) <= vocab, (name, col, set(value.split()) - vocab)
    rng = random.Random(1)
    for fn in data.PRETRAIN.values():
        for _ in range(50):
            for text in fn(rng):
                assert set(text.split()) <= vocab


def test_task_answers_follow_their_rule():
    for name, row in _rows(300):
        if name == "math":
            w = row["query"].split()
            a, b = int(w[2]), int(w[7])
            want = a + b if "gets" in w else a - b
            assert row["answer"] == str(want) and row["response"].endswith(f"The answer is {want} .")
        elif name == "coding":
            prog = row["instruction"].split("? ", 1)[1]
            # an independent interpreter of the three statement forms
            env, printed = {}, []
            for stmt in (s.strip() for s in prog.split(";")):
                if stmt.startswith("print"):
                    inner = stmt[len("print ( "):-2]
                    m = re.fullmatch(r"(max|min) \( (\d+) , (\d+) \)", inner)
                    if m:
                        printed.append(str((max if m[1] == "max" else min)(int(m[2]), int(m[3]))))
                    else:
                        printed += [str(env[v.strip()]) for v in inner.split(",")]
                else:
                    var, expr = stmt.split(" = ")
                    toks = expr.split()
                    val = env.get(toks[0], None) if not toks[0].isdigit() else int(toks[0])
                    if len(toks) == 3:
                        val = val + int(toks[2]) if toks[1] == "+" else val - int(toks[2])
                    env[var] = val
            assert row["response"] == " ".join(printed), row
        elif name == "safety":
            w = row["prompt"].split()
            flagged = w[1] in data.FLAGGED_VERBS and w[3] in data.BELONGINGS
            assert row["label"] == (0 if flagged else 1) and row["response"] == row["choices"][row["label"]]
            assert row["choices"][0] == data.REFUSAL
        elif name == "multilingual":
            back = {v: k for k, v in data.LANGUAGES[row["language"]].items()}
            w = [back.get(x, x) for x in row["inputs"].split()]
            want = int(w[2]) + int(w[7]) if "gets" in w else int(w[2]) - int(w[7])
            assert row["choices"][row["label"]] == row["targets"] == str(want) and len(set(row["choices"])) == 4
            assert not set(row["inputs"].split()) & set(data.PROBLEM_WORDS)  # fully translated
        else:
            ws = row["input"].split()
            assert row["output"] == data.INSTRUCTION_FORMATS[row["instruction"]](ws)


def test_task_data_is_deterministic_and_seeded():
    spec = el.EmbeddedLlamaSpec.from_config(TINY)
    assert el.make_task_data(spec, "math") == el.make_task_data(spec, "math")
    assert el.make_task_data(spec, "math") != el.make_task_data(el.EmbeddedLlamaSpec.from_config(TINY, seed=1), "math")
    d = el.make_task_data(spec, "multilingual")
    assert {r["language"] for r in d["test"]["embedded_llama_multilingual_zeb"]} == {"zeb"}
    assert {r["language"] for r in d["test"]["embedded_llama_multilingual_kol"]} == {"kol"}
    # calibration rows carry exactly MergeBench/<task>_val's columns
    from featcal.tasks.mergebench import DEFAULT_COLUMNS

    for t in data.TASKS:
        row = el.make_task_data(spec, t)["train"][0]
        cols = DEFAULT_COLUMNS[t]
        assert cols["instruction"] in row and cols["response"] in row


def test_tokenizer_prompt_markers_are_single_tokens_and_nothing_is_unknown():
    from featcal.tasks.mergebench import alpaca_text

    tok = el.make_tokenizer()
    text = alpaca_text("Copy the words .", "red cat", "Ann 3")
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert len(ids) == 1 + 4 + 4 + 2 + 2  # <s>, four markers, the words
    # the training split: prompt tokens then response tokens are the full text's tokens
    prompt = el.prompt_text("Copy the words .", "Ann 3")
    assert tok(prompt)["input_ids"] + tok("red cat", add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(tok("x = 3 ; print ( x )", add_special_tokens=False)["input_ids"]) == "x = 3 ; print ( x )"


def test_lm_eval_yaml_prompts_equal_the_training_prompt():
    """The YAMLs' doc_to_text renders (jinja, as lm-eval does) to the tokens of the Alpaca
    prompt the experts were trained on."""
    import jinja2

    from featcal.suites.embedded_llama.pool import LM_EVAL_METRICS, TASK_YAMLS

    tok = el.make_tokenizer()
    spec = el.EmbeddedLlamaSpec.from_config(TINY)
    names = set()
    for t in spec.tasks:
        for lm, docs in el.make_task_data(spec, t)["test"].items():
            cfg = yaml.safe_load((TASK_YAMLS / f"{lm}.yaml").read_text())
            names.add(cfg["task"])
            doc = docs[0]
            rendered = jinja2.Template(cfg["doc_to_text"]).render(**doc)
            assert tok(rendered)["input_ids"] == tok(el.doc_prompt(t, doc))["input_ids"]
            assert cfg["output_type"] == ("multiple_choice" if "choices" in doc else "generate_until")
    assert names == set(LM_EVAL_METRICS)


@pytest.mark.parametrize("name", ["embedded_llama", "embedded_llama_small"])
def test_yaml_split_sizes_match_code(name):
    cfg = _yaml(name)
    sizes = el.expected_split_sizes(cfg["spec"])
    assert cfg["train_sizes"] == sizes["train"] and cfg["test_sizes"] == sizes["test"]


def test_default_yaml_is_the_default_spec():
    assert el.EmbeddedLlamaSpec.from_config(_yaml("embedded_llama")["spec"]) == el.EmbeddedLlamaSpec()


def test_spec_rejects_unknown_keys_and_tasks():
    with pytest.raises(ValueError, match="unknown embedded_llama spec key"):
        el.EmbeddedLlamaSpec.from_config({"width": 3})
    with pytest.raises(ValueError, match="unknown embedded_llama task"):
        el.EmbeddedLlamaSpec.from_config({"tasks": ["math", "poetry"]})
    with pytest.raises(ValueError, match="divisible"):
        el.EmbeddedLlamaSpec.from_config({"heads": 4, "kv_heads": 3})
    with pytest.raises(ValueError, match="pretrain_tasks"):
        el.EmbeddedLlamaSpec.from_config({"pretrain_tasks": ["poetry"]})
    # the pre-training mix draws from the spec's categories that are in pretrain_tasks, in task order
    assert el.EmbeddedLlamaSpec().mixed_tasks() == ["math", "coding", "safety", "multilingual"]
    assert el.EmbeddedLlamaSpec.from_config({"tasks": ["instruction", "safety"]}).mixed_tasks() == ["safety"]


def test_block_state_take_cuts_the_extras_when_the_hidden_states_are_already_cut():
    """The streamed FeatCal's drift chain stores the first k hidden states of a batch and
    rebuilds the state from the full batch's masks: take(k) must cut those too (a batch
    larger than calibration.drift_examples failed in sdpa before)."""
    from featcal.backbone.base import BlockState

    full = BlockState(torch.zeros(16, 5, 4), torch.ones(16, 5), torch.ones(16, 5, dtype=torch.bool),
                      {"attention_mask": torch.zeros(16, 1, 5, 5), "rope": (torch.zeros(1, 5, 2),)})
    part = full.with_hidden(torch.zeros(8, 5, 4)).take(8)
    assert part.hidden.shape[0] == part.token_mask.shape[0] == part.extras["attention_mask"].shape[0] == 8
    assert part.extras["rope"][0].shape[0] == 1  # broadcast tensors are kept
    assert full.take(16) is full


# ---- the build ----------------------------------------------------------------------
def test_build_is_sharded_checksummed_and_loads_through_the_llama_loaders(built):
    from featcal.io.lazy import LazyCausalLM
    from featcal.io.lazy import load_causal_lm
    from tests.fixtures.llm import is_sharded

    spec, folder, _ = built
    assert spec.cache_problem(folder) is None
    for sub in ["base", *[f"experts/{t}" for t in spec.tasks]]:
        assert is_sharded(folder / sub), sub
    base = load_causal_lm(str(folder / "base"))
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.num_key_value_heads < base.config.num_attention_heads
    assert not base.config.tie_word_embeddings
    lazy = LazyCausalLM(folder / "experts" / "math")
    from featcal.backbone.llama import LlamaBackbone

    bb = LlamaBackbone(["math"], str(folder / "base"), {"math": str(folder / "experts" / "math")})
    expert = load_causal_lm(str(folder / "experts" / "math"))
    blk = lazy.load_block(bb, 1)
    for k, v in blk.state_dict().items():
        assert torch.equal(v, expert.model.layers[1].state_dict()[k])
    # experts differ from the base in the blocks only (embeddings and head are not task vectors)
    for k, v in expert.state_dict().items():
        if "embed_tokens" in k or k.startswith("lm_head"):
            assert torch.equal(v, base.state_dict()[k]), k
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in expert.state_dict().items() if ".layers." in k)


def test_rebuild_gives_identical_bytes_on_a_lower_instruction_set_and_a_corrupt_file_is_rebuilt(built, tmp_path, monkeypatch):
    """Issue 27 on the tiny build: a rebuild under the kernel environment of a CPU with a
    lower instruction set (``lower_isa_env``) and 1 worker gives every file the same sha256
    (and so the same content hash) as the fixture's 2-worker build; the build is marked
    portable. A truncated shard is then detected and rebuilt to the same bytes."""
    spec, folder, _ = built
    first = el.read_manifest(folder)
    for var, value in lower_isa_env().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("FEATCAL_BUILD_WORKERS", "1")
    again = el.ensure_built(spec, tmp_path, progress=False)
    second = el.read_manifest(again)
    assert first["build_workers"] == 2 and second["build_workers"] == 1
    a, b = first["files"], second["files"]
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()} and a == b
    assert first["content_hash"] == second["content_hash"] and first["metrics"] == second["metrics"]
    assert first["portable"] is True and second["portable"] is True and "x86-64" in first["portability_note"]
    shard = sorted((again / "experts" / "coding").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.warns(RuntimeWarning, match="checksum|size"):
        el.ensure_built(spec, tmp_path, progress=False)
    assert el.read_manifest(again)["files"] == a


def test_hydra_config_instantiates_and_validates(built):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    spec, folder, cache = built
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["backbone=embedded_llama_small", f"backbone.cache_dir={cache}",
                                           *[f"backbone.spec.{k}={v}" for k, v in TINY.items()]])
    adapter, pool = instantiate(cfg.backbone.adapter), instantiate(cfg.backbone.taskpool)
    assert adapter.folder == folder == pool.folder and adapter.streaming
    assert type(adapter).validate_config(dict(cfg.backbone.adapter)) == []
    assert type(pool).validate_config(dict(cfg.backbone.taskpool)) == []
    # the build's identity for results.json, from the folder's own manifest
    ident = adapter.suite_identity()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert ident["name"] == "embedded_llama" and ident["spec_hash"] == manifest["spec_hash"] == folder.name
    lines = "\n".join(f"{rel}\t{meta['sha256']}" for rel, meta in sorted(manifest["files"].items()))
    assert ident["content_hash"] == hashlib.sha256(lines.encode()).hexdigest()[:16]  # one hash over every file
    assert ident["portable"] is True and ident["note"] == manifest["portability_note"]  # pinned CPU build
    from featcal.io.lazy import is_lazy

    assert is_lazy(adapter.load_base()) and is_lazy(adapter.load_expert("safety"))
    # calibration rows: MergeBench's Alpaca text of the suite's train rows
    texts = pool.calibration_texts("coding", 3, seed=0)
    rows = el.load_data(folder, spec)["coding"]["train"]
    assert all(any(r["response"] in t and r["instruction"] in t for r in rows) for t in texts)
    batches = pool.calibration_set(4, 0, 2)
    assert len(batches) == 5 and batches[0][0]["input_ids"].shape[0] == 2


@pytest.mark.slow
def test_lm_eval_scores_equal_the_independent_scorer(built):
    """lm-eval (HFLM on the in-memory model, the suite's YAMLs, generate_until with the
    regex filter and multiple_choice) gives exactly this module's scorer's accuracy."""
    from featcal.suites.embedded_llama.adapter import EmbeddedLlamaBackbone
    from featcal.suites.embedded_llama.pool import EmbeddedLlamaTaskPool

    spec, folder, cache = built
    pool = EmbeddedLlamaTaskPool(spec=spec.to_dict(), cache_dir=str(cache))
    adapter = EmbeddedLlamaBackbone(spec=spec.to_dict(), cache_dir=str(cache), streaming=False)
    d = el.load_data(folder, spec)
    tok = pool.tokenizer()
    for i, t in enumerate(spec.tasks):
        model = adapter.load_expert(t)
        res = pool.evaluate(lambda _i: model, "cpu", batch_size=4, only=[i])[t]
        for lm, docs in d[t]["test"].items():
            key = next(k for k in res if k.startswith(lm + "/"))
            assert res[key] == pytest.approx(el.score(model, tok, t, docs)), (t, lm)


# ---- the small build: regime and end to end -------------------------------------------
def _average(d):
    return sum(d.values()) / len(d)


@pytest.fixture(scope="module")
def small():
    """The suite's build in the shared cache (built once; a cold build is a couple of CPU
    minutes). ``embedded_llama_small`` is the same build evaluated on the first 100 test
    docs of each lm-eval task."""
    cfg = _yaml("embedded_llama_small")
    spec = el.EmbeddedLlamaSpec.from_config(cfg["spec"])
    folder = build_as_a_user(el.ensure_built, spec, None, progress=False)  # pinned children, 2 workers
    return spec, folder


@pytest.mark.slow
def test_small_build_is_the_same_on_a_lower_instruction_set_and_one_worker(small, tmp_path, monkeypatch):
    """Issue 27 (the twin of test_embedded.py's and test_embedded_t5.py's): a second build of
    the small spec under the kernel environment of a CPU with a lower instruction set, with
    1 worker, gives every file the same sha256 as the cached 2-worker build."""
    spec, folder = small
    assert_same_files_on_a_lower_isa(
        el.read_manifest(folder), lambda workers: el.build(spec, tmp_path / "again", progress=False, workers=workers), monkeypatch)


def _ta_scores(spec, folder):
    """Task Arithmetic (the default merge, λ = 0.3, embeddings and head kept) on every test doc."""
    from featcal.backbone.llama import LlamaBackbone
    from featcal.merge import task_arithmetic

    torch.set_num_threads(1)
    bb = LlamaBackbone(list(spec.tasks), str(folder / "base"), {t: str(folder / "experts" / t) for t in spec.tasks})
    base = bb.load_base()
    merged = bb.merge(functools.partial(task_arithmetic, scaling_factor=0.3), base, bb.load_experts())
    return el.score_all(merged, bb.load_tokenizer(), spec, el.load_data(folder, spec))


@pytest.mark.slow
def test_small_build_is_in_the_real_merge_regime(small):
    """Issue 25's regime on the test docs: every expert >= 90 % (raw) on its category, Task
    Arithmetic (λ = 0.3) at least 8 points above the base and at least 10 points below the
    experts on the mean category score; every expert beats the base on its own category."""
    from featcal.io.lazy import load_causal_lm

    spec, folder = small
    m = el.read_manifest(folder)["metrics"]
    assert min(m["experts"].values()) >= 90.0, m["experts"]
    assert all(m["experts"][t] > m["base"][t] for t in spec.tasks if m["base"][t] < 100.0), m
    ta = _ta_scores(spec, folder)
    assert _average(ta) >= _average(m["base"]) + 8.0, (ta, m["base"])
    assert _average(ta) <= _average(m["experts"]) - 10.0, (ta, m["experts"])
    # the manifest's base scores (from the pinned build children) are the scorer's on the saved base
    assert el.score_all(load_causal_lm(str(folder / "base")), el.make_tokenizer(), spec, el.load_data(folder, spec)) == m["base"]


def _run(tmp_path, *overrides, timeout=1500):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_SILENT="true",
               PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    args = ["backbone=embedded_llama_small", "logger=none", "device=cpu", "calibration.progress=false",
            f"hydra.run.dir={out}", *overrides]
    proc = subprocess.run([sys.executable, "-m", "featcal.run", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_featcal_run_embedded_llama_featcal_streamed(small, tmp_path):
    """featcal-run backbone=embedded_llama_small calibration=featcal: streamed TA merge into a
    sharded HF folder, layer-streamed FeatCal, lm-eval on every stage; the regime holds
    through lm-eval and FeatCal lowers the last block's drift on every task."""
    spec, folder = small
    res = _run(tmp_path, "calibration=featcal", "budget.per_task=32", "budget.batch_size=16",
               f"backbone.adapter.merge_dir={tmp_path / 'merged'}")
    met = res["metrics"]
    assert set(met) == {"experts", "base", "merged", "calibrated"}
    score = {s: {t: met[s][t]["score"] for t in spec.tasks} for s in met}
    assert min(score["experts"].values()) >= 90.0, score["experts"]
    assert _average(score["merged"]) >= _average(score["base"]) + 8.0
    assert _average(score["merged"]) <= _average(score["experts"]) - 10.0
    for t in spec.tasks:
        assert met["merged"][t]["normalized"] == pytest.approx(met["merged"][t]["score"] / met["experts"][t]["score"])
    assert res["calibration_report"]["settings"]["streamed"] is True
    assert json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    last = max(r["block"] for r in res["drift"])
    for t in spec.tasks:
        rows = {r["when"]: r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == last}
        assert rows["after"] < rows["before"], (t, rows)


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["surgery", "probsurgery"])
def test_featcal_run_embedded_llama_surgery_family(small, tmp_path, calibration):
    spec, _ = small
    res = _run(tmp_path, f"calibration={calibration}", "budget.per_task=32", "budget.batch_size=16",
               "evaluate_base=false", "evaluate_experts=false")
    extra = res["calibration_report"]["extra"]
    for t in spec.tasks:  # the modules learn on streamed per-token features: the L1 to each expert falls
        assert extra["l1_after"][t] < extra["l1_before"][t], (t, extra["l1_before"][t], extra["l1_after"][t])
    assert res["score"]["calibrated"]["average"] != res["score"]["merged"]["average"]  # and change what lm-eval scores


def test_coding_programs_are_interpreted_as_python_would_run_them():
    """The coding task's reference answers come from featcal's own small interpreter (no
    ``exec`` in the package); Python itself, run here in the test, must print the same."""
    import contextlib
    import io
    import random

    from featcal.suites.embedded_llama.data import coding_example, run_program

    rng = random.Random(7)
    for _ in range(500):
        ex = coding_example(rng)
        prog = ex["instruction"].split("? ", 1)[1]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec("\n".join(s.strip() for s in prog.split(";")), {"__builtins__": {"print": print, "max": max, "min": min}})
        assert run_program(prog) == " ".join(buf.getvalue().split()) == ex["response"], prog
    with pytest.raises(ValueError):
        run_program("import os ; os . system ( 'true' )")
