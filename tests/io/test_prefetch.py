"""First use apart from loading (issue 20, part 3): hub downloads happen in the run's
``prepare`` stage, and ``load`` reads the local cache.

The "hub" is a stand-in: ``tests/fixtures/standin_hub.py`` builds a hub cache (the layout ``hf
download`` leaves) holding tiny FLAN-T5 models and a GLUE snapshot under their real ids;
``huggingface_hub.snapshot_download`` is replaced by a server that
copies the requested files (``allow_patterns``) of that cache's snapshot into the run's own
empty hub cache, exactly as huggingface_hub lays them out (blobs, snapshot symlinks, refs).
Every call records the stage the run was in.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures.standin_hub import build_standin_hub

import huggingface_hub

real_snapshot_download = huggingface_hub.snapshot_download

TASKS = ["cola", "rte"]


class StandinServer:
    """snapshot_download served from a stand-in hub cache ("remote")."""

    def __init__(self, remote: Path, local: Path, stages: list[str]):
        self.remote, self.local, self.stages = remote, local, stages
        self.calls: list[dict] = []

    def _repo(self, root: Path, repo_id: str, repo_type: str | None) -> Path:
        return root / f"{repo_type or 'model'}s--{repo_id.replace('/', '--')}"

    def _remote_snapshot(self, repo_id: str, repo_type: str | None) -> tuple[str, Path]:
        repo = self._repo(self.remote, repo_id, repo_type)
        if not repo.is_dir():
            raise FileNotFoundError(f"404: {repo_id}")
        commit = (repo / "refs" / "main").read_text().strip()
        return commit, repo / "snapshots" / commit

    def stage(self) -> str | None:
        return self.stages[-1] if self.stages else None

    def snapshot_download(self, repo_id, repo_type=None, allow_patterns=None, **_):
        commit, snap = self._remote_snapshot(repo_id, repo_type)
        repo = self._repo(self.local, repo_id, repo_type)
        got = []
        for f in sorted(p for p in snap.rglob("*") if p.is_file()):
            rel = str(f.relative_to(snap))
            if allow_patterns is not None and not any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                continue
            blob = repo / "blobs" / Path(os.path.realpath(f)).name
            link = repo / "snapshots" / commit / rel
            if not link.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                if not blob.exists():
                    shutil.copyfile(os.path.realpath(f), blob)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(blob, link.parent), link)
                got.append(rel)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        self.calls.append({"fn": "snapshot_download", "repo": repo_id, "type": repo_type or "model",
                           "patterns": allow_patterns, "new_files": got, "stage": self.stage()})
        return str(repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("remote")
    return build_standin_hub(root, families=("glue",), glue_experts=TASKS) / "hub"


@pytest.fixture
def hub(remote, tmp_path, monkeypatch):
    """An empty local hub cache, hub access on, served by the stand-in; the run's stages tracked."""
    import datasets
    import huggingface_hub
    import huggingface_hub.constants as hc

    from featcal.io import hub as hub_mod
    from featcal.utils import StageTimer

    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("FEATCAL_CACHE", str(tmp_path / "featcal_cache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"), raising=False)  # read at import otherwise
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(hub_mod, "_PREFETCHED", {})
    stages: list[str] = []
    original = StageTimer.stage

    def stage(self, name):
        import contextlib

        @contextlib.contextmanager
        def tracked():
            stages.append(name)
            try:
                with original(self, name):
                    yield
            finally:
                stages.pop()

        return tracked()

    monkeypatch.setattr(StageTimer, "stage", stage)
    server = StandinServer(remote, home / "hub", stages)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", server.snapshot_download)
    return {"server": server, "home": home, "tmp": tmp_path, "monkeypatch": monkeypatch}


