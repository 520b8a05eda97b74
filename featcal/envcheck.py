"""Checks of the machine a run is about to use, after its config is valid and before
anything loads: the device exists, the cache and run folders are writable folders, and
the run folder's disk has room for the outputs. Each problem is one sentence naming the
fix; all are reported at once as a :class:`featcal.errors.ConfigError`."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from featcal.utils import free_mib

#: room the run folder needs: results.json/.csv, table.md, drift.csv, run.log, failed.json
MIN_FREE_MIB = 8.0


def device_problem(device: str) -> str | None:
    """Why ``device`` (a validated ``device=`` value) cannot be used here, or None."""
    import torch

    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = "this PyTorch was built without CUDA" if not built else "no CUDA device or driver was found"
            return f"device={device}: CUDA is not available here ({why}); use device=cpu (or device=auto, which picks CUDA when there is one)"
        if ":" in device:
            index, count = int(device.split(":", 1)[1]), torch.cuda.device_count()
            if index >= count:
                return (f"device={device}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s) here "
                        f"(cuda:0 ... cuda:{count - 1}); use one of them, or check CUDA_VISIBLE_DEVICES")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "device=mps: Apple's MPS is not available here; use device=cpu (or device=auto)"
    return None


def _writable_dir(path: Path) -> str | None:
    """None if ``path`` is (or can be created as) a folder we can write into, else why not."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not p.exists():
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{p} does not exist and cannot be created ({probe} is not writable)"
        return None
    try:  # os.access misses read-only mounts and ACLs: try it
        fd, tmp = tempfile.mkstemp(prefix=".featcal-probe-", dir=str(p))
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        what = "read-only file system" if err.errno == errno.EROFS else (err.strerror or type(err).__name__)
        return f"{p} is not writable ({what})"
    return None


def cache_dir_of(cfg: DictConfig) -> tuple[Path, str] | None:
    """(cache folder, the setting that names it) of a backbone with an embedded cache, else None."""
    if OmegaConf.select(cfg, "backbone.cache_dir", default="__absent__") == "__absent__":
        return None  # hub backbones: Hugging Face's cache, checked when loading
    from featcal.utils import cache_root

    explicit = OmegaConf.select(cfg, "backbone.cache_dir", default=None)
    if explicit:
        return Path(str(explicit)).expanduser(), f"backbone.cache_dir={explicit}"
    env = os.environ.get("FEATCAL_CACHE")
    return cache_root(), (f"FEATCAL_CACHE={env}" if env else f"the default cache folder {cache_root()} (set FEATCAL_CACHE)")


def environment_problems(cfg: DictConfig, out_dir: str | os.PathLike | None) -> list[str]:
    problems: list[str] = []
    device = OmegaConf.select(cfg, "device", default="auto")
    if device not in (None, "auto", "cpu"):
        why = device_problem(str(device))
        if why:
            problems.append(why)
    cache = cache_dir_of(cfg)
    if cache is not None:
        folder, setting = cache
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            problems.append(f"the cache folder {folder} ({setting}) is under a file, {probe}: point FEATCAL_CACHE "
                            f"(or backbone.cache_dir) at a folder")
        elif not folder.exists() and not os.access(probe, os.W_OK | os.X_OK):
            problems.append(f"the cache folder {folder} ({setting}) does not exist and cannot be created ({probe} is not "
                            f"writable): point FEATCAL_CACHE (or backbone.cache_dir) at a writable folder")
        # an existing read-only cache is fine if it is complete (featcal/cache.py says otherwise)
    if out_dir is not None:
        out = Path(out_dir)
        why = _writable_dir(out)
        if why:
            problems.append(f"the run folder {why}: set hydra.run.dir=<folder> (hydra.sweep.dir with -m) to a writable folder")
        else:
            free = free_mib(out)
            if free < MIN_FREE_MIB:
                problems.append(f"the run folder {out} has {free:.1f} MiB free, the outputs need about {MIN_FREE_MIB:.0f} MiB: "
                                f"free some space or set hydra.run.dir=<folder> (hydra.sweep.dir with -m) on another disk")
    return problems


def check_environment(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> None:
    """Raise :class:`featcal.errors.ConfigError` listing every environment problem."""
    problems = environment_problems(cfg, out_dir)
    if problems:
        from featcal.errors import ConfigError

        raise ConfigError("this machine cannot run this configuration:\n  - " + "\n  - ".join(problems))
