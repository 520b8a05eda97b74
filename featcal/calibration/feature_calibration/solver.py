"""FeatCal's closed forms: small pure functions over statistics.

Unit-tested against brute-force least squares in ``tests/calibration/test_featcal_solver.py``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from featcal.utils import as_torch_dtype

log = logging.getLogger(__name__)


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype of the linear solves: float32 or float64."""
    out = as_torch_dtype(dtype)
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"solve dtype must be float32 or float64, got {dtype!r}")
    return out


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or wider if the data already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# =============================================================================
# 1. Closed forms: pure functions over statistics
# =============================================================================


def anchor(merged: torch.Tensor, base: torch.Tensor, rho: float) -> torch.Tensor:
    """A = ρ·θ_m + (1 − ρ)·θ₀ (ρ = 1: the merged weights; ρ > 1 extrapolates away from θ₀)."""
    return rho * merged + (1.0 - rho) * base


def task_scale(c_ss: torch.Tensor, eps: float = 1e-12) -> float:
    """s_t = 1 / ‖C_ss^(t)‖_F."""
    return scale_from_norm(float(torch.linalg.vector_norm(c_ss)), eps)


def scale_from_norm(norm: float, eps: float = 1e-12) -> float:
    """s_t from an already computed ‖C_ss^(t)‖_F (floored at ``eps``)."""
    return 1.0 / max(norm, eps)


@dataclass
class SolveInfo:
    """How a linear system was solved (``method`` in cholesky / lu / pinv)."""

    method: str = "cholesky"


def ridge_solve(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    ridge: float,
    dtype: torch.dtype = torch.float64,
    info: SolveInfo | None = None,
) -> torch.Tensor:
    """X solving (lhs + ridge·I) X = rhs for a symmetric PSD ``lhs``.

    Cholesky first (it reads the lower triangle of the symmetric ``lhs``); if it fails
    (indefinite or singular), an LU solve of the symmetrised matrix; if that fails or
    gives a non-finite result, the pseudo-inverse (minimum-norm least squares).
    Computed in ``dtype`` (float32 or wider) and returned in ``dtype``.
    """
    dtype = as_dtype(dtype)
    a = lhs.to(dtype=dtype, copy=True)
    if ridge:
        a.diagonal().add_(ridge)
    b = rhs.to(dtype)
    info = info if info is not None else SolveInfo()
    chol, status = torch.linalg.cholesky_ex(a)
    if int(status) == 0 and _all_finite(chol):
        y = torch.linalg.solve_triangular(chol, b, upper=False)
        x = torch.linalg.solve_triangular(chol.T, y, upper=True)
        if _all_finite(x):
            info.method = "cholesky"
            return x
    del chol
    a = 0.5 * (a + a.T)
    lu, pivots, status = torch.linalg.lu_factor_ex(a)
    if int(status) == 0:
        x = torch.linalg.lu_solve(lu, pivots, b)
        if _all_finite(x):
            info.method = "lu"
            return x
    info.method = "pinv"
    return torch.linalg.pinv(a, hermitian=True) @ b


def solve_weight_from_sums(
    lhs_sum: torch.Tensor,
    rhs_sum: torch.Tensor,
    anchor_w: torch.Tensor,
    lam: float,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    info: SolveInfo | None = None,
) -> torch.Tensor:
    """W from aggregated statistics.

    lhs_sum = Σ_t s_t C_ss^(t)          [in, in]
    rhs_sum = Σ_t s_t C_st^(t) W_tᵀ     [in, out]
    anchor_w = A_W                      [out, in]
    Solves (lhs_sum + (λ + ε) I) Wᵀ = rhs_sum + λ A_Wᵀ; returns W [out, in].
    """
    dtype = as_dtype(dtype)
    rhs = rhs_sum.to(dtype) + lam * anchor_w.to(dtype).T
    return ridge_solve(lhs_sum, rhs, lam + eps, dtype, info).T


