"""The one dataset resolver (featcal.io.datasets) and the availability check before loading.

Offline throughout (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME in tmp): a dataset
that exists only as a hub snapshot in the hub cache (what `hf download --repo-type dataset`
leaves) must load; local folders of every supported form must load; the prepared Arrow
cache of an online load_dataset must load; everything missing is listed at once."""
from __future__ import annotations

import json

import datasets
import pytest

from featcal.io.datasets import card_configs, dataset_location, load_dataset_split, snapshot_dir
from featcal.errors import ConfigError, SourceUnavailable
from tests.fixtures.standin_hub import offline_home, put_dataset_snapshot, put_repo, write_dataset_repo

GLUE_COLA = datasets.Features({
    "sentence": datasets.Value("string"),
    "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
    "idx": datasets.Value("int32"),
})
GLUE_STSB = datasets.Features({
    "sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
    "label": datasets.Value("float32"), "idx": datasets.Value("int32"),
})


def _cola(n: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"sentence": [f"s{offset + i}" for i in range(n)], "label": [i % 2 for i in range(n)], "idx": list(range(n))},
        features=GLUE_COLA)


def _stsb(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"sentence1": ["a"] * n, "sentence2": ["b"] * n, "label": [float(i) for i in range(n)], "idx": list(range(n))},
        features=GLUE_STSB)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    return offline_home(monkeypatch, tmp_path / "hf")


def test_hub_snapshot_only_dataset_loads_offline(hub):
    snap = put_dataset_snapshot(hub, "nyu-mll/glue", {
        "cola": {"train": _cola(6), "validation": _cola(4, 100)},
        "stsb": {"train": _stsb(5), "validation": _stsb(3)},
    })
    # the real layout: refs/main -> snapshots/<commit>, files are symlinks into blobs/
    repo = hub / "datasets--nyu-mll--glue"
    assert (repo / "refs" / "main").read_text() == snap.name
    assert (snap / "cola" / "train-00000-of-00001.parquet").is_symlink()
    assert snapshot_dir("nyu-mll/glue") == snap
    assert sorted(card_configs(snap)) == ["cola", "stsb"]
    assert dataset_location("nyu-mll/glue", "cola").kind == "snapshot"
    ds = load_dataset_split("nyu-mll/glue", "validation", "cola")
    assert ds["sentence"] == [f"s{100 + i}" for i in range(4)]
    assert ds.features["label"].names == ["unacceptable", "acceptable"]  # ClassLabel survives parquet
    st = load_dataset_split("nyu-mll/glue", "train", "stsb")
    assert st.column_names == ["sentence1", "sentence2", "label", "idx"] and len(st) == 5
    # a config the card does not list: not available, and the message says which exist
    loc = dataset_location("nyu-mll/glue", "mnli")
    assert not loc.available and "cola" in loc.problem and "'mnli'" in loc.problem
    with pytest.raises(SourceUnavailable, match="mnli") as err:
        load_dataset_split("nyu-mll/glue", "train", "mnli", where="task 'mnli'", key="backbone.taskpool.datasets")
    assert "hf download --repo-type dataset nyu-mll/glue" in str(err.value)
    with pytest.raises(ConfigError, match="no split 'validation_matched'"):
        load_dataset_split("nyu-mll/glue", "validation_matched", "cola")


def test_single_config_snapshot_and_refs(hub):
    snap = put_dataset_snapshot(hub, "MergeBench/math_val", {"default": {"train": datasets.Dataset.from_dict({"query": ["q1", "q2"], "response": ["r1", "r2"]})}})
    assert (snap / "data" / "train-00000-of-00001.parquet").exists()
    assert load_dataset_split("MergeBench/math_val", "train")["query"] == ["q1", "q2"]
    # a newer snapshot: refs/main decides which one is read
    snap2 = put_dataset_snapshot(hub, "MergeBench/math_val", {"default": {"train": datasets.Dataset.from_dict({"query": ["q3"], "response": ["r3"]})}})
    assert snap2 != snap and snapshot_dir("MergeBench/math_val") == snap2
    assert load_dataset_split("MergeBench/math_val", "train")["query"] == ["q3"]


