"""The real presets, end to end, offline, on a stand-in hub (tests/fixtures/standin_hub.py).

The hub cache holds tiny random models under the REAL ids (openai/clip-vit-base-patch32,
tanganke/*, google/flan-t5-base, meta-llama/Llama-3.2-3B, google/gemma-2-2b,
MergeBench/*) in the layout `hf download` leaves, and tiny datasets in their real schemas
in snapshot-only form (parquet + README configs; nothing in the prepared datasets cache).
With HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and HF_HOME pointing there, each preset runs
in-process (featcal.run.run) with TA and TIES × FeatCal / Surgery / ProbSurgery (the
LLM presets as shipped: streaming=true, tied embeddings as Llama-3.2 / Gemma-2 have), and
nothing else is overridden but sizes (budget, iterations; the calibrator matrix of the LLM
presets evaluates two tiny local lm-eval tasks, cheap). MergeBench's DEFAULT lm-eval tasks
(ifeval, gsm8k_cot, humaneval_plus, mbpp_plus, toxigen, m_mmlu / arc / hellaswag in fr es
de ru) run on stand-ins of their own hub datasets (real ids, configs, splits, columns) in
the tests at the end, code tasks with and without the opt-in.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.standin_hub import MERGEBENCH_TASKS, build_standin_hub

pytestmark = pytest.mark.slow

CALIBRATORS = {
    "featcal": ["calibration.progress=false"],
    "surgery": ["calibration.iterations=4", "calibration.batch_size=4", "calibration.progress=false"],
    "probsurgery": ["calibration.iterations=4", "calibration.batch_size=4", "calibration.hidden=16", "calibration.progress=false"],
}
MERGES = ["task_arithmetic", "ties"]
COMMON = ["logger=none", "device=cpu", "budget.per_task=4", "budget.batch_size=4", "eval_batch_size=8", "evaluate_base=false"]


@pytest.fixture(scope="module")
def standin(tmp_path_factory, one_thread):
    """Build the stand-in hub once per module and go offline onto it (restored after)."""
    import datasets
    import huggingface_hub.constants as hc

    root = tmp_path_factory.mktemp("standin")
    home = build_standin_hub(root)
    mp = pytest.MonkeyPatch()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        mp.delenv(var, raising=False)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("FEATCAL_CACHE", str(root / "featcal_cache"))
    mp.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    lm = root / "lm_eval_tasks"
    lm.mkdir()
    from tests.fixtures.mergebench import write_lm_eval_tasks

    write_lm_eval_tasks(lm)
    yield {"root": root, "home": home, "lm_tasks": lm}
    mp.undo()


def _run(standin, name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from featcal.run import CONF_DIR, run

    out = standin["root"] / "runs" / name
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + [f"hydra.run.dir={out}"], return_hydra_config=True)
    res = run(cfg, out)
    assert json.loads((out / "results.json").read_text())["config_hash"] == res["config_hash"]
    return res


def _check(res: dict, tasks: list[str], metric_range=(0.0, 100.0)) -> None:
    assert res["tasks"] == tasks
    for stage in ("merged", "calibrated"):
        assert set(res["metrics"][stage]) == set(tasks), stage
    lo, hi = metric_range
    for t in tasks:
        v = res["score"]["calibrated"][t]
        assert lo <= v <= hi, (t, v)


def _sizes(tasks, n=8) -> str:
    return "{" + ",".join(f"{t}:{n}" for t in tasks) + "}"


def test_no_prepared_dataset_cache_is_used(standin):
    """Snapshot-only: every dataset resolves to the hub cache, none to a prepared cache."""
    from featcal.io.datasets import dataset_location

    for repo, config in (("nyu-mll/glue", "mnli"), ("ufldl-stanford/svhn", "cropped_digits"), ("ylecun/mnist", None),
                         ("tanganke/sun397", None), ("MergeBench/math_val", None)):
        assert dataset_location(repo, config).kind == "snapshot", repo


CLIP_TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("calibration", list(CALIBRATORS))
def test_clip_vit_b32(standin, merge, calibration):
    res = _run(standin, f"clip-{merge}-{calibration}", ["backbone=clip_vit_b32", f"merge={merge}", f"calibration={calibration}",
               *CALIBRATORS[calibration], *COMMON, f"backbone.train_sizes={_sizes(CLIP_TASKS)}",
               f"backbone.taskpool.cache_dir={standin['root'] / 'heads'}"])
    _check(res, CLIP_TASKS)


GLUE_TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


@pytest.mark.parametrize("backbone", ["flan_t5_base_glue", "flan_t5_base_glue_lora16"])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("calibration", list(CALIBRATORS))
def test_flan_t5_glue(standin, backbone, merge, calibration):
    res = _run(standin, f"{backbone}-{merge}-{calibration}", [f"backbone={backbone}", f"merge={merge}", f"calibration={calibration}",
               *CALIBRATORS[calibration], *COMMON, f"backbone.train_sizes={_sizes(GLUE_TASKS)}",
               "backbone.taskpool.progress=false"])
    _check(res, GLUE_TASKS, (-100.0, 100.0))  # stsb: Spearman x 100


LLM_CALIBRATORS = list(CALIBRATORS)  # streaming (the presets' default): Surgery's features from streamed forwards


def _llm_overrides(standin) -> list[str]:
    tasks = "{" + ",".join(f"{t}:[{'tiny_gen' if i < 2 else 'tiny_mc'}]" for i, t in enumerate(MERGEBENCH_TASKS)) + "}"
    return [f"backbone.taskpool.lm_eval_tasks={tasks}", f"backbone.taskpool.lm_eval_include=[{standin['lm_tasks']}]",
            "backbone.taskpool.lm_eval_defaults=false", "eval.limit=3", "eval_batch_size=4", "evaluate_experts=false"]


# (llama, task_arithmetic, featcal) runs with the preset's default lm-eval tasks below
LLM_MATRIX = [(b, m, c) for b in ("mergebench_llama32_3b", "mergebench_gemma2_2b") for m in MERGES for c in LLM_CALIBRATORS
              if (b, m, c) != ("mergebench_llama32_3b", "task_arithmetic", "featcal")]


@pytest.mark.parametrize(("backbone", "merge", "calibration"), LLM_MATRIX)
def test_mergebench_llm(standin, backbone, merge, calibration):
    res = _run(standin, f"{backbone}-{merge}-{calibration}", [f"backbone={backbone}", f"merge={merge}", f"calibration={calibration}",
               *CALIBRATORS[calibration], *COMMON, *_llm_overrides(standin)])
    _check(res, MERGEBENCH_TASKS)
    assert {"tiny_gen/exact_match", "score"} <= set(res["metrics"]["calibrated"]["instruction"])


@pytest.mark.parametrize("calibration", ["surgery", "probsurgery"])
def test_mergebench_llm_in_memory_surgery(standin, calibration):
    """streaming=false: every model in memory, Surgery's features from ordinary forwards."""
    res = _run(standin, f"llama-inmem-{calibration}", ["backbone=mergebench_llama32_3b", "merge=ties", f"calibration={calibration}",
               "backbone.adapter.streaming=false", *CALIBRATORS[calibration], *COMMON, *_llm_overrides(standin)])
    _check(res, MERGEBENCH_TASKS)
    assert res["calibration_report"]["extra"].get("trainable_parameters", 1) > 0


