"""One dataset resolver for every task pool (CLIP, GLUE, MergeBench calibration data).

A dataset source (a hub id like ``nyu-mll/glue`` or a local path) and an optional
config name resolve, in this order, to:

1. a **local path**: a ``save_to_disk`` folder (or ``<folder>/<config>`` holding one),
   a single data file (parquet / arrow / json / jsonl / csv), or a folder of data files
   — which includes a hub snapshot folder (``hf download --repo-type dataset ... --local-dir``):
   its README ``configs:`` and data files are read by datasets' packaged builders;
2. the **prepared datasets cache** an online ``datasets.load_dataset`` leaves behind
   (``$HF_DATASETS_CACHE/<org>___<name>/<config>/...``), read with hub access forced off;
3. the **hub snapshot in the hub cache** that ``hf download --repo-type dataset <id>``
   leaves (``$HF_HUB_CACHE/datasets--<org>--<name>/snapshots/<commit>``, via
   ``refs/main``), read as a local folder: no network;
4. the **hub**, when hub access is on.

``dataset_location`` says where a source would come from without loading anything (the
availability check before any model loads uses it, so its message and the loader agree);
``load_dataset_split`` loads one split. Paths of the caches are read from the environment
at call time (``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE`` / ``HF_HOME``), like the hub libraries
read them at import.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from featcal.errors import ConfigError, SourceUnavailable

#: data-file suffix -> datasets' packaged builder
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_TRUE = ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------
# where things live


def hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")))


def hub_cache_dir() -> Path:
    """``$HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expanduser(env)) if env else hf_home() / "hub"


def datasets_cache_dir() -> Path:
    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(os.path.expanduser(env)) if env else hf_home() / "datasets"


