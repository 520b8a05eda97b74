"""featcal's SLURM launcher: Hydra's submitit launcher, adjusted for sweeps of featcal runs.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) selects
``hydra_plugins.featcal_slurm.FeatcalSlurmLauncher`` (Hydra accepts launchers only from
the ``hydra_plugins`` namespace; the helpers live here), which behaves like the submitit plugin's ``SlurmLauncher``
(same keys, one SLURM job array per sweep) and adds:

- **resume at submission**: a job whose folder already holds complete results for the
  same config (``featcal.resume``) is not submitted; a finished sweep launched again
  submits nothing. Incomplete jobs (failed, cancelled, killed for time or memory) are
  submitted again, into the same folders.
- **job names** ``featcal-<backbone>-<job numbers>`` (``name: auto``) instead of Hydra's
  ``run``, so sweeps can be told apart in ``squeue``.
- **GPU request following** ``device``: ``gpus_per_node: null`` (the default) asks for no
  GPU when every job runs with ``device=cpu`` and for one GPU otherwise; a number is used
  as given.
- **clusters without accounting**: when ``sacct`` does not work, job states come from
  ``squeue`` instead, and submitit's repeated "Bypassing sacct error" warnings become one line.
- **job logs next to each run**: ``<run folder>/slurm.out`` and ``slurm.err`` link to the
  job's submitit logs (``<sweep dir>/.submitit/<job id>/``).
- **a job SLURM kills does not abort the sweep**: it is reported as incomplete (one line
  with its SLURM state), the others' results are kept, and ``featcal-run`` exits non-zero.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence


log = logging.getLogger(__name__)

SACCT_LINE = "featcal: SLURM accounting (sacct) is not available on this cluster: job states come from squeue"
#: keys of the plugin's BaseQueueConf, given to submitit without the "slurm_" prefix
_BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name", "stderr_to_stdout"}


class _SacctNoise(logging.Filter):
    """Drops submitit's "Bypassing sacct error" warnings (the replacement line is logged once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


def sacct_works() -> bool:
    if shutil.which("sacct") is None:
        return False
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _squeue_watcher_class() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueInfoWatcher(SlurmInfoWatcher):
        """Job states from ``squeue --states=all`` (finished jobs stay listed for MinJobAge)."""

        def _make_command(self) -> list[str] | None:
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not ids:
                return None
            return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N", "--jobs", ",".join(ids)]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    return SqueueInfoWatcher


_quieted = False


def quiet_sacct() -> None:
    """Once per process: without accounting, states from squeue and one line instead of a flood."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    if sacct_works():
        return
    from submitit.slurm.slurm import SlurmJob

    SlurmJob.watcher = _squeue_watcher_class()(delay_s=60)
    logging.getLogger("submitit").addFilter(_SacctNoise())
    log.warning(SACCT_LINE)


def _span(nums: Sequence[int]) -> str:
    nums = sorted(nums)
    if len(nums) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{nums[0]}-{nums[-1]}"
    text = ",".join(map(str, nums))
    return text if len(text) <= 40 else f"{nums[0]}-{nums[-1]}"


def job_params(params: dict, backbones: set[str], devices: set[str], nums: Sequence[int]) -> dict:
    """The launcher's parameters for one submission: ``name: auto`` becomes
    ``featcal-<backbone(s)>-<job numbers>``; ``gpus_per_node: null`` becomes no GPU request
    when every job has ``device=cpu`` and 1 GPU otherwise (a number is kept; 0 drops it)."""
    params = dict(params)
    if params.get("name") in (None, "auto"):
        params["name"] = f"featcal-{'+'.join(sorted(backbones))}-{_span(nums)}"
    if params.get("gpus_per_node") is None and set(devices) != {"cpu"}:
        params["gpus_per_node"] = 1
    if not params.get("gpus_per_node"):
        params.pop("gpus_per_node", None)  # CPU jobs: no --gpus-per-node at all
    return params


def _link(target: Path, link: Path) -> None:
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))
    except OSError:
        pass
