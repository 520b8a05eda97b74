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

    @torch.no_grad()
    def represent(self, inputs: Inputs, task_index: int) -> torch.Tensor:
        return self.backbone.represent(self.model, inputs)


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


class NoCalibration(Calibrator):
    """The merged model as it is."""

    name = "none"

    def calibrate(self, backbone, merged, base, experts, calibration, device="cpu") -> CalibratedModel:
        return CalibratedModel(backbone, merged)
