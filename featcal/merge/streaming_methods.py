"""The streaming forms of the merge methods: what ``featcal.merge.streaming.stream_merge``
runs over checkpoints read tensor by tensor.

A streaming form is an object with ``passes`` global passes over the merged keys
(``begin_pass`` / ``observe`` / ``end_pass``), then ``merge(key, base, experts)`` per key.
Weight average, task arithmetic and DARE need no pass: ``PerTensor`` runs the in-memory
function on a one-tensor state dict (the same arithmetic, bitwise). TIES needs the global
per-task threshold: ``GlobalTies`` finds it exactly in two histogram passes, then the
majority sign in a third. Each method's record (``featcal.merge.registry``) names its form.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

def _one(fn, key: str, base: torch.Tensor, experts: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """Run an in-memory merge function of ``featcal.merge`` on a one-tensor state dict."""
    return fn({key: base}, [{key: e} for e in experts], **kwargs)[key]


def _task_vector(base32: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return expert.to(base32.device, torch.float32) - base32


class StreamingMethod:
    """A streaming merge method: optional global passes, then one merged tensor per key."""

    passes = 0

    def begin_pass(self, p: int, num_tasks: int) -> None:  # pragma: no cover - trivial
        pass

    def observe(self, p: int, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> None:
        pass

    def end_pass(self, p: int) -> None:
        pass

    def merge(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class PerTensor(StreamingMethod):
    """Weight average / task arithmetic / DARE: the in-memory function on one tensor."""

    def __init__(self, fn, kwargs):
        self.fn, self.kwargs = fn, kwargs

    def merge(self, key, base, experts):
        return _one(self.fn, key, base, experts, **self.kwargs)


class GlobalTies(StreamingMethod):
    """TIES with a global trim per task (top ``density`` of the whole flattened task
    vector by magnitude; entries with |τ| ≥ the k-th value kept, k = N − int(N·density)
    counted from the smallest), the sign elected per entry by summed kept mass (a zero
    elected sign takes the majority sign: the sign of the sum of all elected signs),
    then the disjoint ``merge_func`` (sum | mean | max) of agreeing entries, times λ.

    Pass 0: per task, a histogram of the upper 16 bits of |τ|'s float32 bit pattern
    (non-negative floats order like their bit patterns). Pass 1: inside the bin holding
    the threshold, a histogram of the lower 16 bits: the exact k-th value. Pass 2: the
    majority sign. Then the merge pass.
    """

    passes = 3

    def __init__(self, scaling_factor: float = 0.3, density: float = 0.2, merge_func: str = "sum",
                 trim_extra_zeros: int = 0, trim_count: dict | None = None, trim_also: list | None = None):
        if merge_func not in ("sum", "mean", "max"):
            raise ValueError(f"merge_func must be sum, mean or max, got {merge_func!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if trim_also:  # the passes see the merged keys only
            raise ValueError(f"streaming TIES cannot count excluded keys in the trim (trim_also={list(trim_also)}): "
                             "merge in memory (backbone.adapter.streaming=false) or leave merge.trim_also empty")
        self.lam, self.density, self.merge_func = float(scaling_factor), float(density), merge_func
        self.extra_zeros = int(trim_extra_zeros)  # zero entries in every task's trim (see featcal.merge.ties)
        self.counts = {k: int(v) for k, v in (trim_count or {}).items()}  # keys counted c times
        self.thresholds: list[float] | None = None
        self.majority = 1.0

    @staticmethod
    def _bits(tv: torch.Tensor) -> torch.Tensor:
        return tv.abs().reshape(-1).view(torch.int32).to(torch.int64)

    def begin_pass(self, p, num_tasks):
        self.num_tasks = num_tasks
        if p == 0:
            self.count = 0
            self.hist = None
        elif p == 1:
            self.low_hist = None
        elif p == 2:
            self.sign_sum = 0

    def observe(self, p, key, base, experts):
        b32 = base.to(torch.float32)
        c = self.counts.get(key, 1)
        if p == 2:
            self.sign_sum += c * int(self._elected(b32, experts)[1].sum(dtype=torch.int64))  # exact count
            return
        for t, e in enumerate(experts):
            bits = self._bits(_task_vector(b32, e))
            if p == 0:
                if self.hist is None:
                    self.hist = torch.zeros(self.num_tasks, 1 << 16, dtype=torch.int64, device=bits.device)
                    self.hist[:, 0] += self.extra_zeros  # +0.0 has bit pattern 0
                    self.count += self.extra_zeros
                self.hist[t] += c * torch.bincount(bits >> 16, minlength=1 << 16)
                if t == 0:
                    self.count += c * bits.numel()
            else:
                if self.low_hist is None:
                    self.low_hist = torch.zeros(self.num_tasks, 1 << 16, dtype=torch.int64, device=bits.device)
                    for k in range(self.num_tasks):
                        if self.high_bin[k] == 0:
                            self.low_hist[k, 0] += self.extra_zeros
                sel = bits[(bits >> 16) == self.high_bin[t]]
                self.low_hist[t] += c * torch.bincount(sel & 0xFFFF, minlength=1 << 16)

    def end_pass(self, p):
        n = self.count
        k_small = n - int(n * self.density)  # 1-indexed rank (from the smallest) of the threshold
        if p == 0:
            self.k_small = k_small
            if k_small <= 0:  # keep everything
                self.high_bin = [0] * self.num_tasks
                self.rank_in_bin = [0] * self.num_tasks
                return
            cum = self.hist.cumsum(1)
            self.high_bin, self.rank_in_bin = [], []
            for t in range(self.num_tasks):
                hb = int(torch.searchsorted(cum[t], torch.tensor(k_small, device=cum.device)))
                below = int(cum[t, hb - 1]) if hb > 0 else 0
                self.high_bin.append(hb)
                self.rank_in_bin.append(k_small - below)
            self.hist = None
        elif p == 1:
            self.thresholds = []
            for t in range(self.num_tasks):
                if self.k_small <= 0:
                    self.thresholds.append(0.0)
                    continue
                cum = self.low_hist[t].cumsum(0)
                lb = int(torch.searchsorted(cum, torch.tensor(self.rank_in_bin[t], device=cum.device)))
                bits = torch.tensor([(self.high_bin[t] << 16) | lb], dtype=torch.int32)
                self.thresholds.append(float(bits.view(torch.float32)))
            self.low_hist = None
        elif p == 2:
            # sign(Σ elected signs), itself 0 when the sum is exactly 0 (torch.sign(0) = 0, as the
            # in-memory TIES and the reference code): a zero elected sign then stays 0 and the
            # merge keeps the negative entries (``where(sign > 0, τ > 0, τ < 0)``)
            self.majority = float((self.sign_sum > 0) - (self.sign_sum < 0))

    def _elected(self, b32, experts):
        tvs = torch.stack([_task_vector(b32, e) for e in experts])
        thr = torch.tensor(self.thresholds, dtype=torch.float32, device=tvs.device).view(-1, *([1] * b32.dim()))
        trimmed = torch.where(tvs.abs() >= thr, tvs, torch.zeros((), dtype=tvs.dtype, device=tvs.device))
        return trimmed, torch.sign(trimmed.sum(0))

    def merge(self, key, base, experts):
        b32 = base.to(torch.float32)
        trimmed, sign = self._elected(b32, experts)
        sign = torch.where(sign == 0, torch.full_like(sign, self.majority), sign)
        agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
        sel = trimmed * agree
        if self.merge_func == "sum":
            tv = sel.sum(0)
        elif self.merge_func == "mean":
            tv = sel.sum(0) / agree.sum(0).clamp(min=1)
        else:
            tv = sel.abs().max(0).values * sign
        return (b32 + self.lam * tv).to(base.dtype)


def per_tensor(fn: Callable[..., Any]) -> Callable[[Mapping[str, Any]], StreamingMethod]:
    """The streaming form of a method that merges every tensor on its own: ``fn`` (its
    in-memory function) on one tensor at a time, with the bound parameters."""

    def form(params: Mapping[str, Any]) -> StreamingMethod:
        return PerTensor(fn, dict(params))

    return form


def global_ties(params: Mapping[str, Any]) -> StreamingMethod:
    """The streaming form of TIES (its parameters are ``GlobalTies``'s)."""
    return GlobalTies(**params)
