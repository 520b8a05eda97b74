"""Merge methods: functions of state dicts (one module per method).

Every function takes the base state dict and the experts' state dicts (same keys)
and returns a new state dict. Each method is declared once in ``featcal.merge.registry``
(name, parameters and their checks, what it reads, its streaming form); the ``merge``
config group names a record there by ``_target_``. Non-floating tensors (position ids, integer buffers) and keys for
which ``exclude(key)`` is true pass through at their base value.
"""
from __future__ import annotations

from featcal.merge.base import Exclude, StateDict
from featcal.merge.dare import dare
from featcal.merge.task_arithmetic import task_arithmetic
from featcal.merge.ties import global_trim_threshold, ties
from featcal.merge.weight_average import weight_average

__all__ = ["Exclude", "StateDict", "dare", "global_trim_threshold", "task_arithmetic", "ties", "weight_average"]
