"""First use, apart from loading: every hub model and dataset a run will read is fetched
into the local Hugging Face caches in the run's ``prepare`` stage, so that ``load`` (and the
stages after it) measure reading from the local cache, not a download.

- Models: each hub id the backbone adapter and task pool declare (``featcal.io.hub.
  required_sources``) that is not a local folder is fetched, when the hub is on, with
  ``huggingface_hub.snapshot_download`` -- configs, tokenizer files and one weights format
  (safetensors when the repo has them, else ``*.bin`` / ``*.pt``), as ``hf download`` would
  leave them; files the cache holds already are not fetched again -- and remembered
  (``featcal.io.hub.remember_snapshot``): the loaders' ``resolve_model_dir`` then answers
  from that folder without asking the hub again. Offline (``HF_HUB_OFFLINE=1``) nothing is
  asked: the loaders read the cache's snapshots as before.
- Datasets: each hub dataset not in the hub or prepared datasets cache is fetched as a hub
  snapshot (``snapshot_download(repo_type="dataset")``): only the README and the data files
  of the configs the run uses when the README lists them, else the whole repo. The dataset
  resolver (``featcal.io.datasets``) then reads the snapshot offline.

Offline, or with everything cached, this costs next to nothing. Datasets that other
libraries download themselves (lm-eval's task datasets) are not covered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: model files a run may read besides the weights (configs, tokenizers); then one weights
#: format: safetensors when the repo has them, else the PyTorch pickles
_META = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_PICKLES = ["*.bin", "*.pt", "*.pth"]


def _files(folder: Path | None) -> set[str]:
    if folder is None or not Path(folder).is_dir():
        return set()
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}


def _dataset_patterns(folder: Path, configs: set[str | None]) -> list[str] | None:
    """The README and the data files of ``configs`` (from the README's ``configs:``), or
    None (the whole repo) when the README does not list them all."""
    from featcal.io.datasets import card_configs

    listed = card_configs(folder)
    if not listed or None in configs or not configs <= set(listed):
        return None
    patterns = ["README.md"]
    for config in sorted(c for c in configs if c):
        files = listed[config]
        entries = files if isinstance(files, list) else [files]
        for entry in entries:
            paths = entry.get("path") if isinstance(entry, dict) else entry
            patterns += [str(p) for p in (paths if isinstance(paths, list) else [paths]) if p]
    return patterns


def prefetch_sources(cfg) -> dict[str, Any]:
    """Fetch every hub model and dataset of ``cfg`` that the local caches lack; return
    ``{"models": {source: where}, "datasets": {source: where}}`` with ``where`` one of
    local / cached (nothing fetched) / downloaded (files fetched now)."""
    import huggingface_hub

    from featcal.errors import SourceUnavailable
    from featcal.io.datasets import (dataset_location, download_command, hub_failure_reason, hub_offline, looks_like_path,
                                     snapshot_dir)
    from featcal.io.hub import model_location, offline_advice, remember_snapshot, required_sources

    models, data = required_sources(cfg)
    done: dict[str, Any] = {"models": {}, "datasets": {}}
    for source in dict.fromkeys(s for s, _ in models):
        kind, _problem = model_location(source)
        if kind == "local" or looks_like_path(source):
            done["models"][source] = "local"
            continue
        if hub_offline() or kind not in ("hub", "snapshot"):
            # offline the loaders read the hub cache's snapshot without the hub; a missing
            # source was reported by the availability check already
            done["models"][source] = "cached" if kind == "snapshot" else "missing"
            continue
        # online: fetch what the cache lacks (a cached snapshot may hold only a tokenizer);
        # files the cache holds are not fetched again; without a network huggingface_hub
        # answers from the cached snapshot itself
        before = _files(snapshot_dir(source, "model"))
        try:
            folder = Path(huggingface_hub.snapshot_download(repo_id=source, allow_patterns=_META + ["*.safetensors"]))
            if not any(folder.rglob("*.safetensors")):  # an older repo: PyTorch pickles only
                folder = Path(huggingface_hub.snapshot_download(repo_id=source, allow_patterns=_META + _PICKLES))
        except Exception as err:  # no network and nothing cached, a missing or gated repo
            raise SourceUnavailable(hub_failure_reason("model", source, err), offline_advice("model", source)) from err
        remember_snapshot(source, folder)
        done["models"][source] = "downloaded" if _files(folder) - before else "cached"

    wanted: dict[str, set[str | None]] = {}
    for source, config, _key in data:
        loc = dataset_location(source, config)
        if loc.kind == "hub":
            wanted.setdefault(str(source), set()).add(config)
        else:
            done["datasets"].setdefault(str(source), "local" if loc.kind in ("saved", "file", "folder") else "cached")
    for source, configs in wanted.items():
        try:
            readme = huggingface_hub.snapshot_download(repo_id=source, repo_type="dataset", allow_patterns=["README.md"])
            patterns = _dataset_patterns(Path(readme), configs)
            huggingface_hub.snapshot_download(repo_id=source, repo_type="dataset", allow_patterns=patterns)
        except Exception as err:  # noqa: BLE001
            raise SourceUnavailable(hub_failure_reason("dataset", source, err),
                                    f"Run `{download_command(source)}` on a machine with hub access.") from err
        done["datasets"][source] = "downloaded"
    return done

