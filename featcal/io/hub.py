"""Resolving model and dataset sources: a local folder, or a Hugging Face hub id.

Hub access is optional. Every failure to reach or read a model or dataset raises
``featcal.errors.SourceUnavailable`` naming it and saying
how to run offline; the hub's own exception is chained, not printed.
"""
from __future__ import annotations

import os
from pathlib import Path

from featcal.errors import SourceUnavailable
from featcal.io.datasets import (
    dataset_location,
    download_command,
    hub_cache_dir,
    hub_failure_reason,
    hub_offline,
    looks_like_path,
    offline_env_hint,
    snapshot_dir,
)


def offline_hint(kind: str, name: str) -> str:
    """A whole message for a hub model or dataset that cannot be loaded here (kept for
    callers that build ``SourceUnavailable(offline_hint(...))``; new code passes
    :func:`hub_failure_reason` and :func:`offline_advice` as reason and hint)."""
    return f"could not load {kind} '{name}': it is neither a local folder nor reachable on the Hugging Face hub from here. " + offline_advice(kind, name)


def offline_advice(kind: str, name: str) -> str:
    """What to do when a hub model or dataset cannot be loaded here."""
    cmd = "hf download" if kind == "model" else "hf download --repo-type dataset"
    return (
        f"To run offline: on a machine with hub access run `{cmd} {name}` (fills the cache under "
        f"$HF_HOME), copy that cache here and set HF_HOME to it with HF_HUB_OFFLINE=1; or pass a "
        f"local folder path instead of the hub id."
    )


#: hub id -> its snapshot folder, fetched in the run's prepare stage (featcal.prefetch)
_PREFETCHED: dict[str, Path] = {}


def remember_snapshot(source: str, folder: Path) -> None:
    """``resolve_model_dir(source)`` answers ``folder`` from now on in this process, without
    asking the hub (``featcal.prefetch`` fetched every file a loader reads into it)."""
    _PREFETCHED[str(source)] = Path(folder)


def resolve_model_dir(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder holding the model files for ``source`` (a folder or a hub id)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    fetched = _PREFETCHED.get(str(source))
    if fetched is not None and fetched.is_dir():
        return fetched
    if path.exists():
        raise SourceUnavailable(f"model source '{source}' is a file, not a folder", "Pass the folder holding config.json and the weights.")
    if looks_like_path(str(source)):
        raise SourceUnavailable(
            f"model folder '{source}' does not exist",
            "Check the path (relative paths are resolved from the current directory), or give a hub id like owner/name.",
        )
    if hub_offline():  # the snapshot `hf download` left in the hub cache ($HF_HUB_CACHE read now, not at import)
        snap = snapshot_dir(str(source), "model")
        if snap is not None:
            return snap
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=str(source),
            allow_patterns=allow_patterns
            or ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.pt", "*.pth"],
        )
    except Exception as err:  # network errors, missing repos, offline mode
        if type(err).__name__ == "HFValidationError":
            raise SourceUnavailable(
                f"model source '{source}' is neither an existing folder nor a valid hub id",
                "Check the path, or give a hub id like owner/name.",
            ) from err
        raise SourceUnavailable(hub_failure_reason("model", str(source), err), offline_advice("model", str(source))) from err
    return Path(local)


def _unreadable(file: Path, source: str | None, err: BaseException) -> SourceUnavailable:
    name = f" of model '{source}'" if source and str(source) != str(file.parent) else ""
    hub = source and not looks_like_path(str(source)) and not Path(str(source)).exists()
    redo = (f"Delete it and download it again (`hf download {source}`)" if hub
            else "Save or copy the checkpoint again (an interrupted download or copy leaves a short file)")
    return SourceUnavailable(
        f"weights file '{file}'{name} cannot be read: it is truncated or corrupt ({type(err).__name__})", redo + "."
    )


def load_raw_state_dict(folder: Path, source: str | None = None) -> dict:
    """Read a checkpoint folder's weights: safetensors (sharded or not) or pytorch .bin.

    ``source`` (the hub id or path the user gave) only serves the error messages.
    """
    import torch

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        sd: dict = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except Exception as err:  # SafetensorError (truncated header/data), OSError
                raise _unreadable(f, source, err) from err
        return sd
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if files:
        sd = {}
        for f in files:
            try:
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
            except Exception as err:  # truncated zip, unpickling errors
                raise _unreadable(f, source, err) from err
        return sd
    raise SourceUnavailable(
        f"no weights (*.safetensors or *.bin) in model folder '{folder}'" + (f" for '{source}'" if source and str(source) != str(folder) else ""),
        "Point the config at the folder that holds the checkpoint's weights and config.json.",
    )


# ---------------------------------------------------------------------------
# availability of every model and dataset, before the first model loads


