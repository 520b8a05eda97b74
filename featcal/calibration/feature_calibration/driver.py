"""The forward-order FeatCal driver: walks ``backbone.blocks(...)`` and knows nothing
about any model family (see the package docstring)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Backbone, BlockState, Inputs, is_norm, is_rms_norm, join_states, move_inputs
from featcal.calibration.base import CalibratedModel, CalibrationReport, Calibrator, drift_rows
from featcal.calibration.feature_calibration.capture import capture_inputs
from featcal.calibration.feature_calibration.drift import token_drift
from featcal.calibration.feature_calibration.solver import (
    SolveInfo,
    anchor,
    as_dtype,
    check_finite,
    scale_from_norm,
    solve_bias_from_sums,
    solve_layernorm,
    solve_rmsnorm,
    solve_weight_from_sums,
)
from featcal.calibration.feature_calibration.tf32 import tf32_context
from featcal.utils import as_torch_dtype
from featcal.calibration.feature_calibration.stats import MomentAccumulator, add_upper_, normalise_without_affine, finish_gram

log = logging.getLogger(__name__)

#: allowed ``block_dtype`` values (None and "fp32": the model's own precision)
BLOCK_DTYPES = (None, "fp32", "tf32", "bf16")


@dataclass
class _LinearGroup:
    """Linear modules that read one tensor with one token weighting: one system."""

    leader: str  # the module whose captured input is used
    weighted: bool  # readout token weighting (last block) vs uniform
    names: list[str]
    out_dims: list[int]
    in_dim: int
    route: str = "direct"  # cross-term route: direct | gram
    # block totals over tasks
    lhs: torch.Tensor | None = None
    rhs: torch.Tensor | None = None
    scale_sum: float = 0.0
    mu_s_sum: torch.Tensor | None = None
    target_sum: torch.Tensor | None = None  # Σ_t s_t (b_t + W_t μ_t), concatenated outputs
    has_bias: list[bool] = field(default_factory=list)


@dataclass
class _NormStats:
    name: str
    weighted: bool
    rms: bool
    offset: float = 0.0  # effective scale = weight + offset (Gemma: 1 + w); solved in that space
    e: list[torch.Tensor] = field(default_factory=list)
    m: list[torch.Tensor] = field(default_factory=list)
    gammas: list[torch.Tensor] = field(default_factory=list)
    betas: list[torch.Tensor] = field(default_factory=list)


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

    # ---- helpers -----------------------------------------------------------
    def _gram_context(self, device: torch.device):
        """The numeric context of the statistics' products (see ``gram_tf32``)."""
        if self.gram_tf32:
            return tf32_context(device)
        return contextlib.nullcontext()

    def _pass_context(self, device: torch.device):
        """The numeric context of one block forward pass (see ``block_dtype``)."""
        if self.block_dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if self.block_dtype == "tf32":
            return tf32_context(device)
        return contextlib.nullcontext()

    def _weights(self, mask: torch.Tensor, readout_mask: torch.Tensor, weighted: bool) -> torch.Tensor | None:
        """Token weights [B·N] from a token mask and a readout mask (None: all ones)."""
        if weighted:
            readout = readout_mask.to(mask.dtype)
            w = mask * (readout + (1.0 - readout) * self.last_block_patch_weight)
            return w.reshape(-1)
        if bool((mask == 1).all()):
            return None
        return mask.reshape(-1)

    def _route(self, tokens: int, d_in: int, d_out: int) -> str:
        if self.cross_route != "auto":
            return self.cross_route
        direct = 2 * tokens * d_in * d_out
        gram = tokens * d_in * d_in + d_in * d_in * d_out
        return "gram" if gram < direct else "direct"

    # ---- the driver --------------------------------------------------------
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
        from featcal.backbone.lazy import is_lazy

        if self.streaming is True or (self.streaming == "auto" and any(is_lazy(m) for m in (merged, base, *experts))):
            from featcal.calibration.feature_calibration.streamed import calibrate_streamed

            return calibrate_streamed(self, backbone, merged, base, experts, calibration, device)
        start = time.perf_counter()
        device = torch.device(device)
        num_tasks = self.check_inputs(experts, calibration)
        if not self.inplace:
            import copy

            merged = copy.deepcopy(merged)
        merged.eval()
        # where the models live during the walk (see choose_placement): CPU runs: unchanged
        placement = choose_placement(device, models_bytes([merged, base, *experts], device), available_bytes(device))
        resident = _Resident([merged, base, *experts], device) if placement == "resident" else None
        try:
            return self._calibrate_in_memory(backbone, merged, base, experts, calibration, device, start, num_tasks, placement)
        finally:
            if resident is not None:
                resident.restore()

    def _calibrate_in_memory(self, backbone, merged, base, experts, calibration, device, start, num_tasks, placement):
        qualified = {id(m): n for n, m in merged.named_modules()}
        blocks_m = backbone.blocks(merged)
        blocks_0 = backbone.blocks(base)
        blocks_e = [backbone.blocks(e) for e in experts]
        num_blocks = len(blocks_m)
        if len(blocks_0) != num_blocks or any(len(b) != num_blocks for b in blocks_e):
            raise ValueError("base, merged and experts must have the same number of blocks")

        def embed(model, batch):
            return backbone.embed(model, move_inputs(batch, backbone.device_of(model))).to(device)

        first = embed(merged, calibration[0][0])
        check_activation_memory(first, calibration, device)
        # per-block activations only: student (merged) and expert states, per task
        student = [[first if t == 0 and i == 0 else embed(merged, b) for i, b in enumerate(calibration[t])]
                   for t in range(num_tasks)]
        del first
        expert = [[embed(experts[t], b) for b in calibration[t]] for t in range(num_tasks)]
        # statistics are sums over tokens: consecutive batches may run as one larger pass
        for t in range(num_tasks):
            student[t], expert[t] = pack_passes(student[t], expert[t], self.pass_tokens)
        k = self.drift_examples
        track = k is None or k > 0

        def drift_plan(states: list[BlockState]) -> list[int]:
            """How many examples of each batch the drift diagnostics use (k in total)."""
            counts, left = [], float("inf") if k is None else k
            for s in states:
                if left <= 0:
                    break
                c = int(min(backbone_batch(s), left))
                counts.append(c)
                left -= c
            return counts

        plan = [drift_plan(student[t]) for t in range(num_tasks)] if track else []

        def cut(states: list[BlockState], t: int) -> list[BlockState]:
            return [s.take(c) for s, c in zip(states, plan[t])]

        # drift chains: the uncalibrated merged model and the calibrated one
        if self.forward_order:
            uncal = [cut(student[t], t) for t in range(num_tasks)] if track else None
        else:
            cal = [cut(student[t], t) for t in range(num_tasks)] if track else None
        drift_before: dict[int, list[float]] = {t: [] for t in range(num_tasks)}
        drift_after: dict[int, list[float]] = {t: [] for t in range(num_tasks)}
        fallbacks: list[str] = []
        routes: dict[str, str] = {}

        # each block's home (resident models: the device); blocks copied ahead return there
        homes = {id(b): backbone.device_of(b) for b in (*blocks_m, *(b for be in blocks_e for b in be))}
        ahead = _BlockCopier(device) if placement == "prefetch" else None
        if ahead is not None:
            ahead.start(0, [blocks_m[0], *(be[0] for be in blocks_e)])
        bar = tqdm(range(num_blocks), desc="featcal", disable=not self.progress)
        for l in bar:
            last = l == num_blocks - 1
            blk = blocks_m[l]
            home = homes[id(blk)]
            if ahead is not None:  # block l arrived (or arrives now); block l + 1 is copied meanwhile
                ahead.wait(l, [blk, *(be[l] for be in blocks_e)])
                if l + 1 < num_blocks:
                    ahead.start(l + 1, [blocks_m[l + 1], *(be[l + 1] for be in blocks_e)])
            blk.to(device)
            mods = backbone.calibratable_modules(blk)
            qual = {n: qualified.get(id(m), n) for n, m in mods.items()}
            groups: list[_LinearGroup] | None = None
            norms: dict[str, _NormStats] = {}
            stop_after: str | None = None
            next_student: list[list[BlockState]] = [[] for _ in range(num_tasks)]
            block_acc = None  # per-task accumulators, reused across the tasks of this block

            for t in range(num_tasks):
                eblk = blocks_e[t][l]
                ehome = homes[id(eblk)]
                eblk.to(device)
                emods = backbone.calibratable_modules(eblk)
                if set(emods) != set(mods):
                    raise ValueError(f"expert {t} block {l} has different calibratable modules")
                tokens = sum(s.token_mask.numel() for s in student[t])
                if block_acc is not None:
                    self._reset_task_acc(block_acc)
                next_expert = []
                for b, (s_state, e_state) in enumerate(zip(student[t], expert[t])):
                    with self._pass_context(device):
                        xs, order, s_out = capture_inputs(
                            backbone, blk, mods, s_state, stop_after=stop_after if self.forward_order else None
                        )
                        if not self.forward_order:
                            next_student[t].append(s_out)
                        xe, _, e_out = capture_inputs(backbone, eblk, emods, e_state)
                    next_expert.append(e_out)
                    if groups is None:
                        groups, norms = self._plan(backbone, mods, xs, order, last, tokens)
                        for g in groups:
                            routes[f"{qual[g.leader]}" + ("[readout-weighted]" if g.weighted else "")] = g.route
                    if stop_after is None and self.forward_order:
                        stop_after = order[-1]
                    if block_acc is None:
                        block_acc = self._new_block_acc(groups, norms, device)
                    with self._gram_context(device):
                        self._accumulate(block_acc, groups, norms, mods, emods, xs, xe, s_state, backbone)
                    del xs, xe
                self._finish_task(block_acc, groups, norms, mods, emods, qual)
                expert[t] = next_expert
                eblk.to(ehome)

            # the uncalibrated chain for the "before" drift (forward order only: otherwise
            # the student chain is the uncalibrated model)
            if track and self.forward_order:
                with self._pass_context(device):
                    uncal = [[backbone.run_block(blk, s) for s in uncal[t]] for t in range(num_tasks)]

            # solve every module of the block, then write them all at once
            new_params = self._solve_block(groups or [], norms, mods, backbone.calibratable_modules(blocks_0[l]), qual, device, fallbacks)
            for param, value in new_params:
                param.copy_(value.to(device=param.device, dtype=param.dtype))

            if self.forward_order:
                # the calibrated block gives the next student inputs; after the last block
                # only the drift report needs them
                if last:
                    student = [cut(student[t], t) if track else [] for t in range(num_tasks)]
                with self._pass_context(device):
                    student = [[backbone.run_block(blk, s) for s in student[t]] for t in range(num_tasks)]
            else:
                student = next_student
                if track:
                    with self._pass_context(device):
                        cal = [[backbone.run_block(blk, s) for s in cal[t]] for t in range(num_tasks)]
            if track:
                for t in range(num_tasks):
                    ref = cut(expert[t], t)
                    before = uncal[t] if self.forward_order else cut(student[t], t)
                    after = cut(student[t], t) if self.forward_order else cal[t]
                    drift_before[t].append(token_drift(before, ref))
                    drift_after[t].append(token_drift(after, ref))
                bar.set_postfix(
                    drift=f"{sum(v[-1] for v in drift_before.values()) / num_tasks:.3f}"
                    f"->{sum(v[-1] for v in drift_after.values()) / num_tasks:.3f}"
                )
            blk.to(home)

        tasks = list(backbone.tasks) if len(backbone.tasks) == num_tasks else [str(t) for t in range(num_tasks)]
        report = CalibrationReport(
            method="featcal",
            drift=drift_rows({"before": drift_before, "after": drift_after}, tasks) if track else [],
            fallbacks=fallbacks,
            settings={
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
                "pass_tokens": self.pass_tokens,
                "block_dtype": self.block_dtype or "fp32",
                "gram_tf32": self.gram_tf32,
                "drift_examples": self.drift_examples,
            },
            timings={"total": time.perf_counter() - start},
            extra={
                "drift_examples_per_task": {tasks[t]: sum(plan[t]) for t in range(num_tasks)} if track else {},
                "cross_routes": routes,
                "placement": placement,
            },
        )
        out = CalibratedModel(backbone, merged, report)
        return out

    # ---- planning ------------------------------------------------------------
    def _plan(self, backbone, mods, xs, order, last, tokens):
        """Group linear modules by shared input tensor and token weighting; list norms."""
        groups: dict[tuple[int, bool], _LinearGroup] = {}
        norms: dict[str, _NormStats] = {}
        missing = [n for n in mods if n not in xs]
        if missing:
            log.warning("FeatCal: modules never called in the block forward, left at merged values: %s", missing)
        for name in order:
            mod = mods[name]
            weighted = last and self.token_weighting and not backbone.is_key_value(name)
            if isinstance(mod, nn.Linear):
                key = (id(xs[name]), weighted)
                if key not in groups:
                    groups[key] = _LinearGroup(name, weighted, [], [], mod.in_features)
                g = groups[key]
                g.names.append(name)
                g.out_dims.append(mod.out_features)
                g.has_bias.append(mod.bias is not None)
            elif is_norm(mod) and self.calibrate_norm:
                norms[name] = _NormStats(name, weighted, is_rms_norm(mod), float(backbone.norm_scale_offset(mod)))
        for g in groups.values():
            g.route = self._route(tokens, g.in_dim, sum(g.out_dims))
        return list(groups.values()), norms

    def _new_block_acc(self, groups, norms, device):
        """Per-task accumulators for one block, allocated once and reset for every task."""
        acc: dict[Any, dict[str, Any]] = {}
        for g in groups:
            d, o = g.in_dim, sum(g.out_dims)
            acc[("g", g.leader, g.weighted)] = {
                "mom": MomentAccumulator(d, device),
                "sum_e": torch.zeros(d, dtype=torch.float32, device=device),
                # gram: Σ w x_s x_eᵀ [in, in]; direct: Σ w x_s (W_t x_t)ᵀ [in, out]
                "cross_raw": torch.empty(d, d if g.route == "gram" else o, dtype=torch.float32, device=device),
            }
        for n in norms:
            acc[("n", n)] = {}
        self._reset_task_acc(acc)
        return acc

    @staticmethod
    def _reset_task_acc(acc) -> None:
        for key, entry in acc.items():
            if key[0] == "g":
                entry["mom"].reset()
                entry["sum_e"].zero_()
                entry["empty"] = True  # the first batch overwrites cross_raw (beta = 0)
                entry["w_t"] = None  # this task's expert weights
            else:
                entry.update(w=0.0, m=None, e=None)

    def _expert_weight(self, emods, g: _LinearGroup) -> torch.Tensor:
        # torch.cat always allocates: never an alias of the expert's parameters
        return torch.cat([emods[n].weight.detach() for n in g.names], 0).float()

    def _accumulate(self, acc, groups, norms, mods, emods, xs, xe, state, backbone):
        w_cache: dict[tuple, torch.Tensor | None] = {}

        def weights(name, weighted):
            # the rows a module reads may be another sequence's (cross-attention k/v)
            mask, readout = backbone.module_masks(name, state)
            key = (id(mask), id(readout), weighted)
            if key not in w_cache:
                w_cache[key] = self._weights(mask, readout, weighted)
            return w_cache[key]

        a = self.alpha
        for g in groups:
            entry = acc[("g", g.leader, g.weighted)]
            x_s = xs[g.leader]
            x_s = x_s.reshape(-1, x_s.shape[-1]).float()
            x_e = xe[g.leader].reshape(-1, x_s.shape[-1]).float()
            w = weights(g.leader, g.weighted)
            if w is not None and w.numel() != x_s.shape[0]:
                raise ValueError(
                    f"FeatCal: module '{g.leader}' sees {x_s.shape[0]} rows but its token mask has {w.numel()} "
                    "(Backbone.module_masks names the sequence a module reads)"
                )
            mom: MomentAccumulator = entry["mom"]
            xsw = x_s if w is None else x_s * w[:, None]
            mom.add(x_s, w, xw=xsw)
            # Σ w x_e (the teacher mean follows from it and Σ w x_s)
            entry["sum_e"] += x_e.sum(0) if w is None else w @ x_e
            beta = 0.0 if entry["empty"] else 1.0  # the first batch overwrites the uninitialised buffer
            entry["empty"] = False
            if g.route == "gram":
                entry["cross_raw"].addmm_(xsw.T, x_e, beta=beta)
            else:
                x_t = torch.lerp(x_s, x_e, a)  # α x_e + (1 − α) x_s
                if entry["w_t"] is None:
                    entry["w_t"] = self._expert_weight(emods, g)
                y = x_t @ entry["w_t"].T  # expert module applied to the teacher input
                entry["cross_raw"].addmm_(xsw.T, y, beta=beta)
        for n, ns in norms.items():
            if n not in xs:
                continue
            entry = acc[("n", n)]
            z = normalise_without_affine(mods[n], xs[n], torch.float32, ns.offset)
            z = z.reshape(-1, z.shape[-1])
            w = weights(n, ns.weighted)
            zw = z if w is None else z * w[:, None]
            entry["w"] += z.shape[0] if w is None else float(w.sum())
            m, e = zw.sum(0), (zw * z).sum(0)
            entry["m"] = m if entry["m"] is None else entry["m"] + m
            entry["e"] = e if entry["e"] is None else entry["e"] + e

    def _finish_task(self, acc, groups, norms, mods, emods, qual):
        """Add one task's statistics to the block totals: with s_t = 1/‖C_ss‖_F,
        lhs += s_t C_ss, rhs += s_t C_st W_tᵀ, and the bias sums."""
        a = self.alpha
        for g in groups:
            entry = acc[("g", g.leader, g.weighted)]
            mom: MomentAccumulator = entry["mom"]
            label = ", ".join(qual[n] for n in g.names)
            sw = max(mom.weight_sum, 1e-30)
            raw = mom.raw_upper()  # Σ w x_s x_sᵀ, upper block triangle
            # a NaN/inf anywhere in C_ss makes its norm NaN/inf: one check, no extra pass
            norm = mom.raw_norm()
            check_finite(label, C_ss=norm, cross=entry["cross_raw"])
            s = scale_from_norm(norm / sw)  # 1 / ‖C_ss‖_F
            check_finite(label, s_t=s)
            mu_s = mom.mean()
            mu_t = a * (entry["sum_e"] / sw) + (1.0 - a) * mu_s
            check_finite(label, mu_s=mu_s, mu_t=mu_t)
            w_t = entry["w_t"] if entry["w_t"] is not None else self._expert_weight(emods, g)
            d, o = g.in_dim, sum(g.out_dims)
            if g.lhs is None:
                g.lhs = torch.zeros(d, d, dtype=torch.float32, device=raw.device)  # upper block triangle
                g.rhs = torch.zeros(d, o, dtype=torch.float32, device=raw.device)
                g.mu_s_sum = torch.zeros(d, dtype=torch.float32, device=raw.device)
                g.target_sum = torch.zeros(o, dtype=torch.float32, device=raw.device)
            add_upper_(g.lhs, raw, s / sw)  # the blocks below stay zero until finish_gram
            if g.route == "gram":
                # C_st = α C_se + (1 − α) C_ss, then s_t C_st W_tᵀ straight into the total
                c_st = entry["cross_raw"].mul_(a / sw).add_(mom.raw_full(), alpha=(1.0 - a) / sw)
                g.rhs.addmm_(c_st, w_t.T, alpha=s)
            else:
                g.rhs.add_(entry["cross_raw"], alpha=s / sw)
            b_t = torch.cat(
                [
                    emods[n].bias.detach().float()
                    if emods[n].bias is not None
                    else torch.zeros(o_n, dtype=torch.float32, device=w_t.device)
                    for n, o_n in zip(g.names, g.out_dims)
                ]
            )
            g.mu_s_sum += s * mu_s
            g.target_sum += s * (b_t + w_t @ mu_t)
            g.scale_sum += s
        for n, ns in norms.items():
            entry = acc[("n", n)]
            if entry["m"] is None:
                continue
            sw = max(entry["w"], 1e-30)
            m, e = entry["m"] / sw, entry["e"] / sw
            check_finite(qual[n], m=m, e=e)
            ns.m.append(m)
            ns.e.append(e)
            # copies on the work device: ``.float()`` of a float32 parameter is the parameter
            # itself, which follows the expert block when it goes back to its home device
            ns.gammas.append(_detached_copy(emods[n].weight, m.device) + ns.offset)
            if not ns.rms:
                ns.betas.append(_detached_copy(emods[n].bias, m.device))

    # ---- solving -------------------------------------------------------------
    def _solve_block(self, groups, norms, mods, base_mods, qual, device, fallbacks):
        lam, rho = self.lam, self.rho
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for g in groups:
            if g.lhs is None:
                continue
            dt = self.dtype
            anc_w = torch.cat(
                [anchor(mods[n].weight.to(dt), base_mods[n].weight.to(device=device, dtype=dt), rho) for n in g.names], 0
            )
            info = SolveInfo()
            lhs = finish_gram(g.lhs)  # Σ_t s_t C_ss summed on its upper block triangle
            check_finite(", ".join(qual[n] for n in g.names), lhs=lhs, rhs=g.rhs)
            w_new = solve_weight_from_sums(lhs, g.rhs, anc_w, lam, self.eps, dt, info)
            if info.method != "cholesky":
                fallbacks.append(f"{', '.join(qual[n] for n in g.names)}: {info.method}")
                log.warning("FeatCal: %s solved by %s", ", ".join(qual[n] for n in g.names), info.method)
            check_finite(", ".join(qual[n] for n in g.names), solved_weight=w_new)
            b_new = None
            if self.calibrate_bias and any(g.has_bias):
                anc_b = torch.cat(
                    [
                        anchor(mods[n].bias.to(dt), base_mods[n].bias.to(device=device, dtype=dt), rho)
                        if mods[n].bias is not None
                        else torch.zeros(o, dtype=dt, device=device)
                        for n, o in zip(g.names, g.out_dims)
                    ]
                )
                b_new = solve_bias_from_sums(w_new, g.scale_sum, g.mu_s_sum, g.target_sum, anc_b, lam)
            start = 0
            for n, o, hb in zip(g.names, g.out_dims, g.has_bias):
                out.append((mods[n].weight, w_new[start : start + o]))
                if b_new is not None and hb:
                    out.append((mods[n].bias, b_new[start : start + o]))
                start += o
        for n, ns in norms.items():
            if not ns.e:
                continue
            mod, bmod = mods[n], base_mods[n]
            e, m, gam = torch.stack(ns.e), torch.stack(ns.m), torch.stack(ns.gammas)
            off = ns.offset  # solve for the effective scale g = weight + offset, write g − offset
            a_g = anchor(mod.weight.double() + off, bmod.weight.to(device=device, dtype=torch.float64) + off, rho)
            if ns.rms:
                gamma = solve_rmsnorm(e, gam, a_g, lam)
                out.append((mod.weight, gamma - off))
            else:
                a_b = anchor(mod.bias.double(), bmod.bias.to(device=device, dtype=torch.float64), rho)
                gamma, beta = solve_layernorm(e, m, gam, torch.stack(ns.betas), a_g, a_b, lam, self.eps)
                out.append((mod.weight, gamma))
                out.append((mod.bias, beta))
            check_finite(qual[n], solved_norm=out[-1][1])
        return out


