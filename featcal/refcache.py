"""Reference evaluations (experts, base) computed once and reused by every later job.

In a sweep over merges, calibrators and budgets on one backbone, the experts and the base
are the same models scored on the same tasks with the same settings in every job. Their
scores are stored beside the suite cache, one small JSON file per (role, model, task,
settings), under ``<cache root>/reference_evals/``:

- **model identity**: a hash of the model's weights as evaluated (names, dtypes, shapes
  and bytes of every state-dict tensor, after the run's precision cast), so a re-downloaded
  or rebuilt checkpoint with other weights never reuses a score; a model kept on disk
  (its adapter's ``is_on_disk``) is identified by its folder instead (every file's name and size, and
  the header of each safetensors file: names, dtypes, shapes, offsets; plus modification
  times);
- **settings**: the resolved ``backbone`` config node (task pool, datasets, overrides,
  adapter options such as the attention implementation) without the task list (entries
  are per task) and without keys that only change speed (batch sizes, device, workers,
  cache folders), plus ``eval``, ``precision``, the device type, the seed,
  ``budget.split`` and the featcal / torch / transformers versions.

A job holds a file lock per entry while it evaluates, so concurrent jobs of a parallel
sweep wait and reuse instead of evaluating twice; entries are written atomically. A
job that reuses says so in its log and in ``results.json`` (``reference_cache``).
Disable with ``reference_cache=false`` (or ``FEATCAL_REFERENCE_CACHE=0``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from featcal.cache import file_lock
from featcal.utils import cache_root

log = logging.getLogger("featcal")

#: bumped when what an entry means changes (stale entries then live under other keys)
VERSION = 1
FOLDER = "reference_evals"
#: config keys (at any depth of ``backbone``) that never change a score
_SPEED_ONLY = ("tasks", "device", "num_workers", "pin_memory", "cache_dir", "train_sizes", "test_sizes", "streaming",
               "merge_dir", "merged_on_disk")


def _speed_only(key: str) -> bool:
    return key in _SPEED_ONLY or key.endswith("batch_size")


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if not _speed_only(str(k))}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _code_hash(objects: tuple) -> str:
    """A hash of the source files defining ``objects``' classes (and their bases in
    featcal): editing the evaluation code invalidates stored scores."""
    import inspect

    files = set()
    for obj in objects:
        for klass in type(obj).__mro__:
            if klass.__module__.startswith("featcal"):
                try:
                    files.add(inspect.getsourcefile(klass))
                except (TypeError, OSError):
                    pass
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(x for x in files if x):
        h.update(Path(f).name.encode() + b"|" + Path(f).read_bytes())
    return h.hexdigest()


def eval_settings(cfg: DictConfig, device: torch.device, code: tuple = ()) -> dict[str, Any]:
    """Everything besides the model and the task that a reference score depends on
    (``code``: the task pool and adapter objects whose source files count too)."""
    import transformers

    import featcal

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    ev = OmegaConf.select(cfg, "eval", default=None)
    return {
        "version": VERSION,
        "featcal": featcal.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "backbone": _strip(backbone),
        "eval": OmegaConf.to_container(ev, resolve=True) if isinstance(ev, DictConfig) else ev,
        "precision": str(cfg.precision),
        "device_type": torch.device(device).type,
        "seed": int(cfg.seed),
        "split": str(OmegaConf.select(cfg, "budget.split", default="train")),
        "code": _code_hash(code),
    }


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every state-dict tensor (name, dtype, shape, bytes): the model's identity."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":
            raise ValueError("meta tensor")
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """A checkpoint folder's identity without reading its weights: every file's relative
    name, size and modification time, and each safetensors file's header."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=20)
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        st = p.stat()
        h.update(f"{p.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        if p.suffix == ".safetensors":
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 26)))
    return h.hexdigest()


