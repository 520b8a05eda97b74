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

Which entries the trim counts (``trim_*`` options; default: exactly the merged
parameters, this project's protocol). The sources of the published numbers differ:

* ``trim_extra_zeros = Z``: Z zero task-vector entries join every task's flattened
  vector (the original CLIP TIES code behind the Surgery paper's 72.4 flattens the whole
  open_clip image encoder, whose text-side leftovers, token and positional embeddings,
  ``ln_final``, ``text_projection`` and ``logit_scale``, have zero task vectors): with
  k = int(density·(N + Z)) the vision tower keeps k entries (effective density 0.258
  for ViT-B/32 at 0.2). The zeros also add nothing to the majority sign.
* ``trim_count = {key: c}``: the key's entries counted c times, in the threshold and in
  the majority sign (FusionBench flattens ``state_dict(keep_vars=True)``, where
  FLAN-T5's shared embedding appears three times: ``{shared.weight: 3}``).
* ``trim_also = [glob, ...]``: floating keys the merge excludes (kept at the base value)
  whose entries nevertheless enter the trim and the majority sign (MergeBench keeps an
  untied ``lm_head`` in the trim and never writes it back: ``[lm_head.weight]``).

Memory: the global threshold needs the k-th value of one task's |τ| over all N merged
entries at a time: one N-entry float32 vector plus ``kthvalue``'s working copy
(≈ 2 × 4 N bytes: 0.7 GB for CLIP ViT-B/32's 88 M merged entries), task after task.
Everything else streams key by key ([T, ...] for one tensor at a time), recomputing
the task vectors in each of the three passes instead of holding all of them.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

import torch

from featcal.merge.base import Exclude, StateDict, check_experts, mergeable, task_vector, work_dtype

MERGE_FUNCS = ("sum", "mean", "max")


def global_trim_threshold(
    base: StateDict,
    expert: StateDict,
    keys: Sequence[str],
    density: float,
    extra_zeros: int = 0,
    counts: Mapping[str, int] | None = None,
) -> torch.Tensor | None:
    """The magnitude threshold of one task vector over all ``keys`` (a 0-dim tensor on
    the first key's device), or None when everything is kept (density 1).

    ``extra_zeros`` zero entries join the flattened vector and a key in ``counts`` enters
    it ``counts[key]`` times (see the module docstring)."""
    counts = counts or {}
    n = sum(base[k].numel() * int(counts.get(k, 1)) for k in keys) + int(extra_zeros)
    k = int(n * density)
    if k >= n or n == 0:
        return None
    first = base[keys[0]]
    mags = torch.zeros(n, dtype=work_dtype(first), device=first.device)  # the extra zeros stay 0
    offset = 0
    for key in keys:
        tv = task_vector(expert[key], base[key])
        flat = tv.abs().reshape(-1)
        for _ in range(int(counts.get(key, 1))):
            mags[offset : offset + flat.numel()] = flat
            offset += flat.numel()
        del tv, flat
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


def trim_keys(base: StateDict, exclude: Exclude, trim_also: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(merged keys, keys of the trim): the trim adds the excluded floating keys matching a
    ``trim_also`` glob, in the base's order."""
    merged = [k for k, b in base.items() if mergeable(k, b, exclude)]
    if not trim_also:
        return merged, merged
    chosen = set(merged)
    trim = [
        k for k, b in base.items()
        if k in chosen or (torch.is_floating_point(b) and any(fnmatch.fnmatchcase(k, g) for g in trim_also))
    ]
    return merged, trim


def check_trim_options(base: StateDict, trim_extra_zeros: int, trim_count, trim_also) -> None:
    if not isinstance(trim_extra_zeros, int) or isinstance(trim_extra_zeros, bool) or trim_extra_zeros < 0:
        raise ValueError(f"trim_extra_zeros must be an integer >= 0, got {trim_extra_zeros!r}")
    for key, c in (trim_count or {}).items():
        if key not in base:
            raise ValueError(f"trim_count names '{key}', which is not in the state dict")
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"trim_count['{key}'] must be an integer >= 1, got {c!r}")
    for glob in trim_also or []:
        if not any(fnmatch.fnmatchcase(k, glob) for k in base):
            raise ValueError(f"trim_also pattern '{glob}' matches no key of the state dict")


def ties(
    base: StateDict,
    experts: Sequence[StateDict],
    scaling_factor: float = 0.3,
    density: float = 0.2,
    merge_func: str = "sum",
    exclude: Exclude = None,
    trim_extra_zeros: int = 0,
    trim_count: Mapping[str, int] | None = None,
    trim_also: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """TIES-merging with a global top-``density`` trim per task (see the module docstring)."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}, got {merge_func!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_experts(base, experts)
    check_trim_options(base, trim_extra_zeros, trim_count, trim_also)
    counts = {k: int(v) for k, v in (trim_count or {}).items()}
    keys, trim = trim_keys(base, exclude, trim_also)
    merged_keys = set(keys)
    out = {k: b.clone() for k, b in base.items() if k not in merged_keys}
    if not keys:
        return out
    thresholds = [
        global_trim_threshold(base, sd, trim, float(density), int(trim_extra_zeros), counts) for sd in experts
    ]

    # the majority sign: sign of Σ over all trim entries of the elected signs (exact integer
    # sum), itself 0 when that sum is 0 (torch.sign(0) = 0: the negative entries are kept)
    total = None
    for key in trim:
        elected = torch.sign(_trimmed(key, base[key], experts, thresholds).sum(0))
        s = elected.sum(dtype=torch.int64).to(base[keys[0]].device) * counts.get(key, 1)
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

