"""Hydra finds sweepers only in the ``hydra_plugins`` namespace package; this one ships
with featcal beside the SLURM launcher (``hydra_plugins/featcal_slurm``), so
``hydra.sweeper._target_: hydra_plugins.featcal_sweeper.DedupSweeper`` works once featcal
is installed. The logic lives in ``featcal.sweeper``."""
from __future__ import annotations

from typing import Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig


class DedupSweeper(BasicSweeper):
    """Hydra's basic sweeper without identical jobs (see ``featcal.sweeper``)."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        from featcal.sweeper import log_dropped, unique_jobs

        batch = super().get_job_batch()
        loader = self.hydra_context.config_loader

        def compose(overrides: list[str]) -> DictConfig:
            return loader.load_sweep_config(self.config, overrides)

        keep, dropped = unique_jobs(batch, compose)
        log_dropped(dropped, len(batch))
        return keep