def solve_linear_weight(
    c_ss: Sequence[torch.Tensor],
    cross: Sequence[torch.Tensor],
    anchor_w: torch.Tensor,
    lam: float,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    info: SolveInfo | None = None,
) -> torch.Tensor:
    """The FeatCal linear weight from per-task statistics.

    c_ss[t]  = E[x_s x_sᵀ]                       [in, in]
    cross[t] = E[x_s (W_t x_t)ᵀ] = C_st W_tᵀ      [in, out]
    Minimises Σ_t s_t E‖W x_s − W_t x_t‖² + λ‖W − A_W‖² (+ ε‖W‖²), s_t = 1/‖C_ss^(t)‖_F.
    """
    dtype = as_dtype(dtype)
    scales = [task_scale(c) for c in c_ss]
    lhs = sum(s * c.to(dtype) for s, c in zip(scales, c_ss))
    rhs = sum(s * m.to(dtype) for s, m in zip(scales, cross))
    return solve_weight_from_sums(lhs, rhs, anchor_w, lam, eps, dtype, info)


def solve_linear_bias(
    weight: torch.Tensor,
    scales: Sequence[float],
    mu_s: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    anchor_b: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """b = [Σ_t s_t (b_t + W_t μ_t − W μ_s) + λ A_b] / (Σ_t s_t + λ).

    ``targets[t]`` = b_t + W_t μ_t (the expert module's mean output on the teacher input),
    ``mu_s[t]`` = E[x_s], ``weight`` = the W just solved.
    """
    dtype = weight.dtype
    num = lam * anchor_b.to(dtype)
    for s, m, tgt in zip(scales, mu_s, targets):
        num = num + s * (tgt.to(dtype) - weight @ m.to(dtype))
    return num / (sum(scales) + lam)


def solve_bias_from_sums(
    weight: torch.Tensor,
    scale_sum: float,
    mu_s_sum: torch.Tensor,
    target_sum: torch.Tensor,
    anchor_b: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """``solve_linear_bias`` from Σ_t s_t, Σ_t s_t μ_s and Σ_t s_t (b_t + W_t μ_t)."""
    dtype = weight.dtype
    num = target_sum.to(dtype) - weight @ mu_s_sum.to(dtype) + lam * anchor_b.to(dtype)
    return num / (scale_sum + lam)


def solve_layernorm(
    e: torch.Tensor,
    m: torch.Tensor,
    gammas: torch.Tensor,
    betas: torch.Tensor,
    anchor_gamma: torch.Tensor,
    anchor_beta: torch.Tensor,
    lam: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm affine (γ, β), per dimension, from per-task statistics [T, D].

    e[t] = E[z_s²], m[t] = E[z_s] with z_s the student input normalised without affine;
    gammas/betas = the experts' affine. Minimises
    Σ_t E(γ z_s + β − γ_t z_s − β_t)² + λ[(γ − A_γ)² + (β − A_β)²] per dimension.
    """
    e, m, gammas, betas = (v.double() for v in (e, m, gammas, betas))
    num_tasks = e.shape[0]
    a11 = e.sum(0) + lam
    a12 = m.sum(0)
    a22 = num_tasks + lam
    r_g = (e * gammas + m * betas).sum(0) + lam * anchor_gamma.double()
    r_b = (m * gammas + betas).sum(0) + lam * anchor_beta.double()
    det = (a11 * a22 - a12 * a12).clamp_min(eps)
    gamma = (a22 * r_g - a12 * r_b) / det
    beta = (a11 * r_b - a12 * r_g) / det
    return gamma, beta


def solve_rmsnorm(e: torch.Tensor, gammas: torch.Tensor, anchor_gamma: torch.Tensor, lam: float) -> torch.Tensor:
    """Scale-only norm (RMSNorm, T5 LayerNorm): the LayerNorm objective with β = 0,
    γ = r_γ / a11 = (Σ_t e_t γ_t + λ A_γ) / (Σ_t e_t + λ)."""
    e, gammas = e.double(), gammas.double()
    return ((e * gammas).sum(0) + lam * anchor_gamma.double()) / (e.sum(0) + lam)


def _all_finite(value: torch.Tensor) -> bool:
    """True if no NaN/inf (one reduction: NaN and inf propagate through a sum)."""
    return math.isfinite(float(value.sum()))


def check_finite(module: str, **tensors: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming ``module`` if any statistic is NaN/inf."""
    for what, value in tensors.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            ok = _all_finite(value)
        else:
            ok = math.isfinite(float(value))
        if not ok:
            raise FloatingPointError(
                f"FeatCal: non-finite calibration statistic '{what}' for module '{module}' "
                "(NaN/inf in the activations feeding it: check the models and inputs)"
            )
