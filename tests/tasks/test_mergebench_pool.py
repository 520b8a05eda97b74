"""MergeBench task pool: calibration data formatted like the experts' training data and
paired by task name; lm-eval through HFLM on an in-memory calibrated tiny model with local
YAML tasks over local JSON data (offline)."""
from __future__ import annotations

from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from featcal.backbone.llama import LlamaBackbone
from featcal.calibration.feature_calibration import FeatCal
from featcal.merge import task_arithmetic
from featcal.tasks.mergebench import MergeBenchTaskPool, alpaca_text
from tests.fixtures.llm import TASKS, build_world, task_batch
from tests.fixtures.mergebench import write_lm_eval_tasks, write_task_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alpaca_text_layout():
    text = alpaca_text("Add 2 and 3.", "5")
    lines = text.split("\n")
    assert lines[0].startswith("Below is an instruction that describes a task")
    assert lines[2] == " " * 8 + "### Instruction:" and lines[3] == " " * 8 + "Add 2 and 3."
    assert lines[5] == " " * 8 + "### Response:" and lines[6] == " " * 8 + "5"
    assert "### Input:" not in text and text.endswith("\n" + " " * 8)
    assert "### Input:\n        ctx\n" in alpaca_text("q", "a", "ctx")


def test_calibration_data_is_paired_by_task_name_and_truncated(tmp_path):
    from tests.fixtures.llm import word_tokenizer

    word_tokenizer(tmp_path / "tok")
    data = write_task_data(tmp_path)
    # the mapping's order differs from the task order: pairing is by name
    shuffled = {t: data[t] for t in reversed(TASKS)}
    pool = MergeBenchTaskPool(TASKS, str(tmp_path / "tok"), shuffled, {t: [] for t in TASKS}, max_length=7)
    texts = {t: pool.calibration_texts(t, 5, seed=0) for t in TASKS}
    for t, task in enumerate(TASKS):
        for text in texts[task]:
            assert f"w{16 * t + 1}" in text and "### Response:" in text
            assert not any(f"w{16 * u + 1} " in text for u in range(len(TASKS)) if u != t)
    assert pool.calibration_texts("math", 5, seed=0) == texts["math"]
    assert pool.calibration_texts("math", 5, seed=1) != texts["math"]
    calib = pool.calibration_set(5, seed=0, batch_size=2)
    assert [len(c) for c in calib] == [3, 3, 3]
    assert all(b["input_ids"].shape[1] <= 7 and b["input_ids"].shape == b["attention_mask"].shape for c in calib for b in c)
    with pytest.raises(ValueError, match="exceeds the 12 examples of split .train."):
        pool.calibration_texts("math", 999, seed=0)
    problems = MergeBenchTaskPool.validate_config({"tasks": TASKS, "datasets": {"math": "x"}, "lm_eval_tasks": {}, "max_length": 0})
    assert any("max_length" in p for p in problems) and any("datasets" in p for p in problems)


