"""A tiny data-dependent merge function for the run's ``needs_calibration_data`` path.

``calib_scaled_ta`` is task arithmetic whose λ depends on the calibration data it is
given, and it records every keyword argument the run passed, so a test can check
that the run drew the calibration set before merging and handed over the models.
"""
from __future__ import annotations

import torch

from featcal.merge import task_arithmetic

CALLS: list[dict] = []


def calib_scaled_ta(base, experts, exclude=None, backbone=None, base_model=None, expert_models=None, calib=None, device=None):
    CALLS.append(dict(backbone=backbone, base_model=base_model, expert_models=expert_models, calib=calib, device=device))
    # λ from the data: 0.1 + 0.4 · (fraction of positive pixels over all calibration batches)
    pos = sum(float((b["pixel_values"] > 0).float().mean()) for task in calib for b in task)
    lam = 0.1 + 0.4 * pos / sum(len(task) for task in calib)
    return task_arithmetic(base, experts, scaling_factor=lam, exclude=exclude)


calib_scaled_ta.needs_calibration_data = True
