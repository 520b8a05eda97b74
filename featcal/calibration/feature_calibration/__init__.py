"""FeatCal: closed-form, forward-order feature calibration of a merged model.

The method (see METHOD.md, "FeatCal"): walk the backbone's blocks in order. For
block l and every task t, run the *current* merged block on the student inputs
H̃_t (from the already calibrated blocks < l) and expert t's block l on the expert
inputs H_t, capturing the input of every calibratable module (every Linear and
every norm): x_s and x_e. The teacher input is x_t = α·x_e + (1 − α)·x_s. From
w-weighted token averages of those inputs each module is solved in closed form,
pulled towards the anchor A = ρ·θ_m + (1 − ρ)·θ₀ with ridge strength λ:

* Linear weight, s_t = 1/‖C_ss^(t)‖_F:
  (Σ_t s_t C_ss^(t) + (λ + ε) I) Wᵀ = Σ_t s_t C_st^(t) W_tᵀ + λ A_Wᵀ
* Linear bias: b = [Σ_t s_t (b_t + W_t μ_t − W μ_s) + λ A_b] / (Σ_t s_t + λ)
* LayerNorm (γ, β): a per-dimension 2×2 system; RMSNorm (scale only): γ = r_γ / a11.

All of a block's new parameters are written at once; then the updated merged block
gives the next student inputs and expert block l (already run) the next expert inputs.

This package has these parts:

1. the closed forms as small pure functions over statistics (unit-tested against
   brute-force least squares in ``tests/calibration/test_featcal_solver.py``);
2. statistics accumulation (w-weighted token averages, float32 or wider whatever the
   model dtype; a non-finite statistic is an error naming the module);
3. one block's systems (``systems.py``: grouping, per-task accumulation, the solve) and
   the one forward-order block loop (``walk.py``) that knows nothing about any model
   family; it walks models and activations in memory (``in_memory.py``) or layer-streamed
   (``streamed.py``), and ``FeatCal`` (``driver.py``) picks the walk.

Efficiency choices (the results are those of the plain formulas):

* modules that read the same tensor (q/k/v, gate/up) share x_s statistics and are
  solved as one system with concatenated right-hand sides;
* the cross term Σ_t s_t C_st W_tᵀ is formed without building it from scratch when that
  is cheaper: either ``direct`` — E[x_s (W_t x_t)ᵀ], the student input against the expert
  module's output on the teacher input — or ``gram`` — (α E[x_s x_eᵀ] + (1 − α) C_ss) W_tᵀ,
  reusing C_ss. ``cross_route="auto"`` picks, per module group, whichever costs fewer
  multiply-adds for the number of calibration tokens (direct wins when tokens are few
  relative to the input width, e.g. a ViT MLP's second layer; gram wins for q/k/v);
* one pass of the not-yet-updated merged block per batch and task, stopped right after
  the last module's input is captured (its output is not needed); one pass of the
  expert block, whose output is the next expert input;
* only the block in work and the expert copies of that block are on the device; only
  one block's worth of activations (per task, student and expert) is kept;
* consecutive calibration batches run as one block pass of up to ``pass_tokens`` tokens
  (larger GEMMs; the statistics are sums over tokens, so the result is unchanged);
* symmetric Gram products of wide inputs are multiplied on their upper block triangle
  only, summed over tasks in that form and mirrored once per block; per-task
  accumulators are allocated once per block and reused;
* after the last block only the drift examples are pushed through the calibrated block.

Devices and precision: everything the driver creates (statistics, accumulators, copies of
the experts' parameters, solved values) lives on the work ``device``, in float32 or wider
whatever the model dtype; the models themselves may stay at home (e.g. on the CPU) and
only the block in work and the expert copies of it visit the device. On a GPU,
``block_dtype`` (tf32 / bf16 block passes) and ``gram_tf32`` trade a little precision
for speed; both are off by default.
"""
from __future__ import annotations

from featcal.calibration.feature_calibration.capture import capture_inputs
from featcal.calibration.feature_calibration.drift import token_drift
from featcal.calibration.feature_calibration.driver import FeatCal
from featcal.calibration.feature_calibration.in_memory import backbone_batch, pack_passes
from featcal.calibration.feature_calibration.solver import (
    SolveInfo,
    anchor,
    as_dtype,
    check_finite,
    ridge_solve,
    scale_from_norm,
    solve_bias_from_sums,
    solve_layernorm,
    solve_linear_bias,
    solve_linear_weight,
    solve_rmsnorm,
    solve_weight_from_sums,
    stat_dtype,
    task_scale,
)
from featcal.calibration.feature_calibration.stats import GRAM_CHUNK, MomentAccumulator, finish_gram, gram_norm, normalise_without_affine

__all__ = [
    "FeatCal", "GRAM_CHUNK", "MomentAccumulator", "SolveInfo", "anchor", "as_dtype", "backbone_batch",
    "capture_inputs", "check_finite", "finish_gram", "gram_norm", "normalise_without_affine", "pack_passes",
    "ridge_solve", "scale_from_norm", "solve_bias_from_sums", "solve_layernorm", "solve_linear_bias",
    "solve_linear_weight", "solve_rmsnorm", "solve_weight_from_sums", "stat_dtype", "task_scale", "token_drift",
]