#: share of the free device memory the resident models may take (the rest: activations,
#: statistics, solver workspace)
RESIDENT_SHARE = 0.6


def models_bytes(models: list[nn.Module], device: torch.device) -> int:
    """Bytes of the models' parameters and buffers not yet on ``device``."""
    total = 0
    for m in models:
        for t in (*m.parameters(), *m.buffers()):
            if t.device != device:
                total += t.numel() * t.element_size()
    return total


def choose_placement(device: torch.device, need_bytes: int, free_bytes: int | None, share: float = RESIDENT_SHARE) -> str:
    """Where FeatCal's in-memory walk keeps the models:

    - ``"host"``: not a CUDA device (CPU, MPS): every block is moved to ``device`` when its
      turn comes and back after (on the CPU nothing moves): the walk as it always was;
    - ``"resident"``: CUDA and the models fit in ``share`` of the free device memory:
      moved once, every block pass on the device, moved back at the end;
    - ``"prefetch"``: CUDA otherwise (or free memory unknown): block by block, block l + 1
      copied from pinned host memory with non-blocking copies while block l computes.
    """
    if torch.device(device).type != "cuda":
        return "host"
    if free_bytes is None or need_bytes > share * free_bytes:
        return "prefetch"
    return "resident"


class _Resident:
    """Models moved to the device for the walk and back to their homes afterwards."""

    def __init__(self, models: list[nn.Module], device: torch.device):
        self.moves = []
        for m in models:
            home = next((t.device for t in (*m.parameters(), *m.buffers())), device)
            self.moves.append((m, home))
            m.to(device)

    def restore(self) -> None:
        for m, home in self.moves:
            m.to(home)


