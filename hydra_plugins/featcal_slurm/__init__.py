"""featcal's SLURM launcher for Hydra (``hydra/launcher=slurm``): see :mod:`featcal.slurm`.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, so the class
lives here; the helpers (squeue watcher, sacct filter) are in ``featcal/slurm.py``.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf, open_dict

from featcal.slurm import _BASE_KEYS, _link, _span, job_params, quiet_sacct

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pragma: no cover - hydra-submitit-launcher is a dev / cluster dependency
    SlurmLauncher = None

log = logging.getLogger("featcal.slurm")

if SlurmLauncher is not None:

    class FeatcalSlurmLauncher(SlurmLauncher):  # type: ignore[misc,valid-type]
        """See the module docstring. Keys: those of ``hydra/launcher=submitit_slurm``."""

        _run_dirs: dict[int, str] = {}

        # ---- on the compute node -----------------------------------------------------
        def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: Any) -> Any:
            run_dir = self._run_dirs.get(job_num)
            if run_dir:
                try:
                    import submitit

                    paths = submitit.JobEnvironment().paths
                    Path(run_dir).mkdir(parents=True, exist_ok=True)
                    _link(paths.stdout, Path(run_dir) / "slurm.out")
                    _link(paths.stderr, Path(run_dir) / "slurm.err")
                except Exception:  # logs are a convenience: never fail the job for them
                    pass
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

        # ---- on the submitting machine ------------------------------------------------
        def _job_config(self, overrides: Sequence[str], idx: int):
            from hydra.core.utils import setup_globals

            setup_globals()
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = idx
                cfg.hydra.job.id = f"job_id_for_{idx}"
            return cfg

        def _job_return(self, overrides: Sequence[str], cfg: Any, value: Any) -> Any:
            from hydra.core.utils import JobReturn, JobStatus

            run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            return JobReturn(overrides=list(overrides), cfg=run_cfg, hydra_cfg=cfg, working_dir=os.getcwd(),
                             task_name=str(cfg.hydra.job.name), status=JobStatus.COMPLETED, _return_value=value)

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
            import submitit
            from hydra.core.utils import JobStatus

            from featcal import errors
            from featcal.resume import complete_results, config_hash

            quiet_sacct()
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            returns: dict[int, Any] = {}
            todo: list[tuple[int, list[str], Any]] = []
            backbones, devices = set(), set()
            run_dirs: dict[int, str] = {}
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                cfg = self._job_config(overrides, idx)
                run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                done = complete_results(run_dir, config_hash(run_cfg)) if bool(cfg.get("resume", True)) else None
                if done is not None:
                    log.info("featcal: job #%d has complete results in %s: not submitted", idx, run_dir)
                    value = (done.get("score") or {}).get("calibrated", {}).get("average", math.nan)
                    returns[idx] = self._job_return(overrides, cfg, value)
                    continue
                todo.append((idx, list(overrides), cfg))
                run_dirs[idx] = str(run_dir)
                backbones.add(str(cfg.hydra.runtime.choices.get("backbone", "run")))
                devices.add(str(cfg.get("device", "auto")))
            if not todo:
                print(f"featcal: all {len(job_overrides)} jobs of {sweep_dir} have complete results: nothing submitted", flush=True)
                return [returns[k] for k in sorted(returns)]

            params = job_params(self.params, backbones, devices, [t[0] for t in todo])
            folder = params.pop("submitit_folder")
            init = {"folder": folder}
            if "max_num_timeout" in params:
                init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
            executor = submitit.AutoExecutor(cluster="slurm", **init)
            executor.update_parameters(**{k if k in _BASE_KEYS else f"slurm_{k}": v for k, v in params.items() if v is not None})

            self._run_dirs = run_dirs  # travels with the pickled launcher to the jobs
            nums = [t[0] for t in todo]
            log.info("featcal: submitting %d job(s) (#%s) of %s as '%s'", len(todo), _span(nums), sweep_dir, params["name"])
            from hydra.core.singleton import Singleton

            state = Singleton.get_state()
            jobs = executor.map_array(self, [t[1] for t in todo], ["hydra.sweep.dir"] * len(todo), nums,
                                      [f"job_id_for_{n}" for n in nums], [state] * len(todo))
            killed = []
            for (idx, overrides, cfg), job in zip(todo, jobs):
                log.info("featcal: job #%d is SLURM job %s", idx, job.job_id)
            for (idx, overrides, cfg), job in zip(todo, jobs):
                try:
                    ret = job.results()[0]
                    problem = None if ret.status != JobStatus.FAILED else f"{type(ret._return_value).__name__}: {ret._return_value}"
                except Exception as err:  # cancelled, timed out, out of memory, node failure: no result
                    ret, problem = None, f"{type(err).__name__}"
                if problem is None:
                    returns[idx] = ret
                    continue
                state = job.state
                if state in ("RUNNING", "COMPLETING", "COMPLETED", "UNKNOWN"):  # the job wrote a failure itself
                    state = "TIMEOUT" if "timed-out" in problem else "crashed"
                killed.append(idx)
                print(f"featcal: job #{idx} (SLURM job {job.job_id}) did not finish: {state}; its folder "
                      f"{run_dirs[idx]} is incomplete (log: slurm.err there); launch the same command again to rerun it "
                      f"({errors.one_line(problem, 200)})", file=sys.stderr, flush=True)
                returns[idx] = self._job_return(overrides, cfg, math.nan)
            if killed:
                errors.request_sweep_exit(errors.EXIT_CRASH)
            return [returns[k] for k in sorted(returns)]
