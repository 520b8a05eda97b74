"""Weight averaging: the mean of the experts' weights."""
from __future__ import annotations

from typing import Sequence

import torch

from featcal.merge.base import Exclude, StateDict, check_experts, mergeable, work_dtype


def weight_average(base: StateDict, experts: Sequence[StateDict], exclude: Exclude = None) -> dict[str, torch.Tensor]:
    """Mean of the experts' weights."""
    check_experts(base, experts)
    out = {}
    for key, b in base.items():
        if not mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        acc = torch.zeros_like(b, dtype=work_dtype(b))
        for sd in experts:
            acc += sd[key].to(device=b.device, dtype=acc.dtype)
        out[key] = (acc / len(experts)).to(b.dtype)
    return out