def hub_offline() -> bool:
    """Hub access is off (any of the hub / datasets / transformers offline variables)."""
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        import huggingface_hub.constants as c

        return bool(getattr(c, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover
        return False


def _hf_home_text() -> str:
    """``$HF_HOME`` as set (not expanded), for messages."""
    return os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")


def hub_failure_reason(kind: str, name: str, err: BaseException | None = None) -> str:
    """Why a hub id could not be loaded, in words (the hub's own exception stays chained)."""
    cause = type(err).__name__ if err is not None else ""
    where = f"HF_HOME={_hf_home_text()}"
    if hub_offline():
        return f"{kind} '{name}' is not in the local Hugging Face cache ({where}) and hub access is off (HF_HUB_OFFLINE=1)"
    if cause in ("RepositoryNotFoundError", "GatedRepoError", "DisabledRepoError", "RevisionNotFoundError", "DatasetNotFoundError"):
        what = {"GatedRepoError": "is gated (accept its terms on the hub and log in with `hf auth login`)",
                "DisabledRepoError": "is disabled on the hub",
                "RevisionNotFoundError": "has no such revision on the hub"}.get(cause, "does not exist on the Hugging Face hub (check the spelling)")
        return f"{kind} '{name}' {what}"
    return f"{kind} '{name}' is neither a local folder nor in the Hugging Face cache ({where}), and the hub could not be reached"


def looks_like_path(source: str) -> bool:
    s = str(source)
    return os.path.isabs(os.path.expanduser(s)) or s.startswith((".", "~")) or s.count("/") > 1 or "\\" in s or s.endswith("/")


def snapshot_dir(repo_id: str, repo_type: str = "dataset", revision: str = "main") -> Path | None:
    """The snapshot folder ``hf download`` left for ``repo_id`` in the hub cache, or None.

    ``refs/<revision>`` names the commit; without refs (a copied cache missing them), the
    only snapshot, if there is exactly one."""
    if looks_like_path(repo_id) or repo_id.count("/") > 1:
        return None
    repo = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        cand = snaps / commit
        return cand if cand.is_dir() and any(cand.iterdir()) else None
    if (snaps / revision).is_dir():  # a commit hash given as revision
        return snaps / revision
    found = [p for p in snaps.iterdir() if p.is_dir() and any(p.iterdir())]
    return found[0] if len(found) == 1 else None


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def card_configs(folder: Path) -> dict[str, Any] | None:
    """The README ``configs:`` of a dataset folder: {config_name: data_files}, None without any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not configs:
        return None
    return {str(c.get("config_name", "default")): c.get("data_files") for c in configs if isinstance(c, dict)}


def _data_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in BUILDERS and ".cache" not in p.parts and ".git" not in p.parts]


# ---------------------------------------------------------------------------
# locating


@dataclass
class Location:
    """Where a dataset source resolves to. ``kind``: saved (save_to_disk folder), file,
    folder (data files / hub snapshot folder given as a path), prepared (datasets cache),
    snapshot (hub cache), hub (to be downloaded), missing."""

    kind: str
    path: Path | None = None
    problem: str = ""  # for kind == "missing": why, in words

    @property
    def available(self) -> bool:
        return self.kind != "missing"


def _prepared_dir(repo_id: str, config: str | None) -> Path | None:
    """The prepared Arrow cache of an online ``load_dataset(repo_id, config)``, or None."""
    if "/" not in repo_id:
        return None
    root = datasets_cache_dir() / repo_id.replace("/", "___")
    sub = root / (config or "default")
    if sub.is_dir() and any(sub.rglob("dataset_info.json")):
        return sub
    return None


def _check_config(folder: Path, config: str | None) -> str:
    """'' when ``config`` can be read from the data folder, else why not."""
    configs = card_configs(folder)
    if configs is not None:
        if config and config not in configs:
            return f"its README names configs {sorted(configs)}, not '{config}'"
        return ""
    if not _data_files(folder):
        return "it holds no save_to_disk dataset and no data files (*.parquet, *.arrow, *.json, *.jsonl, *.csv)"
    return ""


def dataset_location(source: str, config: str | None = None) -> Location:
    """Where ``source`` (with ``config``) would be loaded from; nothing is loaded."""
    src = str(source)
    path = Path(os.path.expanduser(src))
    if path.exists():
        if path.is_file():
            if path.suffix not in BUILDERS:
                return Location("missing", path, f"'{src}' is a {path.suffix or 'suffix-less'} file, not a data file ({', '.join(sorted(BUILDERS))})")
            return Location("file", path)
        for cand in ([path / config] if config else []) + [path]:
            if cand.is_dir() and is_saved_dataset(cand):
                return Location("saved", cand)
        problem = _check_config(path, config)
        return Location("missing", path, f"folder '{src}': {problem}") if problem else Location("folder", path)
    if looks_like_path(src):
        return Location("missing", path, f"folder '{src}' does not exist")
    prepared = _prepared_dir(src, config)
    if prepared is not None:
        return Location("prepared", prepared)
    snap = snapshot_dir(src, "dataset")
    if snap is not None:
        problem = _check_config(snap, config)
        if not problem:
            return Location("snapshot", snap)
        if hub_offline():
            return Location("missing", snap, f"the hub snapshot of '{src}' in {hub_cache_dir()}: {problem}")
    if hub_offline():
        return Location("missing", None, f"dataset '{src}'" + (f" (config '{config}')" if config else "")
                        + f" is not in the hub cache ({hub_cache_dir()}) nor in the prepared datasets cache "
                        f"({datasets_cache_dir()}), and hub access is off")
    return Location("hub")


def download_command(source: str, repo_type: str = "dataset") -> str:
    return f"hf download --repo-type dataset {source}" if repo_type == "dataset" else f"hf download {source}"


def offline_env_hint() -> str:
    return (
        "on a machine with hub access run the command(s) above (they fill $HF_HOME/hub), copy that "
        f"folder here (HF_HOME is {hf_home()} now, or set HF_HUB_CACHE to the copied hub folder), "
        "and run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; or pass local folders instead of hub ids"
    )


# ---------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def forced_offline() -> Iterator[None]:
    """Hub access off inside (datasets and huggingface_hub read these at call time)."""
    import datasets.config as dc

    try:
        import huggingface_hub.constants as hc
    except ImportError:  # pragma: no cover
        hc = None
    saved = (dc.HF_HUB_OFFLINE, getattr(hc, "HF_HUB_OFFLINE", None))
    dc.HF_HUB_OFFLINE = True
    if hc is not None:
        hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE = saved[0]
        if hc is not None:
            hc.HF_HUB_OFFLINE = saved[1]


def _pick_split(ds, split: str, source: str, where: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"dataset '{source}' ({where}) has no split '{split}'; it has {list(ds)}",
                              "Name the split in the task pool's config (train/test split keys).")
        return ds[split]
    return ds


def load_dataset_split(source: str, split: str, config: str | None = None, where: str = "", key: str = ""):
    """One split of ``source`` (see the module docstring for the order tried).

    ``where`` (e.g. "task 'cola'") and ``key`` (the config key that names the source) only
    serve the error messages."""
    import datasets

    src = str(source)
    ctx = ", ".join(x for x in (where, f"config '{config}'" if config else "", key) if x)
    loc = dataset_location(src, config)
    if not loc.available:
        hint = (f"Check the path ({key})." if looks_like_path(src) or Path(os.path.expanduser(src)).exists()
                else f"Run `{download_command(src)}` {offline_env_hint()}.")
        raise SourceUnavailable(f"dataset not available: {loc.problem} ({ctx})", hint)
    cache_dir = str(datasets_cache_dir())
    try:
        if loc.kind == "saved":
            return _pick_split(datasets.load_from_disk(str(loc.path)), split, src, ctx)
        if loc.kind == "file":
            return datasets.load_dataset(BUILDERS[loc.path.suffix], data_files={split: str(loc.path)}, split=split, cache_dir=cache_dir)
        if loc.kind in ("folder", "snapshot"):
            args = (str(loc.path), config) if config and card_configs(loc.path) is not None else (str(loc.path),)
            with forced_offline():
                return datasets.load_dataset(*args, split=split, cache_dir=cache_dir)
        if loc.kind == "prepared":
            with forced_offline():
                return datasets.load_dataset(src, config, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(src, config, split=split, cache_dir=cache_dir)
    except (ConfigError, SourceUnavailable):
        raise
    except ValueError as err:
        if "split" in str(err).lower() or "Unknown split" in str(err):
            raise ConfigError(f"dataset '{src}' ({ctx}) has no split '{split}' ({err})",
                              "Name the split in the task pool's config (train/test split keys).") from err
        raise SourceUnavailable(f"could not read dataset '{src}' from {loc.kind} {loc.path or ''} ({type(err).__name__}: {err}; {ctx})",
                                "The files are incomplete or in another layout: download or save them again.") from err
    except Exception as err:  # noqa: BLE001 - hub, connection, corrupt files
        if loc.kind == "hub":
            raise SourceUnavailable(hub_failure_reason("dataset", src, err) + f" ({ctx})",
                                    f"Run `{download_command(src)}` {offline_env_hint()}.") from err
        raise SourceUnavailable(f"could not read dataset '{src}' from {loc.kind} {loc.path} ({type(err).__name__}: {err}; {ctx})",
                                "The files are incomplete or corrupt: download or save them again.") from err


@contextlib.contextmanager
def hub_cache_aware_load_dataset() -> Iterator[None]:
    """Inside, ``datasets.load_dataset(<hub id>, <config>, ...)`` called by other libraries
    (lm-eval's tasks) reads the prepared datasets cache or the hub snapshot in the hub cache
    when one holds the dataset (see ``dataset_location``), offline; anything else goes to the
    original function unchanged."""
    import datasets

    original = datasets.load_dataset

    def load_dataset(path=None, name=None, *args, **kwargs):
        if isinstance(path, str) and not args and not kwargs.get("data_files") and not kwargs.get("data_dir") \
                and not looks_like_path(path) and path.count("/") == 1 and not Path(path).exists():
            loc = dataset_location(path, name)
            if loc.kind in ("prepared", "snapshot"):
                kw = {k: v for k, v in kwargs.items() if k not in ("trust_remote_code", "revision")}
                kw.setdefault("cache_dir", str(datasets_cache_dir()))
                with forced_offline():
                    if loc.kind == "prepared":
                        return original(path, name, **kw)
                    if name and card_configs(loc.path) is not None:
                        return original(str(loc.path), name, **kw)
                    return original(str(loc.path), **kw)
        return original(path, name, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original
