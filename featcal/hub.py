"""Resolving model and dataset sources: a local folder, or a Hugging Face hub id.

Hub access is optional. Every failure to reach a model or dataset raises
``SourceUnavailable`` naming it and saying how to run offline.
"""
from __future__ import annotations

import os
from pathlib import Path


class SourceUnavailable(RuntimeError):
    """A model or dataset could not be found locally nor fetched from the hub."""


def offline_hint(kind: str, name: str) -> str:
    cmd = "hf download" if kind == "model" else "hf download --repo-type dataset"
    return (
        f"could not load {kind} '{name}'. It is neither a local folder nor reachable on the "
        f"Hugging Face hub from here. To run offline: on a machine with hub access run "
        f"`{cmd} {name}` (fills the cache under $HF_HOME), copy that cache here and set "
        f"HF_HOME to it with HF_HUB_OFFLINE=1; or pass a local folder path instead of the hub id."
    )


def resolve_model_dir(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder holding the model files for ``source`` (a folder or a hub id)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.is_absolute() or str(source).startswith((".", "~")):
        raise SourceUnavailable(f"model folder '{source}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=str(source),
            allow_patterns=allow_patterns
            or ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.pt", "*.pth"],
        )
    except Exception as err:  # network errors, missing repos, offline mode
        raise SourceUnavailable(offline_hint("model", str(source)) + f" (cause: {type(err).__name__}: {err})") from err
    return Path(local)


def load_raw_state_dict(folder: Path) -> dict:
    """Read a checkpoint folder's weights: safetensors (sharded or not) or pytorch .bin."""
    import torch

    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        sd: dict = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if files:
        sd = {}
        for f in files:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
        return sd
    raise SourceUnavailable(f"no weights (*.safetensors or *.bin) in model folder '{folder}'")