def model_location(source: str) -> tuple[str, str]:
    """(kind, problem) for a model source: kind local | snapshot | hub | missing."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return "local", ""
    if path.exists():
        return "missing", f"model source '{source}' is a file, not a folder"
    if looks_like_path(str(source)):
        return "missing", f"model folder '{source}' does not exist"
    if snapshot_dir(str(source), "model") is not None:
        return "snapshot", ""
    if hub_offline():
        return "missing", f"model '{source}' is not in the hub cache ({hub_cache_dir()}) and hub access is off"
    return "hub", ""


def _locate(target: str):
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception:  # noqa: BLE001 - a bad _target_ is reported when the run builds it
        return None


def required_sources(cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str | None, str]]]:
    """([(model source, config key)], [(dataset source, config name, config key)]) that the
    backbone adapter and task pool of ``cfg`` will load. Classes declare them: adapters and
    pools with ``model_source_keys`` (node keys holding a model id/folder or a mapping of
    them), pools with a ``dataset_sources(node)`` classmethod."""
    from omegaconf import OmegaConf

    models: list[tuple[str, str]] = []
    data: list[tuple[str, str | None, str]] = []
    backbone = cfg.get("backbone") if hasattr(cfg, "get") else None
    if backbone is None:
        return models, data
    for part in ("adapter", "taskpool"):
        node = backbone.get(part)
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
        cls = _locate(str(node.get("_target_", "")))
        if cls is None:
            continue
        for key in getattr(cls, "model_source_keys", ()):
            value = node.get(key)
            if isinstance(value, dict):  # per task: only the tasks the run uses
                used = node.get("tasks")
                models += [(str(v), f"backbone.{part}.{key}.{k}") for k, v in value.items() if v and (not used or k in used)]
            elif isinstance(value, (list, tuple)):
                models += [(str(v), f"backbone.{part}.{key}[{i}]") for i, v in enumerate(value) if v]
            elif value:
                models.append((str(value), f"backbone.{part}.{key}"))
        if hasattr(cls, "dataset_sources"):
            data += list(cls.dataset_sources(node))
    return models, data


def class_hooks(cfg, name: str) -> list:
    """The classmethod ``name(node)`` of the backbone adapter and task pool of ``cfg`` where
    they define one, bound to their config nodes (``evaluation_dataset_sources``: datasets
    read only to evaluate; ``check_resources``: other things a run needs, raising if missing)."""
    from functools import partial

    from omegaconf import OmegaConf

    hooks = []
    backbone = cfg.get("backbone") if hasattr(cfg, "get") else None
    for part in ("adapter", "taskpool"):
        node = backbone.get(part) if backbone is not None else None
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
        cls = _locate(str(node.get("_target_", "")))
        if cls is not None and hasattr(cls, name):
            hooks.append(partial(getattr(cls, name), node))
    return hooks


def check_sources_available(cfg) -> None:
    """Raise one ``SourceUnavailable`` listing every model and dataset of ``cfg`` that cannot
    be found (offline: neither a local folder nor in the caches), with the commands that
    fetch them. Nothing is loaded. Online, sources not found locally are left to the hub."""
    models, data = required_sources(cfg)
    for hook in class_hooks(cfg, "evaluation_dataset_sources"):  # e.g. lm-eval tasks' datasets
        data += list(hook())
    lines, commands = [], []
    model_keys: dict[str, list[str]] = {}
    for source, key in models:  # one line per model, naming every key that uses it
        model_keys.setdefault(source, []).append(key)
    for source, keys in model_keys.items():
        kind, problem = model_location(source)
        if kind == "missing":
            lines.append(f"{problem} ({', '.join(keys)})")
            if not looks_like_path(source) and not Path(os.path.expanduser(source)).exists():
                commands.append(download_command(source, "model"))
    for source, config, key in dict.fromkeys(data):
        loc = dataset_location(source, config)
        if not loc.available:
            lines.append(f"{loc.problem} ({key})")
            if not looks_like_path(source) and not Path(os.path.expanduser(source)).exists():
                commands.append(download_command(source, "dataset"))
    if not lines:
        for check in class_hooks(cfg, "check_resources"):  # e.g. lm-eval task names, nltk data: one message each
            check()
        return
    commands = list(dict.fromkeys(commands))
    reason = f"{len(lines)} model/dataset source(s) not available here:\n  - " + "\n  - ".join(lines) + "."
    gated = " Gated repos (meta-llama/*, google/gemma-*): accept the licence on the hub and `hf auth login` before downloading."
    hint = ("\nTo fetch them:\n    " + "\n    ".join(commands) + "\n" + offline_env_hint()[0].upper() + offline_env_hint()[1:] + "."
            + (gated if any(c.split()[-1].startswith(("meta-llama/", "google/gemma")) for c in commands) else "")
            if commands else "Fix the paths above.")
    raise SourceUnavailable(reason, hint)