# ---------------------------------------------------------------------------
# MergeBench's DEFAULT lm-eval tasks (conf/taskpool/mergebench.yaml) over the
# stand-ins of their hub datasets (tests/fixtures/standin_hub.py LM_EVAL_DATASETS, real ids/configs/splits)


def _default_lm_tasks() -> dict[str, list[str]]:
    import yaml

    from featcal.run import CONF_DIR

    node = yaml.safe_load((Path(CONF_DIR) / "taskpool" / "mergebench.yaml").read_text())
    return node["taskpool"]["lm_eval_tasks"]


@pytest.fixture
def punkt_tab(standin, monkeypatch):
    """nltk's punkt_tab in its real layout (tokenizers/punkt_tab/english/: collocations.tab,
    sent_starters.txt, abbrev_types.txt, ortho_context.tab), empty parameters: Punkt splits at
    sentence ends only. What `python -m nltk.downloader punkt_tab` leaves, minus the statistics."""
    import nltk

    root = standin["root"] / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(root)] + [p for p in nltk.data.path if p != str(root)])
    return root


def _default_task_overrides(limit: int) -> list[str]:
    """The preset as shipped (default lm_eval_tasks, lm-eval's own task index), offline; only sizes set."""
    return ["backbone=mergebench_llama32_3b", *COMMON, f"eval.limit={limit}", "eval_batch_size=4", "evaluate_experts=false"]


