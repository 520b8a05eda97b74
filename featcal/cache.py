"""Built-once, verified caches (the embedded suites): one folder per spec hash, a
checksum manifest written last, builds into a temporary folder renamed into place,
builders serialised by a lock file, a corrupt or partial folder rebuilt with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

from featcal.utils import cache_root

MANIFEST = "manifest.json"

__all__ = [
    "MANIFEST", "SuiteSpec", "cache_root", "ensure_folder", "ensure_suite", "file_lock", "manifest_problem",
    "read_manifest", "sha256_of", "write_manifest",
]


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive inter-process (and inter-thread) lock held while the block runs."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock object is per call, so threads of one process
    # exclude each other through the OS lock like separate processes do
    with FileLock(str(path), thread_local=False):
        yield


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(out: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under ``out`` and write ``fields`` + ``files`` as the manifest
    (atomically, last: a folder without a manifest is an unfinished build)."""
    out = Path(out)
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(out).as_posix()] = {"sha256": sha256_of(p), "size": p.stat().st_size}
    manifest = {**fields, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def manifest_problem(folder: Path, spec_hash: str, build_version: int, required: Iterable[str]) -> str | None:
    """``None`` if ``folder`` holds a complete build (manifest of this spec hash and build
    version, every required file listed, every listed file present with its size and
    checksum), else the reason it does not."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if manifest.get("spec_hash") != spec_hash or manifest.get("build_version") != build_version:
            return "manifest belongs to another spec"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({type(err).__name__})"
    if not isinstance(files, dict):
        return "unreadable manifest (files)"
    missing = [f for f in required if f not in files]
    if missing:
        return f"manifest does not list {missing[:3]}"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        try:
            if p.stat().st_size != int(meta["size"]):
                return f"size mismatch for {rel}"
            if sha256_of(p) != meta["sha256"]:
                return f"checksum mismatch for {rel}"
        except (KeyError, TypeError, ValueError):
            return f"unreadable manifest entry for {rel}"
    return None


def ensure_folder(
    folder: Path, problem: Callable[[Path], str | None], build: Callable[[Path], Any], label: str, stacklevel: int = 3
) -> Path:
    """``folder`` once ``problem(folder)`` is None, building it with ``build(tmp)`` into a
    temporary sibling renamed into place if needed (under a lock file; a corrupt or partial
    folder is rebuilt with a warning). Idempotent and safe for concurrent callers.

    ``stacklevel``: the rebuild warning's, counted from here (3: the caller of the function
    that called this one, i.e. the user of a one-level wrapper)."""
    from featcal.errors import CorruptCache

    folder = Path(folder)
    first = problem(folder)
    if first is None:
        return folder
    try:
        lock = file_lock(folder.parent / f".{folder.name}.lock")
        lock.__enter__()
    except OSError as err:  # a read-only cache, or a cache path under a file
        raise cache_fault(folder, label, first, err) from err
    try:
        remove_stale_builds(folder)  # .tmp-*/.trash-* of builders killed mid-way (we hold the lock)
        reason = problem(folder)  # another process may have built it meanwhile
        if reason is None:
            return folder
        if reason != "missing":
            warnings.warn(f"{label} cache {folder} is invalid ({reason}); rebuilding it", RuntimeWarning, stacklevel=stacklevel)
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                build(tmp)
            except OSError as err:
                if err.errno in _UNWRITABLE:
                    raise cache_fault(folder, label, reason, err) from err
                raise
            if folder.exists():
                trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
                os.replace(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.__exit__(None, None, None)
    reason = problem(folder)
    if reason is not None:
        raise CorruptCache(
            f"the {label} built at {folder} failed validation ({reason})",
            f"Delete {folder} and run again; set FEATCAL_CACHE to a folder on a healthy disk if it persists.",
        )
    return folder


_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST)


def cache_fault(folder: Path, label: str, reason: str, err: OSError):
    """The :class:`featcal.errors.CorruptCache` for a cache that cannot be (re)built where it
    is: read-only, full, or its path runs through a file. Names FEATCAL_CACHE."""
    from featcal.errors import CorruptCache

    folder = Path(folder)
    probe = folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if (probe.exists() and not probe.is_dir()) or err.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"{probe if not probe.is_dir() else err.filename} is a file, not a folder"
    else:
        why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is exhausted"}.get(err.errno, "the folder is not writable") + \
            f" ({err.strerror or type(err).__name__}: {err.filename or folder.parent})"
    state = "is not built yet" if reason == "missing" else f"is corrupt ({reason})"
    return CorruptCache(
        f"the {label} cache at {folder} {state} and cannot be {'built' if reason == 'missing' else 'rebuilt'} there: {why}",
        "Point FEATCAL_CACHE (or backbone.cache_dir) at a writable folder with free space"
        + ("" if reason == "missing" else f", or make {folder.parent} writable so the build is redone"),
    )


def remove_stale_builds(folder: Path) -> list[Path]:
    """Remove ``.tmp-<name>-*`` / ``.trash-<name>-*`` siblings of ``folder``: called while
    holding the build lock, so their builders are gone (killed mid-way). Returns them."""
    folder = Path(folder)
    removed = []
    for pattern in (f".tmp-{folder.name}-*", f".trash-{folder.name}-*"):
        for p in folder.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


class SuiteSpec:
    """What a built suite's frozen-dataclass spec shares: construction from a config
    mapping, a plain dict, the hash that names its cache folder, the folder's location
    and layout, and its validation. Subclasses set these as class attributes (without
    type annotations: annotated names would become dataclass fields):

    * ``SUITE``: the name in spec errors ("unknown embedded spec key ...");
    * ``CACHE_DIR``: the cache sub-folder, ``<cache root>/<CACHE_DIR>/<spec hash>/``
      (changing it orphans existing caches);
    * ``LABEL``: what messages call a build ("the embedded benchmark built at ...");
    * ``BUILD_VERSION``: bumped when the build procedure changes, so old caches live
      under another hash;
    * ``MODEL_FILES``, ``DATA_SUFFIX``, ``EXTRA_FILES``: the build's layout (see
      ``required_files``).
    """

    SUITE = "suite"
    CACHE_DIR = "suite"
    LABEL = "suite"
    BUILD_VERSION = 0
    #: the files of each saved model folder (``base/`` and ``experts/<task>/``), a tuple
    MODEL_FILES = ()
    #: each task's data file: ``data/<task><DATA_SUFFIX>``
    DATA_SUFFIX = ""
    #: further files of the whole suite, relative to the folder
    EXTRA_FILES = ()

    @classmethod
    def from_config(cls, spec: Any = None, **overrides: Any):
        """A spec from a mapping (e.g. a Hydra node) or a spec, plus keyword overrides;
        unknown keys fail."""
        import dataclasses

        data = dataclasses.asdict(spec) if isinstance(spec, cls) else dict(spec or {})
        data.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.SUITE} spec key(s) {unknown}; allowed: {sorted(names)}")
        if "tasks" in data:
            data["tasks"] = tuple(data["tasks"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        d = dataclasses.asdict(self)
        d["tasks"] = list(d["tasks"])
        return d

    def spec_hash(self) -> str:
        payload = json.dumps({"build_version": self.BUILD_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _check_tasks(self, known: Collection[str]) -> None:
        """Store ``tasks`` as a tuple of names and check they are distinct names in ``known``
        (a subclass's ``__post_init__`` calls this first)."""
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))  # frozen dataclass
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown {self.SUITE} task(s) {unknown}; allowed: {sorted(known)}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of unique names, got {list(self.tasks)}")

    def cache_path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """The build's folder under ``cache_dir`` (default: ``cache_root()``); nothing is created."""
        root = Path(cache_dir).expanduser() if cache_dir else cache_root()
        return root / self.CACHE_DIR / self.spec_hash()

    def required_files(self) -> list[str]:
        """The files a complete build's manifest must list: ``base/`` then ``EXTRA_FILES``,
        then per task its expert folder and its data file. Override for another layout.
        (The order only shows in the "manifest does not list" reason.)"""
        files = [f"base/{f}" for f in self.MODEL_FILES] + list(self.EXTRA_FILES)
        for t in self.tasks:
            files += [f"experts/{t}/{f}" for f in self.MODEL_FILES] + [f"data/{t}{self.DATA_SUFFIX}"]
        return files

    def cache_problem(self, folder: Path) -> str | None:
        """``None`` if ``folder`` holds a complete build of this spec, else the reason it does not."""
        return manifest_problem(folder, self.spec_hash(), self.BUILD_VERSION, self.required_files())


def ensure_suite(spec: SuiteSpec, cache_dir: str | os.PathLike | None, build: Callable[[Path], Any]) -> Path:
    """The cache folder of a complete, verified build of ``spec`` under ``cache_dir``,
    made with ``build(tmp)`` if needed (see ``ensure_folder``: idempotent, a partial or
    corrupt folder is rebuilt with a warning, builders are serialised by a lock file)."""
    # stacklevel 4: the warning points at whoever called the suite's ensure_built
    return ensure_folder(spec.cache_path(cache_dir), spec.cache_problem, build, spec.LABEL, stacklevel=4)
