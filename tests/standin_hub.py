"""A stand-in Hugging Face hub cache, laid out exactly as ``hf download`` leaves it.

``put_repo(hub_cache, repo_id, folder, repo_type)`` copies the files of ``folder`` into
``<hub_cache>/<type>s--<org>--<name>/``: every file content once under ``blobs/<sha256>``,
``snapshots/<commit>/<relative path>`` as relative symlinks to the blobs, and
``refs/main`` holding the commit hash (huggingface_hub's cache layout).

``put_dataset_snapshot(hub_cache, repo_id, configs)`` writes a dataset repository in the
form the hub serves it (what ``hf download --repo-type dataset`` fetches): one parquet file
per (config, split) at ``<config>/<split>-00000-of-00001.parquet`` (``data/`` for a
single-config repo) and a README whose YAML front matter lists ``configs:`` with their
``data_files`` per split. The parquet files carry datasets' feature metadata (ClassLabel
names, Image features), as files written by ``push_to_hub`` do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping


def _commit_of(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()


def put_repo(hub_cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Place ``folder``'s files in the hub cache as repo ``repo_id``; return the snapshot folder."""
    hub_cache, folder = Path(hub_cache), Path(folder)
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = _commit_of(folder)
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def dataset_card(configs: Mapping[str, Mapping[str, str]]) -> str:
    """README.md with the ``configs:`` front matter: {config: {split: path pattern}}."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    lines += ["---", "", "Stand-in dataset card (tiny random rows in the real schema).", ""]
    return "\n".join(lines)


def write_dataset_repo(folder: Path, configs: Mapping[str, Mapping[str, object]]) -> Path:
    """{config: {split: datasets.Dataset}} -> parquet files + README configs in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card: dict[str, dict[str, str]] = {}
    single = list(configs) == ["default"]
    for name, splits in configs.items():
        sub = "data" if single else name
        card[name] = {}
        for split, ds in splits.items():
            rel = f"{sub}/{split}-00000-of-00001.parquet"
            (folder / sub).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(folder / rel))
            card[name][split] = f"{sub}/{split}-*"
    (folder / "README.md").write_text(dataset_card(card))
    return folder


def put_dataset_snapshot(hub_cache: Path, repo_id: str, configs: Mapping[str, Mapping[str, object]]) -> Path:
    """A dataset repo in snapshot-only form in the hub cache; returns the snapshot folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset_repo(Path(tmp), configs)
        return put_repo(hub_cache, repo_id, Path(tmp), "dataset")


def put_model_snapshot(hub_cache: Path, repo_id: str, folder: Path, drop: tuple[str, ...] = ()) -> Path:
    """A saved model folder placed in the hub cache under ``repo_id`` (``drop``: file names left out)."""
    if not drop:
        return put_repo(hub_cache, repo_id, folder, "model")
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "m"
        shutil.copytree(folder, dst, ignore=shutil.ignore_patterns(*drop))
        return put_repo(hub_cache, repo_id, dst, "model")
