"""The config groups mirror the code (issue 22 part 2): ``conf/model/`` holds the adapters
(featcal/backbone), ``conf/taskpool/`` the task pools (featcal/tasks: tasks, data, scorer,
split sizes) and ``conf/backbone/`` thin presets pairing one model with one task pool
through ``defaults:``. Every preset is composed with Hydra's compose API and checked for
the structure the run relies on."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from featcal.config import compose
from featcal.paths import conf_dir

CONF = conf_dir()
PRESETS = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
# the MergeBench pools read hub datasets whose sizes the configs do not state
NO_SPLIT_SIZES = {"featcal.tasks.mergebench.MergeBenchTaskPool"}


def _raw(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}


def _locate(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def composed():
    return {name: compose([f"backbone={name}"]) for name in PRESETS}


def test_there_are_presets_models_and_task_pools():
    assert {"embedded", "clip_vit_b32", "flan_t5_base_glue", "mergebench_llama31_8b"} <= set(PRESETS)
    assert (CONF / "model").is_dir() and (CONF / "taskpool").is_dir()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_to_what_the_run_reads(composed, name):
    cfg = composed[name]
    node = cfg.backbone
    for part in ("adapter", "taskpool"):
        target = node[part]._target_
        assert isinstance(target, str) and target.startswith("featcal."), (name, part, target)
        assert callable(_locate(target)), (name, target)
    resolved = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    tasks = resolved["adapter"]["tasks"]
    assert tasks and len(set(tasks)) == len(tasks), name
    assert resolved["taskpool"]["tasks"] == tasks, name  # adapter and pool agree on the tasks
    if node.taskpool._target_ in NO_SPLIT_SIZES:
        assert "train_sizes" not in node and "test_sizes" not in node, name
    else:
        for table in ("train_sizes", "test_sizes"):
            sizes = resolved[table]
            assert list(sizes) == tasks, (name, table)  # one size per task, in task order
            assert all(isinstance(v, int) and v > 0 for v in sizes.values()), (name, table)
    if "spec" in node:  # an embedded suite: model and pool read the one build the preset describes
        assert resolved["adapter"]["spec"] == resolved["taskpool"]["spec"] == resolved["spec"], name
        assert set(tasks) <= set(resolved["spec"]["tasks"]), name


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_thin(name):
    """A preset states no adapter or task-pool class itself: it names a model and a task pool
    (or another preset) in its defaults list."""
    raw = _raw("backbone", name)
    defaults = raw.get("defaults")
    assert defaults and defaults[-1] == "_self_", name
    for part in ("adapter", "taskpool"):
        assert "_target_" not in (raw.get(part) or {}), (name, part)
    groups = {next(iter(d)).split("@")[0] for d in defaults if isinstance(d, dict)}
    inherits = [d for d in defaults if isinstance(d, str) and d != "_self_"]
    assert groups == {"/model", "/taskpool"} or (inherits and set(inherits) <= set(PRESETS)), (name, defaults)


def test_every_model_and_task_pool_file_is_used():
    used = {"model": set(), "taskpool": set()}
    for name in PRESETS:
        for d in _raw("backbone", name).get("defaults", []):
            if isinstance(d, dict):
                ((where, choice),) = d.items()
                used[where.split("@")[0].lstrip("/")].add(choice)
    for name in list(used["model"]):
        used["model"] |= {d for d in _raw("model", name).get("defaults", []) if isinstance(d, str) and d != "_self_"}
    for group in used:
        assert used[group] == {p.stem for p in (CONF / group).glob("*.yaml")}, group


def test_mergebench_presets_share_one_pool_and_one_model_template(composed):
    names = [n for n in PRESETS if n.startswith("mergebench_")]
    assert len(names) == 4
    pools = [OmegaConf.to_container(composed[n].backbone.taskpool, resolve=False) for n in names]
    assert all(p == pools[0] for p in pools)  # the same node, tokenizer = each model's base by interpolation
    for n in names:
        assert {next(iter(d)): d[next(iter(d))] for d in _raw("backbone", n)["defaults"] if isinstance(d, dict)} == \
            {"/model@adapter": n, "/taskpool@_here_": "mergebench"}
        assert "mergebench" in _raw("model", n)["defaults"]  # the shared template
        adapter = composed[n].backbone.adapter
        name = adapter.base.split("/")[-1]
        assert dict(adapter.experts) == {t: f"MergeBench/{name}_{t}" for t in adapter.tasks}
        tokenizer = OmegaConf.to_container(composed[n].backbone, resolve=True)["taskpool"]["tokenizer"]
        assert tokenizer == adapter.base


def test_openclip_reuses_the_clip_pool(composed):
    a = OmegaConf.to_container(composed["clip_vit_b32"].backbone, resolve=True, throw_on_missing=False)
    b = OmegaConf.to_container(composed["clip_vit_b32_openclip"].backbone, resolve=True, throw_on_missing=False)
    assert a["taskpool"] == b["taskpool"]  # base: the transformers text tower in both
    assert a["train_sizes"] == b["train_sizes"] and a["test_sizes"] == b["test_sizes"]
    assert b["adapter"]["_target_"].endswith("OpenCLIPVisionBackbone") and b["adapter"]["base"] == "zeroshot.pt"


def test_overrides_of_model_and_pool_keys_and_model_swap():
    cfg = compose(["backbone=clip_vit_b32", "backbone.adapter.base=/m", "backbone.taskpool.datasets.sun397=/d",
                   "backbone.train_sizes.sun397=7"])
    assert cfg.backbone.adapter.base == "/m" and cfg.backbone.taskpool.datasets.sun397 == "/d"
    assert cfg.backbone.train_sizes.sun397 == 7
    assert OmegaConf.to_container(cfg.backbone, resolve=True)["taskpool"]["base"] == "/m"
    swapped = compose(["backbone=mergebench_llama31_8b", "model@backbone.adapter=mergebench_gemma2_2b"])
    assert swapped.backbone.adapter._target_ == "featcal.backbone.gemma2.Gemma2Backbone"
    assert swapped.backbone.taskpool._target_ == "featcal.tasks.mergebench.MergeBenchTaskPool"


def test_force_added_keys_of_the_model_and_pool_files_are_known():
    """``++key=`` on a key the preset's model or task-pool file sets is a plain override
    (featcal.strict follows the preset's defaults list), an unknown one is still reported."""
    from featcal.strict import unknown_key_problems

    for key, known in (("backbone.train_sizes.sun397", True), ("backbone.taskpool.text_batch_size", True),
                       ("backbone.train_sizes.sun398", False)):
        ov = [f"++{key}=5"]
        cfg = compose(["backbone=clip_vit_b32", *ov])
        problems = unknown_key_problems(cfg, ov, {"backbone": "clip_vit_b32"})
        assert (problems == []) is known, (key, problems)
    ov = ["++backbone.taskpool.limit=3"]  # set by embedded_llama_small itself over embedded_llama's pool
    assert unknown_key_problems(compose(["backbone=embedded_llama_small", *ov]), ov, {"backbone": "embedded_llama_small"}) == []


_MODULE = re.compile(r"\b(featcal(?:\.[A-Za-z_]\w*)+)")
_PATH = re.compile(r"\b(featcal/[\w/]+\.(?:py|json))")


def test_comments_name_modules_that_exist():
    """Every module, class or file a config comment names (featcal.x.Y, featcal/x/y.py) exists."""
    root = Path(__file__).resolve().parents[2]
    bad = []
    for f in sorted(CONF.rglob("*.yaml")):
        for ln, line in enumerate(f.read_text().splitlines(), 1):
            comment = line[line.index("#"):] if "#" in line else ""
            for name in _MODULE.findall(comment):
                parts = name.split(".")
                if parts[-1] in ("yaml", "py", "json"):
                    continue  # a file name, not a module
                for i in range(len(parts), 1, -1):
                    try:
                        obj = importlib.import_module(".".join(parts[:i]))
                    except ImportError:
                        continue
                    for attr in parts[i:]:
                        obj = getattr(obj, attr, None)
                    break
                else:
                    obj = None
                if obj is None:
                    bad.append(f"{f.relative_to(CONF)}:{ln}: {name}")
            bad += [f"{f.relative_to(CONF)}:{ln}: {p}" for p in _PATH.findall(comment) if not (root / p).exists()]
    assert not bad, bad
