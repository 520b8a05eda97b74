"""The FeatCal calibrator: its settings, and which walk runs (see the package docstring).
The block loop is ``walk.py``, the same for models in memory (``in_memory.py``: where the
models and the activations are kept) and for the layer-streamed run (``streamed.py``)."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

import torch
from torch import nn

from featcal.backbone.base import Backbone, Inputs
from featcal.calibration.base import CalibratedModel, Calibrator
from featcal.calibration.feature_calibration.in_memory import (
    InMemoryBlocks,
    InMemoryStates,
    Resident,
    available_bytes,
    choose_placement,
    models_bytes,
)
from featcal.calibration.feature_calibration.solver import as_dtype
from featcal.calibration.feature_calibration.tf32 import tf32_context
from featcal.calibration.feature_calibration.walk import walk
from featcal.utils import as_torch_dtype

#: allowed ``block_dtype`` values (None and "fp32": the model's own precision)
BLOCK_DTYPES = (None, "fp32", "tf32", "bf16")


class FeatCal(Calibrator):
    """Closed-form, forward-order FeatCal (see the module docstring and METHOD.md).

    Args:
        lambda_ratio: ridge strength λ towards the anchor.
        rho: anchor A = ρ·merged + (1 − ρ)·base (ρ = 1: anchor at the merged weights).
        alpha: teacher interpolation x_t = α·x_e + (1 − α)·x_s.
        eps: ε added to the ridge of the weight system and the LayerNorm determinant floor.
        calibrate_bias / calibrate_norm: ablation switches (off: keep merged values).
        token_weighting: last-block token weights (readout tokens 1, others
            ``last_block_patch_weight``; key/value projections uniform).
        forward_order: True: student inputs from the already calibrated blocks; False:
            the "all layers from the uncalibrated merged model" ablation.
        dtype: dtype of the linear solves (float32 or float64). Statistics are always
            float32 or wider. Σ_t s_t C_ss has norm ≤ T and the ridge is λ, so the system's
            condition number is at most (T + λ)/λ: float32 is ample at λ = 0.05.
        cross_route: "auto", "direct" (E[x_s (W_t x_t)ᵀ]) or "gram" ((α C_se + (1−α) C_ss) W_tᵀ).
        drift_examples: calibration examples per task used for the per-block drift
            diagnostics (None: all, 0: off). The uncalibrated-model chain for "before"
            costs one extra block forward on those examples; the default 8 keeps it to a
            few per cent of the calibration time.
        pass_tokens: consecutive calibration batches are joined into block passes of up to
            this many tokens (None/0: one pass per batch). The statistics are sums over
            tokens, so this changes speed (larger GEMMs), not the result beyond float
            rounding; memory grows with it (per-block activations of one pass).
        block_dtype: precision of the block forward passes only (the statistics, Gram
            products and solves stay float32 or wider): None / "fp32" (default: the
            model's own dtype), "tf32" (CUDA: TensorFloat-32 matmuls inside the block
            passes; on the CPU nothing, unless emulated for measurement: see
            ``featcal.calibration.feature_calibration.tf32``) or "bf16" (the passes under bf16
            autocast; works on CPU too). A GPU speed option:
            experiments/bench_calibration.py reports the parameter difference to the
            fp32 result.
        gram_tf32: CUDA (or the CPU emulation): TensorFloat-32 inputs (float32
            accumulation) for the Gram and cross products of the statistics too (about
            half of FeatCal's FLOPs on a ViT); the bench reports its parameter
            difference to full fp32. Off by default.
        inplace: write into ``merged`` (default, saves a model copy) or into a deep copy.
        progress: tqdm bar over blocks.
        streaming: layer-streamed calibration (``featcal.calibration.feature_calibration.streamed``):
            "auto" (when the backbone hands out models on disk, e.g. LLM backbones with
            ``streaming: true``), true or false.
        offload: where the streamed run keeps activations: "host" (pinned on CUDA) or
            "disk" (memory-mapped files under ``offload_dir``, a temp folder if null).
        activation_dtype: dtype of the stored activations (null: the model's dtype).
        output_dir: streamed runs on a merged model kept on disk write the calibrated
            model there (null: ``<merged folder>.featcal``).
        prefetch: streamed runs load block l + 1 of every model in a background thread
            while block l computes and write calibrated blocks from another thread (the
            same numbers, bit for bit; False: the sequential walk).
    """

    name = "featcal"
    #: activations of one block pass grow with pass_tokens; the drift chain with drift_examples
    memory_knobs = {"pass_tokens": "half", "drift_examples": "half"}

    def __init__(
        self,
        lambda_ratio: float = 0.05,
        rho: float = 2.2,
        alpha: float = 0.25,
        eps: float = 1e-8,
        calibrate_bias: bool = True,
        calibrate_norm: bool = True,
        token_weighting: bool = True,
        last_block_patch_weight: float = 0.01,
        forward_order: bool = True,
        dtype: str = "float32",
        cross_route: str = "auto",
        drift_examples: int | None = 8,
        pass_tokens: int | None = 4096,
        block_dtype: str | None = None,
        gram_tf32: bool = False,
        inplace: bool = True,
        progress: bool = True,
        streaming: bool | str = "auto",
        offload: str = "host",
        offload_dir: str | None = None,
        activation_dtype: str | None = None,
        output_dir: str | None = None,
        prefetch: bool = True,
    ):
        if cross_route not in ("auto", "direct", "gram"):
            raise ValueError(f"cross_route must be auto, direct or gram, got {cross_route!r}")
        self.lam = float(lambda_ratio)
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.calibrate_bias = bool(calibrate_bias)
        self.calibrate_norm = bool(calibrate_norm)
        self.token_weighting = bool(token_weighting)
        self.last_block_patch_weight = float(last_block_patch_weight)
        self.forward_order = bool(forward_order)
        self.dtype = as_dtype(dtype)
        self.cross_route = cross_route
        self.drift_examples = drift_examples
        self.pass_tokens = int(pass_tokens) if pass_tokens else None
        if block_dtype not in BLOCK_DTYPES:
            raise ValueError(f"block_dtype must be one of null, fp32, tf32, bf16; got {block_dtype!r}")
        self.block_dtype = None if block_dtype in (None, "fp32") else str(block_dtype)
        self.gram_tf32 = bool(gram_tf32)
        self.inplace = bool(inplace)
        self.progress = bool(progress)
        if streaming not in ("auto", True, False):
            raise ValueError(f"streaming must be auto, true or false, got {streaming!r}")
        if offload not in ("host", "disk"):
            raise ValueError(f"offload must be host or disk, got {offload!r}")
        self.streaming = streaming
        self.offload = offload
        self.offload_dir = offload_dir
        self.output_dir = output_dir
        self.prefetch = bool(prefetch)
        self.activation_dtype = as_torch_dtype(activation_dtype) if activation_dtype else None

    @classmethod
    def validate_config(cls, node: dict) -> list[str]:
        from featcal.config import check_keys, non_negative_number, number_in

        def opt_count(x):
            return x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)

        return check_keys(node, {
            "lambda_ratio": (non_negative_number, "must be a number >= 0"),
            "alpha": (number_in(0.0, 1.0), "must be a number in [0, 1]"),
            "rho": (number_in(-math.inf, math.inf), "must be a finite number (1 anchors at the merged weights)"),
            "eps": (non_negative_number, "must be a number >= 0"),
            "last_block_patch_weight": (non_negative_number, "must be a number >= 0"),
            "drift_examples": (opt_count, "must be an integer >= 0 or null (all)"),
            "pass_tokens": (opt_count, "must be an integer >= 0 or null (no joining)"),
            "cross_route": (lambda x: x in ("auto", "direct", "gram"), "allowed: auto, direct, gram"),
            "streaming": (lambda x: x in ("auto", True, False), "allowed: auto, true, false"),
            "offload": (lambda x: x in ("host", "disk"), "allowed: host (pinned RAM), disk (memory-mapped files)"),
            "activation_dtype": (lambda x: x in (None, "float32", "bfloat16", "float16"), "allowed: null (model dtype), float32, bfloat16, float16"),
            "dtype": (lambda x: x in ("float32", "float64"), "allowed: float32, float64 (the linear solves)"),
            "block_dtype": (lambda x: x in (None, "fp32", "tf32", "bf16"), "allowed: null, fp32, tf32, bf16"),
            "gram_tf32": (lambda x: isinstance(x, bool), "must be true or false"),
        })


    # ---- numeric contexts and the report's settings --------------------------
    def gram_context(self, device: torch.device):
        """The numeric context of the statistics' products (see ``gram_tf32``)."""
        if self.gram_tf32:
            return tf32_context(device)
        return contextlib.nullcontext()

    def pass_context(self, device: torch.device):
        """The numeric context of one block forward pass (see ``block_dtype``)."""
        if self.block_dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if self.block_dtype == "tf32":
            return tf32_context(device)
        return contextlib.nullcontext()

    def settings(self, streamed: bool = False) -> dict[str, Any]:
        """The settings recorded in the calibration report (the streamed run's own list)."""
        out = {
            "lambda_ratio": self.lam,
            "rho": self.rho,
            "alpha": self.alpha,
            "eps": self.eps,
            "calibrate_bias": self.calibrate_bias,
            "calibrate_norm": self.calibrate_norm,
            "token_weighting": self.token_weighting,
            "last_block_patch_weight": self.last_block_patch_weight,
            "forward_order": self.forward_order,
            "dtype": str(self.dtype).replace("torch.", ""),
            "cross_route": self.cross_route,
        }
        if streamed:
            return {
                **out,
                "drift_examples": self.drift_examples,
                "streamed": True,
                "offload": self.offload,
                "activation_dtype": str(self.activation_dtype).replace("torch.", "") if self.activation_dtype else None,
            }
        return {
            **out,
            "pass_tokens": self.pass_tokens,
            "block_dtype": self.block_dtype or "fp32",
            "gram_tf32": self.gram_tf32,
            "drift_examples": self.drift_examples,
        }

    # ---- calibration -----------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self,
        backbone: Backbone,
        merged: nn.Module,
        base: nn.Module,
        experts: list[nn.Module],
        calibration: list[list[Inputs]],
        device: torch.device | str = "cpu",
    ) -> CalibratedModel:
        """Calibrate ``merged`` block by block: in memory, or layer-streamed when asked
        (``streaming``) or when the backbone hands out models kept on disk."""
        on_disk = any(backbone.is_on_disk(m) for m in (merged, base, *experts))
        if self.streaming is True or (self.streaming == "auto" and on_disk):
            from featcal.calibration.feature_calibration.streamed import calibrate_streamed

            return calibrate_streamed(self, backbone, merged, base, experts, calibration, device)
        start = time.perf_counter()
        device = torch.device(device)
        num_tasks = self.check_inputs(experts, calibration)
        if not self.inplace:
            merged = copy.deepcopy(merged)
        merged.eval()
        # where the models live during the walk (see choose_placement): CPU runs: unchanged
        placement = choose_placement(device, models_bytes([merged, base, *experts], device), available_bytes(device))
        resident = Resident([merged, base, *experts], device) if placement == "resident" else None
        try:
            return self._calibrate_in_memory(backbone, merged, base, experts, calibration, device, start, num_tasks, placement)
        finally:
            if resident is not None:
                resident.restore()

    def _calibrate_in_memory(self, backbone, merged, base, experts, calibration, device, start, num_tasks, placement):
        """The walk over the models in memory and the block states in lists on ``device``."""
        blocks = InMemoryBlocks(backbone, merged, base, experts, device, placement)
        states = InMemoryStates.embed(backbone, merged, experts, calibration, device, num_tasks, self.pass_tokens)
        qualified = {id(m): n for n, m in merged.named_modules()}
        result = walk(self, backbone, blocks, states, num_tasks, device, qualified, desc="featcal")
        report = result.report(backbone.tasks, self.settings(), start, {"placement": placement})
        return CalibratedModel(backbone, merged, report)
