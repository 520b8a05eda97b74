"""Resumable runs and sweeps.

A run writes ``results.json`` last and atomically (``featcal.report.run_tables.write_results``), so
its presence marks a complete run; a crashed or killed job leaves none. Each
``results.json`` stores ``config_hash``: a hash of the resolved run config without the
keys that do not change what is computed (``IGNORED_KEYS``: ``resume``, the whole
``logger`` node, ``debug``, ``num_workers``, and every ``progress`` key), with
``device=auto`` resolved to the device it picks (``device=cpu`` and ``device=auto`` on a
CPU machine are the same job). Hydra's own node (output folders, launcher, sweep dir) is
not part of a job's config, so it never enters the hash. Results stored under the older
hash (before these keys were left out) are still recognised.

With ``resume=true`` (the default) a run whose folder already holds a complete
``results.json`` with the same hash is skipped: it prints
``skipped: complete results for the same config in <dir>`` and returns the stored results.
A sweep is resumed by launching it again into the same folder, with the same sweep
parameters (Hydra numbers the jobs in the same order, so job N lands in ``<sweep>/N``
again)::

    featcal-run -m calibration=none,featcal budget.per_task=8,32 hydra.sweep.dir=multirun/2026-11-26/17-05-00

This works with every launcher (basic, ``hydra/launcher=local`` (joblib), ``submitit_local``,
``slurm``): the check runs inside each job. ``resume=false`` reruns everything.
``ResumeSummary`` (a Hydra callback registered in ``conf/config.yaml``) prints how many jobs
of a multirun were skipped and how many ran: each job records what it did (skipped, ran,
failed, or busy: running in another live process, see ``featcal/lock.py``), so the
summary counts exactly what the jobs printed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("featcal")

#: dotted keys left out of the hash: they do not change what a run computes
IGNORED_KEYS = ("resume", "logger", "debug", "num_workers", "reference_cache")
#: key names left out wherever they occur (presentation only)
IGNORED_NAMES = ("progress",)
#: the keys the hash left out before IGNORED_KEYS grew (results stored then still count)
LEGACY_IGNORED_KEYS = ("resume", "logger.mode")
SKIP_MESSAGE = "skipped: complete results for the same config in {dir}"


def _drop(data: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def _drop_names(node: Any, names: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        for name in names:
            node.pop(name, None)
        for v in node.values():
            _drop_names(v, names)
    elif isinstance(node, list):
        for v in node:
            _drop_names(v, names)


def resolved_device(name: Any) -> str:
    """The device a ``device=`` value runs on here: ``auto`` -> ``cpu``/``cuda:0``/``mps``;
    ``cuda`` -> ``cuda:<current>``."""
    if name is None:
        name = "auto"
    try:
        import torch

        from featcal.utils import resolve_device

        dev = resolve_device(str(name))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return str(dev)
    except Exception:  # noqa: BLE001 - validate reports a bad device
        return str(name)


def config_hash(cfg: DictConfig | dict[str, Any], legacy: bool = False) -> str:
    """sha256 (16 hex digits) of the resolved config minus ``IGNORED_KEYS`` and
    ``IGNORED_NAMES``, with the device resolved. ``legacy``: the hash results.json files
    stored before (only ``LEGACY_IGNORED_KEYS`` left out, the device as given)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg, default=str))
    data.pop("hydra", None)
    for key in LEGACY_IGNORED_KEYS if legacy else IGNORED_KEYS:
        _drop(data, key)
    if not legacy:
        _drop_names(data, IGNORED_NAMES)
        if "device" in data:
            data["device"] = resolved_device(data["device"])
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def complete_results(out_dir: Path, digest: str | tuple[str, ...]) -> dict[str, Any] | None:
    """The stored results of ``out_dir`` if they are complete and for the config ``digest``
    (or one of several)."""
    digests = (digest,) if isinstance(digest, str) else tuple(digest)
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: rerun
    if not isinstance(results, dict) or results.get("config_hash") not in digests or "score" not in results:
        return None
    return results


