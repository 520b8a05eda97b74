"""Task Arithmetic (Ilharco et al., 2023): θ₀ + λ·Σ_t (θ_t − θ₀)."""
from __future__ import annotations

from typing import Sequence

import torch

from featcal.merge.base import Exclude, StateDict, check_experts, mergeable, task_vector


def task_arithmetic(
    base: StateDict, experts: Sequence[StateDict], scaling_factor: float = 0.3, exclude: Exclude = None
) -> dict[str, torch.Tensor]:
    """θ₀ + λ · Σ_t (θ_t − θ₀)."""
    check_experts(base, experts)
    out = {}
    for key, b in base.items():
        if not mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        acc = task_vector(experts[0][key], b)
        for sd in experts[1:]:
            acc += task_vector(sd[key], b)
        out[key] = (b.to(acc.dtype) + scaling_factor * acc).to(b.dtype)
    return out

