"""A merge function that takes its time, for the fault tests' killed sweeps (a job must
still be running when its launcher is killed)."""
from __future__ import annotations

import time

from featcal.merge import task_arithmetic


def slow_task_arithmetic(base, experts, scaling_factor: float = 0.3, exclude=None, seconds: float = 0.0):
    time.sleep(float(seconds))
    return task_arithmetic(base, experts, scaling_factor=scaling_factor, exclude=exclude)
