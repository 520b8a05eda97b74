"""RegMean (Jin et al., ICLR 2023): per-Linear closed-form merge from input Gram matrices.

For every ``nn.Linear`` whose weight is part of the task vectors, the merged weight
minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², X_t being expert t's own inputs to that Linear on
task t's calibration batches:

    Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ,    G_t = X_tᵀ X_t / N_t,

G_t being the **mean** Gram over the N_t input rows (tokens, padding included) of task
t (``gram: mean``, the running mean of FusionBench, MergeBench and the original code, so
tasks weigh equally whatever their token counts; ``gram: sum`` drops the 1/N_t and weighs
tasks by their row counts), with the off-diagonal entries of each G_t scaled by ``reduce_non_diagonal_ratio``
(0.95 in the paper; 1 is the plain least-squares solution). Every other floating
tensor (Linear biases, norms, embeddings, ...) is the mean of the experts' values;
excluded and non-floating tensors keep the base value.

Called by the run with the calibration set (its record's ``needs_calibration_data``,
``featcal.merge.registry``):
``regmean(base_sd, expert_sds, exclude=..., backbone=, base_model=, expert_models=, calib=, device=)``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from featcal.backbone.base import Backbone, move_inputs
from featcal.merge.base import Exclude, StateDict, check_experts, mergeable
from featcal.merge.weight_average import weight_average

log = logging.getLogger(__name__)

_SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRAM_REDUCTIONS = ("mean", "sum")


def merge_linear_layers(names: Sequence[str], model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of ``model`` among the qualified ``names``."""
    mods = dict(model.named_modules())
    return {n: mods[n] for n in names if isinstance(mods.get(n), nn.Linear)}


@torch.no_grad()
def input_grams(
    backbone: Backbone,
    model: nn.Module,
    linears: Sequence[str],
    batches: Sequence[Any],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    reduce: str = "mean",
) -> dict[str, torch.Tensor]:
    """XᵀX / N (``reduce="mean"``) or XᵀX (``"sum"``) over the N input rows (tokens)
    reaching each named Linear of ``model`` while ``backbone.represent`` runs on
    ``batches``; [in, in] in ``dtype`` (float32 or wider) on ``device``."""
    if reduce not in GRAM_REDUCTIONS:
        raise ValueError(f"gram must be one of {', '.join(GRAM_REDUCTIONS)}, got {reduce!r}")
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    mods = merge_linear_layers(linears, model)
    handles = []

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(dtype)
            g = x.t() @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g

        return hook

    for name, mod in mods.items():
        handles.append(mod.register_forward_pre_hook(hook_for(name)))
    try:
        for inputs in batches:
            backbone.represent(model, move_inputs(inputs, device))
    finally:
        for h in handles:
            h.remove()
    if reduce == "mean":
        for name in grams:
            grams[name] /= max(rows[name], 1)
    return grams


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio · G off the diagonal, G's own diagonal kept."""
    if ratio == 1.0:
        return gram
    diag = torch.diagonal(gram).clone()
    out = gram * ratio
    out.diagonal().copy_(diag)
    return out


def solve_gram(gram_sum: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(Σ G)⁻¹ rhs; a pseudo-inverse when Σ G is singular (a feature never active)."""
    chol, info = torch.linalg.cholesky_ex(gram_sum)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(gram_sum, hermitian=True) @ rhs


def regmean(
    base: StateDict,
    experts: Sequence[StateDict],
    exclude: Exclude = None,
    *,
    backbone: Backbone,
    base_model: nn.Module | None = None,
    expert_models: Sequence[nn.Module],
    calib: Sequence[Sequence[Any]],
    device: torch.device | str = "cpu",
    reduce_non_diagonal_ratio: float = 0.95,
    solve_dtype: str = "float32",
    gram: str = "mean",
) -> dict[str, torch.Tensor]:
    """RegMean merge (module docstring). ``calib[t]`` holds task t's unlabeled batches."""
    check_experts(base, experts)
    if len(expert_models) != len(experts) or len(calib) != len(experts):
        raise ValueError(f"regmean needs one model and one calibration set per expert: {len(experts)} experts, "
                         f"{len(expert_models)} models, {len(calib)} calibration sets")
    if not 0.0 <= reduce_non_diagonal_ratio <= 1.0:
        raise ValueError(f"reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
    if solve_dtype not in _SOLVE_DTYPES:
        raise ValueError(f"solve_dtype must be one of {sorted(_SOLVE_DTYPES)}, got {solve_dtype!r}")
    if gram not in GRAM_REDUCTIONS:
        raise ValueError(f"gram must be one of {', '.join(GRAM_REDUCTIONS)}, got {gram!r}")
    sdtype = _SOLVE_DTYPES[solve_dtype]
    device = torch.device(device)

    # averaged everything first; Linear weights are then replaced by the closed form
    out = weight_average(base, experts, exclude=exclude)
    candidates = [k[: -len(".weight")] for k, v in base.items() if k.endswith(".weight") and mergeable(k, v, exclude)]
    linears = sorted(merge_linear_layers(candidates, expert_models[0]))
    if not linears:
        log.warning("regmean: no mergeable Linear layers; the result is the weight average")
        return out

    gram_sum: dict[str, torch.Tensor] = {}
    rhs_sum: dict[str, torch.Tensor] = {}
    for t, (model, batches) in enumerate(zip(expert_models, calib)):
        if not batches:
            raise ValueError(f"regmean: task {t} has no calibration batches")
        home = next(model.parameters()).device
        was_training = model.training
        model.eval().to(device)
        try:
            grams = input_grams(backbone, model, linears, batches, device, sdtype, reduce=gram)
        finally:
            model.to(home).train(was_training)
        for name in linears:
            if name not in grams:
                raise RuntimeError(f"regmean: Linear '{name}' saw no input during the calibration forward of expert {t}")
            g = reduce_non_diagonal(grams.pop(name), reduce_non_diagonal_ratio)
            w_t = experts[t][name + ".weight"].to(device=device, dtype=sdtype)  # [out, in]
            gw = g @ w_t.t()  # [in, out]
            if name in gram_sum:
                gram_sum[name] += g
                rhs_sum[name] += gw
            else:
                gram_sum[name], rhs_sum[name] = g, gw
    for name in linears:
        key = name + ".weight"
        w = solve_gram(gram_sum.pop(name), rhs_sum.pop(name)).t()  # [out, in]
        out[key] = w.to(device=base[key].device, dtype=base[key].dtype).contiguous()
    return out

