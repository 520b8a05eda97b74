"""Calibrator interface.

A calibrator receives a backbone adapter, the merged model, the base model, the
experts (aligned with tasks) and per-task calibration batches; it never sees a
dataset name. It returns a :class:`CalibratedModel`: per task index, an ``nn.Module``
that behaves like the family's own model (``model_for_task``), a typed
:class:`CalibrationReport` that the run writes and logs without knowing which
calibrator produced it, and ``save``.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcal.backbone.base import Backbone, Inputs


@dataclass
class CalibrationReport:
    """What a calibrator tells the run, in one shape for every calibrator.

    drift:      rows ``{"task": str, "block": int, "when": str, "drift": float}``
                (per-block feature drift to the experts, e.g. ``when`` = before / after).
    loss_curve: rows ``{"step": int, "loss": float}`` (training calibrators).
    fallbacks:  solver fallbacks or other numerical events, one line each.
    settings:   the hyper-parameters that produced the result.
    timings:    seconds per calibrator phase.
    extra:      anything else (JSON-serialisable), written as is.
    """

    method: str = "none"
    drift: list[dict[str, Any]] = field(default_factory=list)
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def drift_rows(drift: dict[str, dict[int, list[float]]], tasks: list[str]) -> list[dict[str, Any]]:
    """``{when: {task index: [drift per block]}}`` -> report rows."""
    rows = []
    for when, per_task in drift.items():
        for t_index, values in per_task.items():
            name = tasks[int(t_index)] if int(t_index) < len(tasks) else str(t_index)
            for block, value in enumerate(values):
                rows.append({"task": name, "block": block, "when": str(when), "drift": float(value)})
    return rows


def save_model_folder(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a folder a user can load without this project, atomically.

    Models with ``save_pretrained`` (transformers) become a normal Hugging Face folder
    (``config.json`` + ``model.safetensors``, loadable with ``<Class>.from_pretrained``);
    other modules a ``model.safetensors`` state dict.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            from safetensors.torch import save_file

            tmp.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class CalibratedModel(nn.Module):
    """The merged model after calibration.

    ``model_for_task(i)`` is the module to evaluate task i with: an instance of the
    family's own model class (the class the experts load as), so task pools drive it
    exactly like an expert. Task-agnostic calibrators (FeatCal, none) return the same calibrated
    model for every task. ``report`` is the typed :class:`CalibrationReport`.
    ``save(folder)`` writes what a user needs to use the result without this project.
    """

    #: folder name used by the run's ``save_calibrated=true``
    save_name = "calibrated_model"
    #: True when the model is the merged model as it was (the run reuses the merged scores)
    unchanged = False

    def __init__(self, backbone: Backbone, model: nn.Module, report: CalibrationReport | None = None):
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.report = report or CalibrationReport()

    def model_for_task(self, task_index: int) -> nn.Module:
        return self.model

    @torch.no_grad()
    def represent(self, inputs: Inputs, task_index: int) -> torch.Tensor:
        """The final representation of ``inputs`` for task ``task_index`` (diagnostics/tests)."""
        return self.backbone.represent(self.model_for_task(task_index), inputs)

    def save(self, folder: str | os.PathLike) -> Path:
        """The full calibrated model as a normal model folder (safetensors), plus the report."""
        folder = save_model_folder(self.model, folder)
        (folder / "calibration_report.json").write_text(json.dumps(self.report.to_dict(), indent=2, default=str) + "\n")
        return folder


class Calibrator(abc.ABC):
    """Adjusts a merged model with a few unlabeled examples per task."""

    name: str = "calibrator"

    #: this calibrator's own config keys (under ``calibration.``) that lower its memory use
    #: in the calibrate stage, key -> advice ("half": suggest half the current value); the
    #: out-of-memory message of ``featcal-run`` lists them (``featcal.errors.memory_advice``)
    memory_knobs: dict[str, str] = {}

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        """Problems with a config node for this class (``key=value: what is allowed``)."""
        return []

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

    @property
    def needs_calibration_data(self) -> bool:
        return True

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

    @property
    def needs_calibration_data(self) -> bool:
        return False

    def calibrate(self, backbone, merged, base, experts, calibration, device="cpu") -> CalibratedModel:
        out = CalibratedModel(backbone, merged, CalibrationReport(method=self.name))
        out.unchanged = True
        return out
