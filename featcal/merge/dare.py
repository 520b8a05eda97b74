"""DARE (Yu et al., 2024, "Language Models are Super Mario") + Task Arithmetic.

Each task-vector entry is dropped with probability p and the survivors are rescaled by
1/(1 − p); the sparsified task vectors are then added to the base with λ. Defaults are
FusionBench's ``method/dare/task_arithmetic.yaml``: p (``sparsity_ratio``) = 0.5,
rescale on, λ = 0.3, every parameter (``only_on_linear_weights: false``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from featcal.merge.base import Exclude, StateDict, check_experts, mergeable, task_vector


def dare_seed(seed: int, key: str, expert: int) -> int:
    """The generator seed of one tensor's drop mask for one expert."""
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 31 + expert) % (2**63 - 1)


def dare(
    base: StateDict,
    experts: Sequence[StateDict],
    scaling_factor: float = 0.3,
    drop_rate: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    exclude: Exclude = None,
) -> dict[str, torch.Tensor]:
    """θ₀ + λ · Σ_t m_t ⊙ τ_t / (1 − p) with m_t ~ Bernoulli(1 − p) per entry.

    The drop mask of a tensor comes from a seeded CPU generator of its own, keyed by
    (seed, key, expert index): a seed gives the same merge on every device and in any
    tensor order (streaming merges visit tensors in shard order); each mask is moved to
    the task vector's device.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    check_experts(base, experts)
    factor = 1.0 / (1.0 - drop_rate) if rescale else 1.0
    out = {}
    for key, b in base.items():
        if not mergeable(key, b, exclude):
            out[key] = b.clone()
            continue
        acc = None
        for t, sd in enumerate(experts):
            tv = task_vector(sd[key], b)
            gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, key, t))
            keep = torch.rand(tv.shape, generator=gen, device="cpu") >= drop_rate
            part = tv * keep.to(tv.device) * factor
            acc = part if acc is None else acc + part
        out[key] = (b.to(acc.dtype) + scaling_factor * acc).to(b.dtype)
    return out