def test_local_forms(hub, tmp_path):
    # save_to_disk folder, and a folder holding one save_to_disk folder per config
    dd = datasets.DatasetDict({"train": _cola(3), "validation": _cola(2, 50)})
    dd.save_to_disk(str(tmp_path / "saved"))
    dd.save_to_disk(str(tmp_path / "per_task" / "cola"))
    assert load_dataset_split(str(tmp_path / "saved"), "validation")["sentence"] == ["s50", "s51"]
    assert dataset_location(str(tmp_path / "per_task"), "cola").kind == "saved"
    assert load_dataset_split(str(tmp_path / "per_task"), "train", "cola")["sentence"] == ["s0", "s1", "s2"]
    # a snapshot folder given as a path (hf download --local-dir)
    write_dataset_repo(tmp_path / "glue_local", {"cola": {"train": _cola(2), "validation": _cola(3, 7)}})
    assert dataset_location(str(tmp_path / "glue_local"), "cola").kind == "folder"
    assert load_dataset_split(str(tmp_path / "glue_local"), "validation", "cola")["sentence"] == ["s7", "s8", "s9"]
    # a folder of data files without a card: splits from the file names
    (tmp_path / "files").mkdir()
    _cola(2).to_parquet(str(tmp_path / "files" / "train.parquet"))
    _cola(1, 9).to_parquet(str(tmp_path / "files" / "test.parquet"))
    assert load_dataset_split(str(tmp_path / "files"), "test")["sentence"] == ["s9"]
    # single data files (json lines, parquet)
    rows = [{"instruction": "do x", "output": "done"}, {"instruction": "do y", "output": "ok"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_dataset_split(str(tmp_path / "d.jsonl"), "train")["instruction"] == ["do x", "do y"]
    # wrong paths: named, no download command for a path
    with pytest.raises(SourceUnavailable, match="does not exist") as err:
        load_dataset_split(str(tmp_path / "nope"), "train", key="backbone.taskpool.datasets.math")
    assert "hf download" not in str(err.value) and "backbone.taskpool.datasets.math" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceUnavailable, match="no data files"):
        load_dataset_split(str(tmp_path / "empty"), "train")


def test_prepared_cache_of_an_online_load_is_read_offline(hub, tmp_path):
    """The Arrow cache an online load_dataset('org/name', config) leaves (<org>___<name>/<config>/...)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    write_dataset_repo(tmp_path / "src", {"cola": {"train": _cola(3), "validation": _cola(2, 40)}})
    cache = hub.parent / "datasets"
    files = {"train": str(tmp_path / "src/cola/train-00000-of-00001.parquet"),
             "validation": str(tmp_path / "src/cola/validation-00000-of-00001.parquet")}
    builder = Parquet(cache_dir=str(cache), dataset_name="glue", config_name="cola", config_id="cola", data_files=files,
                      hash="0123456789abcdef")
    builder.repo_id = "nyu-mll/glue"  # as a hub load names it: <org>___<name>/<config>/<version>/<commit>
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    assert (cache / "nyu-mll___glue" / "cola").is_dir()
    assert dataset_location("nyu-mll/glue", "cola").kind == "prepared"
    assert load_dataset_split("nyu-mll/glue", "validation", "cola")["sentence"] == ["s40", "s41"]
    assert not dataset_location("nyu-mll/glue", "sst2").available  # another config: not prepared


# ---- availability before anything loads -------------------------------------------------


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from featcal.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_precheck_lists_everything_missing_with_commands(hub, tmp_path):
    from featcal.io.hub import check_sources_available, required_sources

    cfg = _compose(["backbone=flan_t5_base_glue", "logger=none"])
    models, data = required_sources(cfg)
    assert ("google/flan-t5-base", "backbone.adapter.base") in models
    assert len({m for m, _ in models}) == 9 and len(data) == 8
    assert ("nyu-mll/glue", "mnli", "backbone.taskpool.datasets") in data
    with pytest.raises(SourceUnavailable) as err:
        check_sources_available(cfg)
    msg = str(err.value)
    for t in ("cola", "mnli", "stsb"):
        assert f"hf download tanganke/flan-t5-base_glue-{t}" in msg
    assert msg.count("hf download --repo-type dataset nyu-mll/glue") == 1  # one command for the 8 configs
    assert "(config 'qqp')" in msg and "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in msg
    assert msg.startswith("17 model/dataset source(s) not available")  # 9 models + 8 GLUE configs

    # with the snapshots in place (models: any files; data: the card's configs) nothing is missing
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    for m in {m for m, _ in models}:
        put_repo(hub, m, tmp_path / "m", "model")
    put_dataset_snapshot(hub, "nyu-mll/glue", {t: {"train": _cola(2)} for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")})
    with pytest.raises(SourceUnavailable) as err:
        check_sources_available(cfg)
    msg = str(err.value)  # stsb is not in that card: only it is listed
    assert msg.startswith("1 model/dataset source(s)") and "'stsb'" in msg
    put_dataset_snapshot(hub, "nyu-mll/glue", {t: {"train": _cola(2)} for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")})
    check_sources_available(cfg)


def test_precheck_runs_before_any_model_loads(hub, tmp_path, monkeypatch):
    from featcal.backbone.clip import CLIPVisionBackbone
    from featcal.run import run

    loaded = []
    monkeypatch.setattr(CLIPVisionBackbone, "load_base", lambda self: loaded.append("base"))
    cfg = _compose(["backbone=clip_vit_b32", "logger=none", "device=cpu", "backbone.adapter.tasks=[mnist,svhn]",
                    f"backbone.taskpool.datasets.mnist={tmp_path / 'no_mnist'}"])
    with pytest.raises(SourceUnavailable) as err:
        run(cfg, tmp_path / "out")
    msg = str(err.value)
    assert not loaded
    assert "hf download openai/clip-vit-base-patch32" in msg and "hf download tanganke/clip-vit-base-patch32_svhn" in msg
    assert "hf download --repo-type dataset ufldl-stanford/svhn" in msg and "(config 'cropped_digits')" in msg
    assert f"folder '{tmp_path / 'no_mnist'}' does not exist (backbone.taskpool.datasets.mnist)" in msg


def test_precheck_only_checks_the_tasks_the_run_uses(hub, tmp_path):
    from featcal.io.hub import required_sources

    cfg = _compose(["backbone=mergebench_llama32_3b", "logger=none", "backbone.adapter.tasks=[instruction,math]"])
    models, data = required_sources(cfg)
    assert {m for m, _ in models} == {"meta-llama/Llama-3.2-3B", "MergeBench/Llama-3.2-3B_instruction", "MergeBench/Llama-3.2-3B_math"}
    assert [d for d, _, _ in data] == ["MergeBench/instruction_val", "MergeBench/math_val"]
