"""Layer-wise AdaMerging (Yang et al., ICLR 2024): per-layer, per-task merging coefficients
trained by entropy minimisation on unlabeled data, then frozen.

    θ = θ₀ + Σ_t λ_{t,l} τ_{t,l},   τ_t = θ_t − θ₀,

one coefficient per task and per "layer" (each mergeable parameter tensor, as in the
paper's layer-wise variant), initialised at ``init`` (0.3) and optimised with Adam to
minimise Σ_t H(softmax(head_t(f_θ(x)))) on task t's unlabeled calibration batches.
λ is clamped to [0, 1] in the forward (``clamp``), as in the authors' implementation
(FusionBench does not clamp). Each Adam step sums the entropies of ``batches_per_task``
batches of every task (the original: 500 steps × 2 batches per task on unlabeled test
data; FusionBench: 1000 × 1; this project: 100 × 1 on the calibration set). Which split
the batches come from is the run's ``budget.split``.
Only the λs receive gradients: the parameters are mixed inside
``torch.func.functional_call`` over a frozen copy of the base model.

The entropy needs class logits, so besides the calibration set the run passes the task
pool's heads (its record in ``featcal.merge.registry`` declares ``needs_heads``):
``heads[t](z) -> logits`` for the final representation z that ``backbone.represent`` returns. The function never sees a dataset name.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from featcal.backbone.base import Backbone, move_inputs
from featcal.merge.base import Exclude, StateDict, check_experts, mergeable

log = logging.getLogger(__name__)


class _Represent(nn.Module):
    """``forward(inputs) = backbone.represent(inner, inputs)``, so that ``functional_call``
    can swap the inner model's tensors for the mixed ones."""

    def __init__(self, backbone: Backbone, inner: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.inner = inner

    def forward(self, inputs):
        return self.backbone.represent(self.inner, inputs)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def mix(base: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor], lambdas: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
    """{key: θ₀ + Σ_t λ[t, l] τ_t} for the l-th key; differentiable in ``lambdas``."""
    out = {}
    for l, key in enumerate(keys):
        tv = vectors[key]  # [T, ...]
        lam = lambdas[:, l].to(tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
        out[key] = base[key] + (lam * tv).sum(0)
    return out


def adamerging(
    base: StateDict,
    experts: Sequence[StateDict],
    exclude: Exclude = None,
    *,
    backbone: Backbone,
    base_model: nn.Module,
    calib: Sequence[Sequence[Any]],
    heads: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    device: torch.device | str = "cpu",
    expert_models: Sequence[nn.Module] | None = None,
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 100,
    clamp: bool = True,
    batches_per_task: int = 1,
    seed: int = 0,
    history: list | None = None,
) -> dict[str, torch.Tensor]:
    """Layer-wise AdaMerging (module docstring). ``history``, if given, receives one
    ``{"step", "entropy"}`` row per step and, last, ``{"lambdas": [[...] per task]}``."""
    check_experts(base, experts)
    n_tasks = len(experts)
    if len(calib) != n_tasks or len(heads) != n_tasks:
        raise ValueError(f"adamerging needs one calibration set and one head per expert: {n_tasks} experts, "
                         f"{len(calib)} calibration sets, {len(heads)} heads")
    if any(not batches for batches in calib):
        raise ValueError("adamerging: every task needs at least one calibration batch")
    if steps < 0 or lr < 0:
        raise ValueError(f"adamerging: steps and lr must be >= 0, got steps={steps}, lr={lr}")
    if int(batches_per_task) < 1:
        raise ValueError(f"adamerging: batches_per_task must be >= 1, got {batches_per_task}")
    device = torch.device(device)
    keys = [k for k, v in base.items() if mergeable(k, v, exclude)]

    model = copy.deepcopy(base_model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wrapper = _Represent(backbone, model)
    dtype_of = {k: base[k].dtype for k in keys}
    base_f = {k: base[k].to(device=device, dtype=torch.float32) for k in keys}
    vectors = {k: torch.stack([sd[k].to(device=device, dtype=torch.float32) - base_f[k] for sd in experts]) for k in keys}
    head_mods = [h.to(device) if isinstance(h, nn.Module) else h for h in heads]

    lambdas = torch.full((n_tasks, len(keys)), float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([lambdas], lr=lr)

    def coefficients() -> torch.Tensor:
        return lambdas.clamp(0.0, 1.0) if clamp else lambdas

    gen = torch.Generator().manual_seed(int(seed))
    order = [torch.randperm(len(b), generator=gen).tolist() for b in calib]
    cursor = [0] * n_tasks
    for step in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        params = mix(base_f, vectors, coefficients(), keys)
        params = {"inner." + k: v.to(dtype_of[k]) for k, v in params.items()}
        total = torch.zeros((), device=device)
        for t in range(n_tasks):
            for _ in range(int(batches_per_task)):
                if cursor[t] >= len(order[t]):  # next pass over task t's batches, reshuffled
                    order[t] = torch.randperm(len(calib[t]), generator=gen).tolist()
                    cursor[t] = 0
                inputs = move_inputs(calib[t][order[t][cursor[t]]], device)
                cursor[t] += 1
                z = torch.func.functional_call(wrapper, params, (inputs,), strict=False)
                total = total + entropy(head_mods[t](z))
        total.backward()
        opt.step()
        if history is not None:
            history.append({"step": step, "entropy": float(total.detach()) / n_tasks})

    with torch.no_grad():
        final = mix(base_f, vectors, coefficients(), keys)
        lam = coefficients().detach()
    if history is not None:
        history.append({"lambdas": lam.cpu().tolist()})
    log.info("adamerging: mean λ per task %s", [round(float(x), 4) for x in lam.mean(1)])
    out = {}
    for key, b in base.items():
        out[key] = final[key].to(device=b.device, dtype=b.dtype) if key in final else b.clone()
    return out

