"""Shared pieces of the merge functions: the state-dict types, which entries merge,
and the key check.

Every merge function takes the base state dict and the experts' state dicts (same keys)
and returns a new state dict. Non-floating tensors (position ids, integer buffers) and
keys for which ``exclude(key)`` is true pass through at their base value. Arithmetic is
float32 (or wider) on the tensors' own device; results take the base tensor's dtype.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
Exclude = Callable[[str], bool] | None


def mergeable(key: str, tensor: torch.Tensor, exclude: Exclude) -> bool:
    return torch.is_floating_point(tensor) and not (exclude is not None and exclude(key))


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 if the weights already are."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_experts(base: StateDict, experts: Sequence[StateDict]) -> None:
    if not experts:
        raise ValueError("merging needs at least one expert")
    keys = set(base.keys())
    for i, sd in enumerate(experts):
        if set(sd.keys()) != keys:
            missing = sorted(keys - set(sd.keys()))[:5]
            extra = sorted(set(sd.keys()) - keys)[:5]
            raise ValueError(f"expert {i} state dict does not match the base: missing {missing}, unexpected {extra}")


def task_vector(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ_t − θ₀ in the work dtype, on the base tensor's device."""
    dt = work_dtype(base)
    return expert.to(device=base.device, dtype=dt) - base.to(dt)


# ---- parameter checks ``(ok(value), allowed)``, declared by the methods' records
# (``featcal.merge.registry``; the run's config validation runs them before any model loads)


def _number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


SCALING = (lambda x: _number(x) and 0.0 < float(x) <= 1.0, "must be a number in (0, 1]")
DENSITY = (lambda x: _number(x) and 0.0 < float(x) <= 1.0, "must be a number in (0, 1]")
DROP_RATE = (lambda x: _number(x) and 0.0 <= float(x) < 1.0, "must be a number in [0, 1)")
BOOL = (lambda x: isinstance(x, bool), "must be true or false")
SEED = (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "must be a non-negative integer")