class _BlockCopier:
    """CUDA: blocks copied to the device on a side stream, from pinned host memory, while
    the default stream computes; ``wait`` makes the compute stream wait for them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.events: dict[int, Any] = {}

    def start(self, index: int, blocks: list[nn.Module]) -> None:
        with torch.cuda.stream(self.stream):
            for blk in blocks:
                for t in (*blk.parameters(), *blk.buffers()):
                    if t.device != self.device:
                        t.data = t.data.pin_memory().to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[index] = event

    def wait(self, index: int, blocks: list[nn.Module]) -> None:
        event = self.events.pop(index, None)
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for blk in blocks:  # allocated on the side stream, used (and freed) on this one
            for t in (*blk.parameters(), *blk.buffers()):
                if t.device == self.device:
                    t.record_stream(current)


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the activations live (CUDA: free device memory; CPU: available
    host memory), or None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - no psutil / no driver: no check
        return None
    return None


def check_activation_memory(sample: BlockState, calibration: list[list[Inputs]], device: torch.device) -> None:
    """FeatCal keeps one block's input states of every calibration example (student and
    expert: 2 per example) on ``device``. Any budget works (``budget.per_task=all``
    included) if they fit; raise a clear error before trying when they cannot."""
    from featcal.backbone.base import batch_size_of
    from featcal.errors import ConfigError

    rows = int(sample.hidden.shape[0])
    per_example = sum(
        t.numel() * t.element_size() for t in (sample.hidden, sample.token_mask, sample.readout_mask)
    ) / max(rows, 1)
    examples = sum(batch_size_of(b) for batches in calibration for b in batches)
    need = 2 * per_example * examples
    free = available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ConfigError(
            f"FeatCal: {examples} calibration examples need about {need / 2**30:.1f} GiB of block "
            f"activations on {device} (student and expert, {2 * per_example / 2**20:.2f} MiB per example), "
            f"but only {free / 2**30:.1f} GiB are free there; use a smaller budget.per_task or a device "
            "with more memory"
        )


def _detached_copy(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of ``param`` on ``device`` that shares no storage with it."""
    return param.detach().to(device=device, dtype=torch.float32, copy=True)