def _run(out: Path, extra: list[str] = ()) -> dict:
    from hydra import compose, initialize_config_dir

    from featcal.run import CONF_DIR, run

    overrides = ["backbone=flan_t5_base_glue", f"backbone.adapter.tasks=[{','.join(TASKS)}]",
                 "backbone.train_sizes={" + ",".join(f"{t}:8" for t in TASKS) + "}", "backbone.taskpool.progress=false",
                 "merge=task_arithmetic", "calibration=none", "logger=none", "device=cpu", "budget.per_task=4",
                 "budget.batch_size=4", "eval_batch_size=8", "evaluate_base=false", "evaluate_experts=false",
                 f"hydra.run.dir={out}", *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return run(cfg, out)


def test_downloads_happen_in_prepare_and_load_reads_the_cache(hub):
    server = hub["server"]
    res = _run(hub["tmp"] / "first")
    stored = json.loads((hub["tmp"] / "first" / "results.json").read_text())
    assert "prepare" in stored["timings"] and "load" in stored["timings"]
    downloads = [c for c in server.calls if c["fn"] == "snapshot_download"]
    repos = {c["repo"] for c in downloads}
    models = {"google/flan-t5-base", *(f"tanganke/flan-t5-base_glue-{t}" for t in TASKS)}
    assert models | {"nyu-mll/glue"} <= repos
    # every hub call was made in prepare: none in load, merge or evaluation
    assert {c["stage"] for c in server.calls} == {"prepare"}, [(c["repo"], c["stage"]) for c in server.calls if c["stage"] != "prepare"]
    assert all(c["new_files"] for c in downloads if c["repo"] in models)  # the weights came now, not later
    assert res["prepared"]["models"] == {m: "downloaded" for m in models}
    assert res["prepared"]["datasets"] == {"nyu-mll/glue": "downloaded"}
    # one weights format (the stand-in's safetensors), and only the data of the tasks used
    got = {f for c in downloads if c["repo"] == "google/flan-t5-base" for f in c["new_files"]}
    assert any(f.endswith(".safetensors") for f in got) and not any(f.endswith(".bin") for f in got), got
    data_files = {f for c in downloads if c["repo"] == "nyu-mll/glue" for f in c["new_files"]}
    assert {f.split("/")[0] for f in data_files if f != "README.md"} == set(TASKS), data_files

    # a second run in the same process: the cache holds everything, nothing is fetched again
    server.calls.clear()
    res2 = _run(hub["tmp"] / "second", ["seed=1"])
    assert "prepare" in res2["timings"]
    assert all(not c["new_files"] for c in server.calls if c["fn"] == "snapshot_download")
    assert {c["stage"] for c in server.calls} <= {"prepare"}
    assert res2["prepared"]["models"] == {m: "cached" for m in models}
    assert res2["prepared"]["datasets"] == {"nyu-mll/glue": "cached"}
    assert res2["score"]["merged"].keys() == res["score"]["merged"].keys()


@pytest.mark.slow  # three tiny runs
def test_no_network_or_offline_with_everything_cached(hub, monkeypatch):
    import datasets
    import huggingface_hub
    import huggingface_hub.constants as hc

    from featcal.io import hub as hub_mod

    server = hub["server"]
    _run(hub["tmp"] / "fill")  # fills the local cache online
    server.calls.clear()
    # hub access on but no network (huggingface_hub's real snapshot_download, a refused
    # endpoint): it answers from the cached snapshots; the run goes on
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_mod, "_PREFETCHED", {})  # a fresh process
    res = _run(hub["tmp"] / "no_network", ["seed=3"])
    assert set(res["prepared"]["models"].values()) == {"cached"} and "prepare" in res["timings"]
    mp = hub["monkeypatch"]
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(hub_mod, "_PREFETCHED", {})  # a fresh process
    res = _run(hub["tmp"] / "offline", ["seed=2"])
    assert server.calls == []
    assert "prepare" in res["timings"]
    assert set(res["prepared"]["models"].values()) == {"cached"} and res["prepared"]["datasets"] == {"nyu-mll/glue": "cached"}


def test_dataset_patterns_follow_the_readme_configs(tmp_path):
    from featcal.prefetch import _dataset_patterns
    from tests.fixtures.standin_hub import dataset_card

    (tmp_path / "README.md").write_text(dataset_card({"cola": {"train": "cola/train-*.parquet", "validation": "cola/validation-*"},
                                                      "rte": {"train": "rte/train-*.parquet"}}) + "\n# GLUE\n")
    pats = _dataset_patterns(tmp_path, {"cola"})
    assert set(pats) == {"README.md", "cola/train-*.parquet", "cola/validation-*"}
    assert _dataset_patterns(tmp_path, {"cola", "qqp"}) is None  # a config the README does not list: whole repo
    assert _dataset_patterns(tmp_path, {None}) is None
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert _dataset_patterns(tmp_path, {"cola"}) is None