def previous_results(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """What ``run()`` calls first: the stored results to return instead of running
    (printing the skip line), or None to run. Always None with ``resume=false``."""
    if not bool(cfg.get("resume", True)):
        return None
    results = complete_results(out_dir, (config_hash(cfg), config_hash(cfg, legacy=True)))
    if results is not None:
        message = SKIP_MESSAGE.format(dir=out_dir)
        print(message, flush=True)
    return results


def _snapshot(sweep_dir: Path) -> dict[str, int]:
    if not sweep_dir.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")}


try:  # Hydra callback: a summary line at the end of a multirun
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object  # type: ignore[assignment,misc]


#: the sweep folder and launcher of the multirun in progress in this process (for ``interrupted``)
CURRENT: dict[str, str] = {}


class ResumeSummary(Callback):
    """Counts, at the end of a multirun, what its jobs did: each job of this launch records
    its outcome (``featcal.lock.job_slot``: skipped, ran, failed, busy) under a launch id
    this callback sets in the environment the jobs inherit."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}
        self._launch = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import os
        import uuid

        from featcal.lock import LAUNCH_ENV, LAUNCHER_PID_ENV

        self._launch = uuid.uuid4().hex[:12]
        os.environ[LAUNCH_ENV] = self._launch  # inherited by the jobs (joblib, submitit)
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        self._before = _snapshot(Path(config.hydra.sweep.dir))
        CURRENT["sweep_dir"] = str(config.hydra.sweep.dir)
        with contextlib.suppress(Exception):
            CURRENT["launcher"] = str(config.hydra.launcher._target_)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from featcal.lock import launch_outcomes

        CURRENT.clear()
        sweep = Path(config.hydra.sweep.dir)
        outcomes = launch_outcomes(sweep, self._launch) if self._launch else {}
        if outcomes:
            counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("skipped", "ran", "failed", "busy")}
            skipped, ran = counts["skipped"], counts["ran"]
        else:  # jobs that could not record (e.g. a read-only job folder): compare results.json files
            after = _snapshot(sweep)
            skipped = sum(1 for p, t in after.items() if self._before.get(p) == t)
            ran = len(after) - skipped
            counts = {"failed": 0, "busy": 0}
        extra = "".join(f", {counts[k]} {label}" for k, label in (
            ("failed", "failed"), ("busy", "skipped as running in another process")) if counts[k])
        if not bool(config.get("resume", True)):
            print(f"featcal: {ran} jobs with results in {config.hydra.sweep.dir} (resume=false){extra}", flush=True)
        else:
            print(f"featcal: resume: {skipped} jobs skipped (complete results for the same config), "
                  f"{ran} ran{extra}, in {config.hydra.sweep.dir}", flush=True)


def interrupted(args: list[str]) -> None:
    """``featcal-run`` stopped by Ctrl-C: say what goes on running, then exit 130."""
    import sys

    launcher = CURRENT.get("launcher", "") + " " + " ".join(args)
    sweep = CURRENT.get("sweep_dir", "<sweep dir>")
    if "submitit" in launcher.lower() or "slurm" in launcher.lower():
        slurm = "slurm" in launcher.lower()
        stop = ("cancel them with `scancel <job id>`" if slurm else
                "stop them with `kill <job id>` (a local job's id is its process id)")
        sys.stderr.write(
            f"\nfeatcal: interrupted: the launcher stopped, but the jobs it already submitted keep running "
            f"(their ids are the folder names in {sweep}/.submitit/); {stop}. Relaunching the same sweep into "
            f"hydra.sweep.dir={sweep} skips the jobs that finish (and those still running).\n")
    elif "sweep_dir" in CURRENT:
        sys.stderr.write(f"\nfeatcal: interrupted; finished jobs keep their results (relaunch with "
                         f"hydra.sweep.dir={sweep} to resume).\n")
    else:
        sys.stderr.write("\nfeatcal: interrupted.\n")
    raise SystemExit(130)