def pack_passes(
    student: list[BlockState], expert: list[BlockState], max_tokens: int | None
) -> tuple[list[BlockState], list[BlockState]]:
    """Join consecutive batches into passes of at most ``max_tokens`` tokens (student and
    expert alike, so they stay aligned). Batches that cannot be joined (different
    sequence lengths, per-batch extras) stay as they are; ``max_tokens`` None/0: no joining."""
    if not max_tokens or len(student) < 2:
        return student, expert
    out_s: list[BlockState] = []
    out_e: list[BlockState] = []
    i = 0
    while i < len(student):
        j, tokens = i + 1, student[i].token_mask.numel()
        shape = student[i].hidden.shape[1:]
        while (
            j < len(student)
            and student[j].hidden.shape[1:] == shape
            and tokens + student[j].token_mask.numel() <= max_tokens
        ):
            tokens += student[j].token_mask.numel()
            j += 1
        s_joined = join_states(student[i:j])
        e_joined = join_states(expert[i:j]) if s_joined is not None else None
        if s_joined is None or e_joined is None:
            out_s.extend(student[i:j])
            out_e.extend(expert[i:j])
        else:
            out_s.append(s_joined)
            out_e.append(e_joined)
        i = j
    return out_s, out_e


def backbone_batch(state: BlockState) -> int:
    return int(state.hidden.shape[0])