@torch.no_grad()
def _manual_mc_accuracy(model, tok, docs):
    correct = 0
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in d["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = model(ids).logits.float().log_softmax(-1)[0]
            scores.append(sum(float(logp[len(ctx) - 1 + j, c]) for j, c in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return 100.0 * correct / len(docs)


def test_lm_eval_through_hflm_on_a_calibrated_model(tmp_path):
    base_dir, experts = build_world(tmp_path / "world", "llama", layers=2, steps=3)
    backbone = LlamaBackbone(TASKS, base=base_dir, experts=experts)
    base = backbone.load_base()
    ex = backbone.load_experts()
    merged = backbone.merge(lambda b, e, exclude=None: task_arithmetic(b, e, 0.3, exclude=exclude), base, ex)
    calib = [[task_batch(t, 8, t)] for t in range(len(TASKS))]
    calibrated = FeatCal(progress=False).calibrate(backbone, merged, base, ex, calib)
    docs = write_lm_eval_tasks(tmp_path)
    data = write_task_data(tmp_path)
    pool = MergeBenchTaskPool(
        TASKS, base_dir, data,
        lm_eval_tasks={"instruction": ["tiny_gen"], "math": ["tiny_mc"], "coding": ["tiny_mc", "tiny_gen"]},
        lm_eval_include=[str(tmp_path)], lm_eval_defaults=False, limit=5,
    )
    model = calibrated.model_for_task(1)
    metrics = pool.evaluate(calibrated.model_for_task, "cpu", batch_size=4)
    assert set(metrics) == set(TASKS)
    assert set(metrics["coding"]) == {"tiny_mc/acc", "tiny_gen/exact_match", "score"}
    # lm-eval's accuracy is the model's own choice ranking on the first `limit` docs
    want = _manual_mc_accuracy(model, pool.tokenizer(), docs[:5])
    assert metrics["math"]["tiny_mc/acc"] == pytest.approx(want)
    assert metrics["coding"]["score"] == pytest.approx((metrics["coding"]["tiny_mc/acc"] + metrics["coding"]["tiny_gen/exact_match"]) / 2)
    assert 0.0 <= metrics["instruction"]["tiny_gen/exact_match"] <= 100.0
    # normalised score against the experts' scores
    expert_metrics = {}
    for i, e in enumerate(ex):
        expert_metrics.update(pool.evaluate(lambda _i, e=e: e, "cpu", batch_size=4, only=[i]))
    final = pool.finalize({"experts": expert_metrics, "calibrated": metrics})
    for task in TASKS:
        if final["experts"][task]["score"]:
            assert final["calibrated"][task]["normalized"] == pytest.approx(metrics[task]["score"] / expert_metrics[task]["score"])


def test_unknown_lm_eval_task_is_named_before_anything_loads(tmp_path):
    """check_resources (run before any model loads) names every task lm-eval does not know."""
    from featcal.errors import ConfigError

    write_lm_eval_tasks(tmp_path)
    node = {"tasks": ["math", "safety"], "lm_eval_tasks": {"math": ["tiny_mc"], "safety": ["tiny_typo"]},
            "lm_eval_include": [str(tmp_path)], "lm_eval_defaults": False}
    with pytest.raises(ConfigError, match=r"lm-eval does not know the task\(s\) \['tiny_typo \(backbone.taskpool.lm_eval_tasks.safety\)'\]") as err:
        MergeBenchTaskPool.check_resources(node)
    assert "backbone.taskpool.lm_eval_include" in str(err.value)
    node["lm_eval_tasks"]["safety"] = ["tiny_gen"]
    MergeBenchTaskPool.check_resources(node)
    # local JSON tasks read nothing from the hub: no dataset to check
    assert MergeBenchTaskPool.evaluation_dataset_sources(node) == []


def test_default_lm_eval_tasks_index_only_their_folders_and_name_their_hub_datasets():
    """The preset's default tasks: the task manager indexes only the folders that define them,
    and each task's hub dataset / config (what the availability check looks for) is the one
    of lm-eval's YAML, as tests/fixtures/standin_hub.py stands them in (LM_EVAL_DATASETS, read off the
    YAMLs independently)."""
    import yaml

    import lm_eval.tasks

    from featcal.run import CONF_DIR
    from featcal.tasks.mergebench import task_manager
    from tests.fixtures.standin_hub import LM_EVAL_DATASETS

    preset = yaml.safe_load((Path(CONF_DIR) / "taskpool" / "mergebench.yaml").read_text())["taskpool"]
    names = [t for ts in preset["lm_eval_tasks"].values() for t in ts]
    assert sorted(names) == sorted(LM_EVAL_DATASETS)
    tm = task_manager((), True, names)
    assert set(names) <= set(tm.task_index) and len(tm.task_index) < 1000  # not lm-eval's ~10k entries
    root = Path(lm_eval.tasks.__file__).parent
    for name in names:
        assert Path(tm.task_index[name].yaml_path).is_relative_to(root)
    node = {**preset, "tasks": list(preset["lm_eval_tasks"]), "allow_code_execution": True, "lm_eval_include": []}
    got = {key.split("(")[-1].rstrip(")"): (path, config) for path, config, key in MergeBenchTaskPool.evaluation_dataset_sources(node)}
    assert got == LM_EVAL_DATASETS
    node["allow_code_execution"] = False  # skipped code tasks need no data
    got = {key.split("(")[-1].rstrip(")") for _, _, key in MergeBenchTaskPool.evaluation_dataset_sources(node)}
    assert got == set(LM_EVAL_DATASETS) - {"humaneval_plus", "mbpp_plus"}
