"""Calibrator interface.

A calibrator receives a backbone adapter, the merged model, the base model, the
experts (aligned with tasks) and per-task calibration batches; it never sees a
dataset name. It returns a ``CalibratedModel`` that maps (inputs, task index) to
the final representation that the task's head scores.
"""
from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from featcal.backbone.base import Backbone, Inputs


class CalibratedModel(nn.Module):
    """The merged model after calibration.

    ``represent(inputs, task_index)`` gives the final representation. Task-agnostic
    calibrators (FeatCal, none) ignore the task index; Surgery-style ones route by it.
    ``report`` carries calibrator-specific diagnostics (drift per block, loss curves)
    that the run saves and logs.
    """

    def __init__(self, backbone: Backbone, model: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.report: dict[str, Any] = {}

    #: file name used by the run's ``save_calibrated=true``
    save_name = "calibrated_model.safetensors"

    @torch.no_grad()
    def represent(self, inputs: Inputs, task_index: int) -> torch.Tensor:
        return self.backbone.represent(self.model, inputs)

    def save(self, path) -> None:
        """Save the calibrated weights (safetensors)."""
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path, backbone: Backbone, model: nn.Module) -> "CalibratedModel":
        """Load weights saved by ``save`` into ``model`` (same architecture)."""
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)), strict=True)
        return cls(backbone, model.eval())


class Calibrator(abc.ABC):
    """Adjusts a merged model with a few unlabeled examples per task."""

    name: str = "calibrator"

    @abc.abstractmethod
    def calibrate(
        self,
        backbone: Backbone,
        merged: nn.Module,
        base: nn.Module,
        experts: list[nn.Module],
        calibration: list[list[Inputs]],
        device: torch.device | str = "cpu",
    ) -> CalibratedModel:
        """``calibration[t]`` is task t's list of input batches (n examples in total)."""

    @staticmethod
    def check_inputs(experts: list[nn.Module], calibration: list[list[Inputs]]) -> int:
        """The number of tasks; raises if experts and calibration sets do not line up."""
        if not experts:
            raise ValueError("calibration needs at least one expert")
        if len(calibration) != len(experts):
            raise ValueError(f"{len(experts)} experts but {len(calibration)} calibration sets")
        if any(len(c) == 0 for c in calibration):
            raise ValueError("every task needs at least one calibration batch")
        return len(experts)


class NoCalibration(Calibrator):
    """The merged model as it is."""

    name = "none"

    def calibrate(self, backbone, merged, base, experts, calibration, device="cpu") -> CalibratedModel:
        return CalibratedModel(backbone, merged)
