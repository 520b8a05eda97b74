"""The one budget resolution (featcal/tasks/budget.py): numbers, ``all``, the split key and
the over-budget message, for config validation and for every pool family (CLIP, GLUE /
text-to-text, MergeBench; the embedded suites' pools are these families' subclasses, and
tests/suites/test_embedded.py draws ``all`` from the embedded CLIP pool). The examples a pool
uses are checked independently: the seeded shuffle's first n, the same rows as before the
budget was unified (the pinned lists were recorded on commit 13ad934)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from featcal.errors import BudgetTooLarge, ConfigError
from featcal.tasks.budget import ALL, config_problems, examples_per_task, seeded_first_n


# ---- the resolution itself --------------------------------------------------------------


def test_examples_per_task_numbers_and_all():
    assert examples_per_task(8, 100, "cola") == 8
    assert examples_per_task(100, 100, "cola") == 100
    assert examples_per_task(ALL, 37, "cola", "test") == 37
    assert examples_per_task(None, 37, "cola") == 37
    assert examples_per_task("16", 37, "cola") == 16  # a command-line string of digits


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "most", "", [8]])
def test_examples_per_task_rejects_what_is_no_count(bad):
    with pytest.raises(ConfigError, match=r"task 'rte': budget\.per_task=.*positive integer .* or 'all'") as info:
        examples_per_task(bad, 50, "rte")
    assert not isinstance(info.value, BudgetTooLarge)


def test_over_budget_names_the_key_the_split_and_its_size():
    with pytest.raises(BudgetTooLarge) as info:
        examples_per_task(65, 64, "mnist", "test")
    msg = str(info.value)
    assert "task 'mnist'" in msg and "budget.per_task" in msg
    assert "exceeds the 64 examples of split 'test'" in msg
    assert "budget.per_task=64 or less" in msg and "budget.per_task=all" in msg and "budget.split" in msg
    assert isinstance(info.value, ValueError)  # a ConfigError: reported without a traceback


def test_seeded_first_n_is_numpys_seeded_permutation():
    assert seeded_first_n(16, 5, 3) == np.random.default_rng(3).permutation(16)[:5].tolist()
    assert seeded_first_n(16, 5, 3) == [11, 15, 9, 1, 12]  # recorded on 13ad934
    full = seeded_first_n(16, 16, 3)
    assert sorted(full) == list(range(16)) and full[:5] == seeded_first_n(16, 5, 3)


# ---- config validation, before anything loads -------------------------------------------

SIZES = {"train": {"a": 100, "b": 40}, "test": {"a": 30, "b": 50}}


def _problems(per_task, split="train", batch_size=8, tasks=("a", "b"), sizes=SIZES):
    node = {"per_task": per_task, "split": split, "batch_size": batch_size}
    return config_problems(node, list(tasks), lambda s: None if sizes is None else sizes.get(s))


def test_config_problems_numbers_all_and_split():
    assert _problems(40) == [] and _problems(30, "test") == []
    assert _problems(ALL) == [] and _problems(ALL, "test") == []
    assert _problems(10_000, sizes=None) == []  # no sizes declared: the pool checks at load time
    (p,) = _problems(41)
    assert p.startswith("budget.per_task=41: task 'b': calibration budget 41 (budget.per_task) exceeds the 40 examples of split 'train'")
    assert "backbone.train_sizes.b" in p and "budget.per_task=40 or less" in p
    (p,) = _problems(31, "test")  # the split key picks the size table
    assert "task 'a'" in p and "30 examples of split 'test'" in p and "backbone.test_sizes.a" in p
    (p,) = _problems(8, "val")
    assert p == "budget.split='val': allowed: train, test"
    (p,) = _problems(0)
    assert p.startswith("budget.per_task=0: must be a positive integer") and "'all'" in p
    (p,) = _problems(8, batch_size=0)
    assert p.startswith("budget.batch_size=0: must be a positive integer")
    (p,) = _problems(8, tasks=("a", "c"))
    assert p.startswith("backbone.train_sizes=['a', 'b']: has no size for tasks ['c']")


def test_validate_uses_the_same_words_as_the_pools():
    from hydra import compose, initialize_config_dir

    from featcal.config import validate

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["budget.per_task=1000000"])
        validate(compose(config_name="config", overrides=["budget.per_task=all", "budget.split=test"]))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    pool_reason = str(info.value).split("budget.per_task=1000000: ", 1)[1]
    assert pool_reason.startswith("task '") and "calibration budget 1000000 (budget.per_task) exceeds the " in pool_reason


# ---- every pool family: per_task=all, numbers, the examples used -------------------------


@pytest.fixture(scope="module")
def clip_pool(tmp_path_factory):
    from tests.fixtures.clip import make_tiny_clip, make_tiny_task_dataset
    from featcal.tasks.clip_vision import CLIPVisionTaskPool

    root = tmp_path_factory.mktemp("clip")
    make_tiny_clip(root / "v4", layout="v4", seed=0)
    make_tiny_task_dataset(root / "mnist", 10, n_train=16, n_test=12, seed=0, mode="L")
    return CLIPVisionTaskPool(["mnist"], str(root / "v4"), datasets={"mnist": str(root / "mnist")},
                              cache_dir=str(root / "heads"), device="cpu")


def test_clip_pool_all_numbers_and_rows(clip_pool):
    assert clip_pool.calibration_indices("mnist", 5, 3) == [11, 15, 9, 1, 12]  # recorded on 13ad934
    for split, size in (("train", 16), ("test", 12)):
        idx = clip_pool.calibration_indices("mnist", ALL, 7, split)
        assert idx == np.random.default_rng(7).permutation(size).tolist()
        sets = clip_pool.calibration_set(ALL, 7, 5, split)
        assert sum(b["pixel_values"].shape[0] for b in sets[0]) == size
    with pytest.raises(BudgetTooLarge, match="exceeds the 12 examples of split 'test'"):
        clip_pool.calibration_set(13, 0, 4, "test")


@pytest.fixture(scope="module")
def glue_pool(tmp_path_factory):
    from tests.fixtures.t5 import TASKS, build_tokenizer, glue_rows, save_glue_datasets
    from featcal.tasks.glue import GLUETaskPool, glue_templates

    root = tmp_path_factory.mktemp("glue")
    save_glue_datasets(root / "data")
    templates = glue_templates()
    corpus = [templates[t]["template"].format(**{f: r[f] for f in templates[t]["fields"]})
              for t in ("cola", "rte") for r in glue_rows(t, 32, seed=0)]
    build_tokenizer(root / "tok", corpus).save_pretrained(str(root / "tok"))
    return GLUETaskPool(["cola", "rte"], str(root / "tok"), datasets=str(root / "data"), cache_dir=str(root / "cache"), progress=False)


def test_text2text_pool_all_numbers_and_rows(glue_pool):
    """per_task=all compared a string with an int here before (TypeError)."""
    # the same rows as before the budget was unified (recorded on 13ad934)
    assert glue_pool.calibration_indices("cola", 8, 0) == [2, 11, 25, 21, 10, 4, 29, 16]
    assert glue_pool.calibration_indices("rte", 12, 2, "test") == [2, 0, 9, 10, 11, 7, 5, 6, 3, 4, 8, 1]
    assert glue_pool.calibration_indices("cola", ALL, 0) == np.random.default_rng(0).permutation(32).tolist()
    sets = glue_pool.calibration_set(ALL, 3, 5, "test")
    assert [sum(b["input_ids"].shape[0] for b in task) for task in sets] == [12, 12]
    # independently: the batches hold the test rows at the seeded permutation, in that order
    want = np.random.default_rng(3).permutation(12).tolist()
    test = glue_pool.split("rte", "test")
    got = [row[m.bool()].tolist() for b in sets[1] for row, m in zip(b["input_ids"], b["attention_mask"])]
    assert got == [test.input_ids[i] for i in want]
    with pytest.raises(BudgetTooLarge, match=r"task 'cola'.*exceeds the 32 examples of split 'train'.*budget\.per_task=32 or less"):
        glue_pool.calibration_set(33, 0, 4)


@pytest.fixture(scope="module")
def mergebench_pool(tmp_path_factory):
    from tests.fixtures.llm import word_tokenizer
    from featcal.tasks.mergebench import MergeBenchTaskPool

    root = tmp_path_factory.mktemp("mb")
    word_tokenizer(root / "tok")
    path = root / "math_val.json"
    path.write_text("\n".join(json.dumps({"query": f"w{i}", "response": f"w{i}"}) for i in range(10)))
    return MergeBenchTaskPool(["math"], str(root / "tok"), {"math": str(path)}, {"math": []})


def _row_ids(texts):
    return [t.split("### Response:")[1].split()[0] for t in texts]


def test_mergebench_pool_all_numbers_and_rows(mergebench_pool):
    """per_task=all compared a string with an int here before (TypeError)."""
    import datasets

    # the same rows as before the budget was unified (recorded on 13ad934)
    assert _row_ids(mergebench_pool.calibration_texts("math", 4, 0)) == ["w4", "w6", "w2", "w7"]
    assert _row_ids(mergebench_pool.calibration_texts("math", 4, 5)) == ["w7", "w6", "w1", "w3"]
    everything = _row_ids(mergebench_pool.calibration_texts("math", ALL, 0))
    assert everything == ["w4", "w6", "w2", "w7", "w3", "w5", "w9", "w0", "w8", "w1"]
    # independently: datasets' own seeded shuffle, first n
    ds = datasets.Dataset.from_list([{"i": i} for i in range(10)]).shuffle(seed=0)
    assert everything == [f"w{r['i']}" for r in ds]
    sets = mergebench_pool.calibration_set(ALL, 0, 4)
    assert [b["input_ids"].shape[0] for b in sets[0]] == [4, 4, 2]
    with pytest.raises(BudgetTooLarge, match=r"task 'math'.*exceeds the 10 examples of split 'train'"):
        mergebench_pool.calibration_texts("math", 11, 0)
    with pytest.raises(ConfigError, match=r"budget\.per_task='most'"):
        mergebench_pool.calibration_set("most", 0, 4)
    assert torch.equal(sets[0][0]["input_ids"], mergebench_pool.calibration_set(4, 0, 4)[0][0]["input_ids"])
