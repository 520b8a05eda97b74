"""Merge methods: pure functions of state dicts, one tensor at a time.

Every function takes the base state dict and the experts' state dicts (same keys)
and returns a new state dict. Non-floating tensors (position ids, integer buffers)
and keys for which ``exclude(key)`` is true pass through at their base value.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
Exclude = Callable[[str], bool] | None


def _mergeable(key: str, tensor: torch.Tensor, exclude: Exclude) -> bool:
    return torch.is_floating_point(tensor) and not (exclude is not None and exclude(key))


def _check(base: StateDict, experts: Sequence[StateDict]) -> None:
    if not experts:
        raise ValueError("merging needs at least one expert")
    keys = set(base.keys())
    for i, sd in enumerate(experts):
        if set(sd.keys()) != keys:
            missing = sorted(keys - set(sd.keys()))[:5]
            extra = sorted(set(sd.keys()) - keys)[:5]
            raise ValueError(f"expert {i} state dict does not match the base: missing {missing}, unexpected {extra}")


def weight_average(base: StateDict, experts: Sequence[StateDict], exclude: Exclude = None) -> dict[str, torch.Tensor]:
    """Mean of the experts' weights."""
    _check(base, experts)
    out = {}
    for key, b in base.items():
        if not _mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        acc = torch.zeros_like(b, dtype=torch.float32)
        for sd in experts:
            acc += sd[key].float()
        out[key] = (acc / len(experts)).to(b.dtype)
    return out


def task_arithmetic(
    base: StateDict, experts: Sequence[StateDict], scaling_factor: float = 0.3, exclude: Exclude = None
) -> dict[str, torch.Tensor]:
    """θ₀ + λ · Σ_t (θ_t − θ₀)."""
    _check(base, experts)
    out = {}
    for key, b in base.items():
        if not _mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        b32 = b.float()
        acc = torch.zeros_like(b32)
        for sd in experts:
            acc += sd[key].float() - b32
        out[key] = (b32 + scaling_factor * acc).to(b.dtype)
    return out


def _topk_mask(tv: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (ties broken by kthvalue)."""
    n = tv.numel()
    k = int(round(density * n))
    if k <= 0:
        return torch.zeros_like(tv, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(tv, dtype=torch.bool)
    flat = tv.abs().flatten()
    # the (n-k)-th smallest magnitude is the threshold: keep entries strictly above it,
    # then fill ties so exactly k entries are kept
    thresh = torch.kthvalue(flat, n - k).values
    mask = flat > thresh
    short = k - int(mask.sum())
    if short > 0:
        tie_idx = torch.nonzero(flat == thresh).flatten()[:short]
        mask[tie_idx] = True
    return mask.view_as(tv)


def ties(
    base: StateDict,
    experts: Sequence[StateDict],
    scaling_factor: float = 0.3,
    density: float = 0.2,
    exclude: Exclude = None,
) -> dict[str, torch.Tensor]:
    """TIES-merging: trim each task vector to its top-``density`` entries by magnitude
    (per tensor), elect a sign per entry by summed mass, average the entries that agree
    with the elected sign (disjoint mean), scale by ``scaling_factor``."""
    _check(base, experts)
    out = {}
    for key, b in base.items():
        if not _mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        b32 = b.float()
        tvs = torch.stack([sd[key].float() - b32 for sd in experts])  # [T, ...]
        masks = torch.stack([_topk_mask(tv, density) for tv in tvs])
        trimmed = tvs * masks
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & masks & (sign.unsqueeze(0) != 0)
        count = agree.sum(0).clamp(min=1)
        merged_tv = (trimmed * agree).sum(0) / count
        out[key] = (b32 + scaling_factor * merged_tv).to(b.dtype)
    return out


def _dare_seed(seed: int, key: str, expert: int) -> int:
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 31 + expert) % (2**63 - 1)


def dare(
    base: StateDict,
    experts: Sequence[StateDict],
    scaling_factor: float = 0.3,
    drop_rate: float = 0.9,
    seed: int = 0,
    exclude: Exclude = None,
) -> dict[str, torch.Tensor]:
    """DARE + task arithmetic: drop each task-vector entry with probability p, rescale
    survivors by 1/(1−p), then add λ · Σ to the base. Deterministic for a seed (per tensor:
    the mask of a tensor depends on the seed, its key and the expert index only)."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    _check(base, experts)
    out = {}
    for key, b in base.items():
        if not _mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        b32 = b.float()
        acc = torch.zeros_like(b32)
        for t, sd in enumerate(experts):
            tv = sd[key].float() - b32
            # one generator per (seed, key, expert): the drop pattern of a tensor does not
            # depend on the order tensors are visited in (streaming merges read shard order)
            gen = torch.Generator().manual_seed(_dare_seed(seed, key, t))
            keep = (torch.rand(tv.shape, generator=gen) >= drop_rate).to(tv.device)
            acc += tv * keep / (1.0 - drop_rate)
        out[key] = (b32 + scaling_factor * acc).to(b.dtype)
    return out


METHODS = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
}


def merge(method: str, base: StateDict, experts: Sequence[StateDict], exclude: Exclude = None, **kwargs):
    """Dispatch by name (the ``merge.method`` config key)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; allowed: {sorted(METHODS)}")
    return METHODS[method](base, experts, exclude=exclude, **kwargs)