def test_mergebench_default_lm_eval_tasks_with_code_execution(standin, punkt_tab):
    """Every default lm-eval task runs offline on the stand-in snapshots and reports its raw
    metric; the category score is their mean; with the opt-in the code tasks are scored in
    the fence: humaneval_plus 50 % (of the first two problems, the first passes whatever the
    model appends, the second needs a body the tiny model cannot write), mbpp_plus 0 %."""
    tasks = _default_lm_tasks()
    res = _run(standin, "llama-default-tasks-code", [*_default_task_overrides(2), "merge=task_arithmetic", "calibration=featcal",
               *CALIBRATORS["featcal"], "backbone.taskpool.allow_code_execution=true"])
    _check(res, MERGEBENCH_TASKS)
    metric = {"ifeval": "prompt_level_strict_acc", "gsm8k_cot": "exact_match", "humaneval_plus": "pass@1", "mbpp_plus": "pass_at_1",
              "toxigen": "acc_norm", **{t: "acc" for t in tasks["multilingual"] if t.startswith("m_mmlu")},
              **{t: "acc_norm" for t in tasks["multilingual"] if not t.startswith("m_mmlu")}}
    for stage in ("merged", "calibrated"):
        for cat, names in tasks.items():
            values = res["metrics"][stage][cat]
            assert set(values) == {f"{t}/{metric[t]}" for t in names} | {"score"}, (stage, cat)
            raw = [values[f"{t}/{metric[t]}"] for t in names]
            for v in raw:  # eval.limit=2: every rate is 0, 50 or 100
                assert min(abs(v - x) for x in (0.0, 50.0, 100.0)) < 1e-9, (stage, cat, values)
            assert values["score"] == pytest.approx(sum(raw) / len(raw)), (stage, cat)
        coding = res["metrics"][stage]["coding"]
        assert coding["humaneval_plus/pass@1"] == pytest.approx(50.0) and coding["mbpp_plus/pass_at_1"] == 0.0, (stage, coding)
    ce = res["code_execution"]
    assert ce["allowed"] is True and ce["code_tasks"] == ["humaneval_plus", "mbpp_plus"]


