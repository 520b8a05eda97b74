"""TIES-merging (Yadav et al., NeurIPS 2023) as the code behind the published CLIP/T5
numbers runs it (task_vectors / Surgery / FusionBench ``ties_merging_utils``).

1. Trim: flatten each task vector τ_t over **all** merged parameters (one global
   threshold per task, not per tensor). With N entries and k = int(density·N), the
   threshold is the (N − k)-th smallest |τ| (``kthvalue``) and the entries with
   |τ| ≥ threshold are kept (k + 1 of them when magnitudes are distinct, as in the
   reference code; density = 1 keeps everything).
2. Elect: sign per entry = sign(Σ_t trimmed τ_t); entries whose elected sign is 0 take
   the majority sign = sign of the sum of the elected signs over all entries.
3. Disjoint merge of the kept entries whose sign agrees with the elected one:
   ``sum`` (the references' default for these benchmarks), ``mean`` (the TIES paper's
   disjoint mean) or ``max`` (largest agreeing magnitude, with the elected sign).
4. θ = θ₀ + λ · merged, λ = 0.3.

Memory: the global threshold needs the k-th value of one task's |τ| over all N merged
entries at a time: one N-entry float32 vector plus ``kthvalue``'s working copy
(≈ 2 × 4 N bytes: 0.7 GB for CLIP ViT-B/32's 88 M merged entries), task after task.
Everything else streams key by key ([T, ...] for one tensor at a time), recomputing
the task vectors in each of the three passes instead of holding all of them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from featcal.merge.base import (
    DENSITY,
    SCALING,
    Exclude,
    StateDict,
    check_experts,
    check_merge_keys,
    mergeable,
    task_vector,
    work_dtype,
)

MERGE_FUNCS = ("sum", "mean", "max")


def global_trim_threshold(
    base: StateDict, expert: StateDict, keys: Sequence[str], density: float
) -> torch.Tensor | None:
    """The magnitude threshold of one task vector over all ``keys`` (a 0-dim tensor on
    the first key's device), or None when everything is kept (density 1)."""
    n = sum(base[k].numel() for k in keys)
    k = int(n * density)
    if k >= n or n == 0:
        return None
    first = base[keys[0]]
    mags = torch.empty(n, dtype=work_dtype(first), device=first.device)
    offset = 0
    for key in keys:
        tv = task_vector(expert[key], base[key])
        m = tv.numel()
        mags[offset : offset + m] = tv.abs().reshape(-1)
        offset += m
        del tv
    return torch.kthvalue(mags, n - k).values


def _trimmed(key: str, b: torch.Tensor, experts: Sequence[StateDict], thresholds) -> torch.Tensor:
    """[T, ...] task vectors of ``key`` with the entries below each task's threshold zeroed."""
    rows = []
    for sd, thr in zip(experts, thresholds):
        tv = task_vector(sd[key], b)
        if thr is not None:
            tv = tv * (tv.abs() >= thr.to(tv.device))
        rows.append(tv)
    return torch.stack(rows)


def ties(
    base: StateDict,
    experts: Sequence[StateDict],
    scaling_factor: float = 0.3,
    density: float = 0.2,
    merge_func: str = "sum",
    exclude: Exclude = None,
) -> dict[str, torch.Tensor]:
    """TIES-merging with a global top-``density`` trim per task (see the module docstring)."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}, got {merge_func!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_experts(base, experts)
    keys = [k for k, b in base.items() if mergeable(k, b, exclude)]
    merged_keys = set(keys)
    out = {k: b.clone() for k, b in base.items() if k not in merged_keys}
    if not keys:
        return out
    thresholds = [global_trim_threshold(base, sd, keys, float(density)) for sd in experts]

    # the majority sign: sign of Σ over all entries of the elected signs (exact integer sum)
    total = None
    for key in keys:
        elected = torch.sign(_trimmed(key, base[key], experts, thresholds).sum(0))
        s = elected.sum(dtype=torch.int64).to(base[keys[0]].device)
        total = s if total is None else total + s
    majority = torch.sign(total)

    for key in keys:
        b = base[key]
        trimmed = _trimmed(key, b, experts, thresholds)
        sign = torch.sign(trimmed.sum(0))
        sign = torch.where(sign == 0, majority.to(device=sign.device, dtype=sign.dtype), sign)
        agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        selected = trimmed * agree
        if merge_func == "sum":
            merged_tv = selected.sum(0)
        elif merge_func == "mean":
            merged_tv = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
        else:  # max
            merged_tv = selected.abs().amax(0) * sign
        out[key] = (b.to(merged_tv.dtype) + scaling_factor * merged_tv).to(b.dtype)
    return {k: out[k] for k in base}  # the base's key order


ties.validate_config = lambda node: check_merge_keys(node, {
    "scaling_factor": SCALING,
    "density": DENSITY,
    "merge_func": (lambda x: x in MERGE_FUNCS, f"allowed: {', '.join(MERGE_FUNCS)}"),
})
