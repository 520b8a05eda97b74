"""The real presets, end to end, offline, on a stand-in hub (tests/standin_hub.py).

The hub cache holds tiny random models under the REAL ids (openai/clip-vit-base-patch32,
tanganke/*, google/flan-t5-base, meta-llama/Llama-3.2-3B, google/gemma-2-2b,
MergeBench/*) in the layout `hf download` leaves, and tiny datasets in their real schemas
in snapshot-only form (parquet + README configs; nothing in the prepared datasets cache).
With HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and HF_HOME pointing there, each preset runs
in-process (featcal.run.run) with TA and TIES × FeatCal / Surgery / ProbSurgery (the
LLM presets as shipped: streaming=true, tied embeddings as Llama-3.2 / Gemma-2 have), and
nothing else is overridden but sizes (budget, iterations, the LLM pool's lm-eval tasks:
MergeBench's default task names need their own hub datasets, which are not stood in here).
"""
from __future__ import annotations

import json

import pytest

from tests.standin_hub import MERGEBENCH_TASKS, build_standin_hub

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
    from tests.test_mergebench_pool import write_lm_eval_tasks

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
    from featcal.datasets_io import dataset_location

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


@pytest.mark.parametrize("backbone", ["mergebench_llama32_3b", "mergebench_gemma2_2b"])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("calibration", LLM_CALIBRATORS)
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


def test_mergebench_default_math_task_name(standin):
    """The preset's own lm-eval task for math (gsm8k_cot, lm-eval's YAML, 8-shot CoT with a
    256-token limit) over the openai/gsm8k stand-in snapshot: the generation limit is bounded
    by the tiny model's 64-token context instead of failing."""
    over = [o for o in _llm_overrides(standin) if not o.startswith(("backbone.taskpool.lm_eval_tasks=", "backbone.taskpool.lm_eval_defaults="))]
    tasks = "{instruction:[tiny_gen],math:[gsm8k_cot],coding:[tiny_mc],safety:[tiny_mc],multilingual:[tiny_mc]}"
    res = _run(standin, "llama-gsm8k", ["backbone=mergebench_llama32_3b", "merge=task_arithmetic", "calibration=featcal",
               *CALIBRATORS["featcal"], *COMMON, *over, f"backbone.taskpool.lm_eval_tasks={tasks}", "eval.limit=2"])
    _check(res, MERGEBENCH_TASKS)
    assert set(res["metrics"]["calibrated"]["math"]) == {"gsm8k_cot/exact_match", "score"}