def model_identity(model: Any, backbone: Any = None) -> str | None:
    """The identity a reference score is stored under (None: not cacheable). A model kept on
    disk is identified by its folder and read settings, as its adapter (``backbone``, the
    model layer's storage API) reports them; without an adapter it is not cacheable."""
    try:
        if backbone is not None and backbone.is_on_disk(model):
            folder, settings = backbone.disk_identity(model)
            return "folder:" + folder_fingerprint(folder) + f"|{settings}"
        if isinstance(model, torch.nn.Module):
            return "weights:" + weights_hash(model)
    except Exception as err:  # noqa: BLE001 - an unhashable model is simply not cached
        log.warning("reference cache: cannot identify %s (%s: %s); evaluating it", type(model).__name__, type(err).__name__, err)
    return None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def enabled(cfg: DictConfig) -> bool:
    if os.environ.get("FEATCAL_REFERENCE_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    v = OmegaConf.select(cfg, "reference_cache", default=True)
    return bool(v)


class ReferenceCache:
    """Per-task reference scores under ``root`` (default ``<cache root>/reference_evals``)."""

    def __init__(self, settings: dict[str, Any], root: Path | None = None, enabled: bool = True, backbone: Any = None):
        self.settings = settings
        #: the model adapter of the models scored (identifies models kept on disk)
        self.backbone = backbone
        self.settings_key = _key(settings)
        self.root = Path(root) if root is not None else cache_root() / FOLDER
        self.enabled = enabled
        #: what a run did, per role: "evaluated", "reused" or "reused k/n" (+ why not cached)
        self.status: dict[str, str] = {}

    @classmethod
    def for_run(cls, cfg: DictConfig, device: torch.device, pool: Any, backbone: Any) -> "ReferenceCache":
        """The cache of a run with its task pool and model adapter (their source counts)."""
        return cls(eval_settings(cfg, device, (pool, backbone)), enabled=enabled(cfg), backbone=backbone)

    def _path(self, role: str, identity: str, task: str) -> Path:
        k = _key(self.settings_key, role, identity, task)
        return self.root / k[:2] / f"{k}.json"

    def _read(self, path: Path) -> dict | None:
        try:
            entry = json.loads(path.read_text())
            return entry["metrics"] if entry.get("settings_key") == self.settings_key else None
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as err:
            log.warning("reference cache: ignoring unreadable entry %s (%s)", path, type(err).__name__)
            return None

    def _store(self, path: Path, role: str, task: str, identity: str, metrics: dict) -> None:
        try:
            json.dumps(metrics, allow_nan=True)
        except (TypeError, ValueError):
            log.warning("reference cache: %s scores on %s are not JSON numbers; not stored", role, task)
            return
        _write_json(path, {"role": role, "task": task, "model": identity, "settings_key": self.settings_key,
                           "settings": self.settings, "metrics": metrics})

    def _say(self, role: str, reused: int, total: int, why: str | None = None) -> None:
        if why:
            self.status[role] = f"evaluated ({why})"
        elif reused == total:
            self.status[role] = "reused"
        elif reused == 0:
            self.status[role] = "evaluated"
        else:
            self.status[role] = f"reused {reused}/{total}"
        msg = f"reference cache: {role} {self.status[role]}" + (f" [{self.root}]" if reused else "")
        log.info(msg)
        if reused:
            print(msg)

    # ---- the two reference roles -------------------------------------------------
    def experts(self, experts: list, tasks: list[str], evaluate: Callable[[int], dict]) -> dict:
        """``{task: metrics}`` of expert i on task i; ``evaluate(i)`` scores one expert
        (returns ``{task_i: metrics}``) when its entry is missing."""
        out: dict = {}
        reused = 0
        why = None if self.enabled else "disabled"
        for i, expert in enumerate(experts):
            identity = model_identity(expert, self.backbone) if self.enabled else None
            if identity is None:
                why = why or "model not identifiable"
                out.update(evaluate(i))
                continue
            path = self._path("expert", identity, tasks[i])
            with file_lock(path.with_suffix(".lock")):  # a concurrent job evaluating it: wait, then reuse
                hit = self._read(path)
                if hit is not None:
                    out[tasks[i]] = hit
                    reused += 1
                    continue
                got = evaluate(i)
                self._store(path, "expert", tasks[i], identity, copy.deepcopy(got[tasks[i]]))
                out.update(got)
        self._say("experts", reused, len(experts), why)
        return out

    def base(self, base: Any, tasks: list[str], evaluate: Callable[[list[int] | None], dict]) -> dict:
        """``{task: metrics}`` of the base on every task; ``evaluate(only)`` scores the
        tasks not stored (``only=None``: all of them, the uncached call)."""
        identity = model_identity(base, self.backbone) if self.enabled else None
        if identity is None:
            self._say("base", 0, len(tasks), "disabled" if not self.enabled else "model not identifiable")
            return evaluate(None)
        paths = {t: self._path("base", identity, t) for t in tasks}
        with file_lock(self.root / "locks" / f"base-{_key(self.settings_key, identity)}.lock"):
            found = {t: self._read(p) for t, p in paths.items()}
            missing = [i for i, t in enumerate(tasks) if found[t] is None]
            got = evaluate(None if len(missing) == len(tasks) else missing) if missing else {}
            for i in missing:
                self._store(paths[tasks[i]], "base", tasks[i], identity, copy.deepcopy(got[tasks[i]]))
        self._say("base", len(tasks) - len(missing), len(tasks))
        return {t: (found[t] if found[t] is not None else got[t]) for t in tasks}