def test_code_standins_reference_solutions_pass_and_word_salad_fails(standin):
    """The stand-in problems are sound: every reference solution passes its tests in the fence,
    and the kind of text the tiny word-level model writes passes exactly the humaneval_plus
    problems whose prompt ends inside a comment (the ones the run above counts as passed)."""
    from featcal.io.datasets import load_dataset_split
    from featcal.tasks.code_exec import FencedCodeEval

    scorer = FencedCodeEval()
    he = load_dataset_split("evalplus/humanevalplus", "test")
    refs = [f"{r['test']}\ncheck({r['entry_point']})" for r in he]
    scores, _ = scorer.compute(refs, [[r["prompt"] + r["canonical_solution"]] for r in he], k=[1])
    assert scores["pass@1"] == 1.0
    _, per = scorer.compute(refs, [[r["prompt"] + " w3 w17 w5"] for r in he], k=[1])
    assert [per[i][0].status == "passed" for i in range(len(he))] == [i % 2 == 0 for i in range(len(he))]
    mb = load_dataset_split("evalplus/mbppplus", "test")
    refs = ["\n".join(r["test_list"]) for r in mb]
    assert scorer.compute(refs, [[r["code"]] for r in mb], k=[1])[0]["pass@1"] == 1.0
    assert scorer.compute(refs, [[" w3 w17 w5"] for _ in mb], k=[1])[0]["pass@1"] == 0.0


def test_mergebench_default_lm_eval_tasks_code_skipped(standin, punkt_tab, caplog):
    """allow_code_execution=false (the default): humaneval_plus / mbpp_plus are not run, the
    log and results.json say so, coding (left with no task) gets no score, the rest is scored."""
    import logging

    tasks = _default_lm_tasks()
    with caplog.at_level(logging.WARNING):
        res = _run(standin, "llama-default-tasks-nocode", [*_default_task_overrides(1), "merge=ties", "calibration=none"])
    merged = res["metrics"]["merged"]
    assert "coding" not in merged and set(merged) == set(MERGEBENCH_TASKS) - {"coding"}
    for cat in set(MERGEBENCH_TASKS) - {"coding"}:
        assert {k.split("/")[0] for k in merged[cat]} == set(tasks[cat]) | {"score"}, cat
    ce = res["code_execution"]
    assert ce["allowed"] is False and "skipped" in ce["note"] and ce["code_tasks"] == ["humaneval_plus", "mbpp_plus"]
    assert ce["skipped"] == {"coding": ["humaneval_plus", "mbpp_plus"]} and ce["categories_not_scored"] == ["coding"]
    assert "skipping ['humaneval_plus', 'mbpp_plus']" in caplog.text and "allow_code_execution=true" in caplog.text


def test_mergebench_lm_eval_needs_reported_before_any_model_loads(standin, monkeypatch, tmp_path):
    """What lm-eval would fetch at run time is checked first, each as one featcal message naming
    the fix: ifeval's nltk punkt_tab, a task dataset missing from the hub cache (unknown task
    names: tests/tasks/test_mergebench_pool.py)."""
    import nltk

    import featcal.backbone.llama
    import featcal.io.hub
    import featcal.io.lazy
    from featcal.errors import SourceUnavailable

    def no_load(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the check")

    for module in (featcal.backbone.llama, featcal.io.hub, featcal.io.lazy):  # every model / tokenizer folder is resolved through it
        monkeypatch.setattr(module, "resolve_model_dir", no_load)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty_nltk_data")])
    base = [*_default_task_overrides(1), "merge=task_arithmetic", "calibration=featcal", *CALIBRATORS["featcal"]]
    with pytest.raises(SourceUnavailable) as err:
        _run(standin, "llama-no-punkt", base)
    msg = str(err.value)
    assert "ifeval" in msg and "punkt_tab" in msg and "python -m nltk.downloader punkt_tab" in msg and "NLTK_DATA" in msg

    with pytest.raises(SourceUnavailable) as err:  # okapi's truthfulqa_fr reads alexandrainst/m_truthfulqa: not stood in
        _run(standin, "llama-no-dataset", [*base, "backbone.taskpool.lm_eval_tasks.safety=[toxigen,truthfulqa_fr_mc1]"])
    msg = str(err.value)
    assert msg.startswith("1 model/dataset source(s) not available")
    assert "'alexandrainst/m_truthfulqa' (config 'fr')" in msg and "backbone.taskpool.lm_eval_tasks.safety (truthfulqa_fr_mc1)" in msg
    assert "hf download --repo-type dataset alexandrainst/m_truthfulqa" in msg
