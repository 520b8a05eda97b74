"""One block's FeatCal systems: which modules share a system, the per-task statistics
accumulated over the calibration batches, and the closed-form solve (see the package
docstring). Both walks (in memory and layer-streamed, ``walk.py``) use it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featcal.backbone.base import is_norm, is_rms_norm
from featcal.calibration.feature_calibration.solver import (
    SolveInfo,
    anchor,
    check_finite,
    scale_from_norm,
    solve_bias_from_sums,
    solve_layernorm,
    solve_rmsnorm,
    solve_weight_from_sums,
)
from featcal.calibration.feature_calibration.stats import MomentAccumulator, add_upper_, finish_gram, normalise_without_affine

log = logging.getLogger(__name__)

@dataclass
class LinearGroup:
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
class NormStats:
    name: str
    weighted: bool
    rms: bool
    offset: float = 0.0  # effective scale = weight + offset (Gemma: 1 + w); solved in that space
    e: list[torch.Tensor] = field(default_factory=list)
    m: list[torch.Tensor] = field(default_factory=list)
    gammas: list[torch.Tensor] = field(default_factory=list)
    betas: list[torch.Tensor] = field(default_factory=list)



class BlockSystems:
    """The systems of one block: planned on the block's first batch, statistics added
    batch by batch and task by task, solved once all tasks are in.

    ``fc`` is the configured FeatCal (its public settings: alpha, lam, rho, eps, dtype,
    calibrate_bias/norm, token_weighting, last_block_patch_weight, cross_route)."""

    def __init__(self, fc, backbone, mods: dict[str, nn.Module], qual: dict[str, str], last: bool, device: torch.device):
        self.fc = fc
        self.backbone = backbone
        self.mods = mods
        self.qual = qual
        self.last = last
        self.device = device
        self.groups: list[LinearGroup] | None = None
        self.norms: dict[str, NormStats] = {}
        self.acc: dict[Any, dict[str, Any]] | None = None  # per-task accumulators, reused across tasks

    def routes(self) -> dict[str, str]:
        """Cross-term route of every linear group, by its leader's qualified name."""
        return {f"{self.qual[g.leader]}" + ("[readout-weighted]" if g.weighted else ""): g.route for g in self.groups or []}

    def start_task(self) -> None:
        if self.acc is not None:
            self._reset_task_acc(self.acc)

    def add_batch(self, emods, xs, order, xe, state, tokens: int) -> None:
        """Add one batch of captured student (``xs``) and expert (``xe``) inputs; the first
        batch of the block plans the systems (``order``: the modules' call order)."""
        if self.groups is None:
            self.groups, self.norms = self._plan(self.backbone, self.mods, xs, order, self.last, tokens)
        if self.acc is None:
            self.acc = self._new_block_acc(self.groups, self.norms, self.device)
        with self.fc.gram_context(self.device):
            self._accumulate(self.acc, self.groups, self.norms, self.mods, emods, xs, xe, state, self.backbone)

    def finish_task(self, emods) -> None:
        self._finish_task(self.acc, self.groups, self.norms, self.mods, emods, self.qual)

    def solve(self, base_mods, fallbacks: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, new value) for every solved module of the block."""
        return self._solve_block(self.groups or [], self.norms, self.mods, base_mods, self.qual, self.device, fallbacks)

    def _weights(self, mask: torch.Tensor, readout_mask: torch.Tensor, weighted: bool) -> torch.Tensor | None:
        """Token weights [B·N] from a token mask and a readout mask (None: all ones)."""
        if weighted:
            readout = readout_mask.to(mask.dtype)
            w = mask * (readout + (1.0 - readout) * self.fc.last_block_patch_weight)
            return w.reshape(-1)
        if bool((mask == 1).all()):
            return None
        return mask.reshape(-1)

    def _route(self, tokens: int, d_in: int, d_out: int) -> str:
        if self.fc.cross_route != "auto":
            return self.fc.cross_route
        direct = 2 * tokens * d_in * d_out
        gram = tokens * d_in * d_in + d_in * d_in * d_out
        return "gram" if gram < direct else "direct"

    # ---- planning ------------------------------------------------------------
    def _plan(self, backbone, mods, xs, order, last, tokens):
        """Group linear modules by shared input tensor and token weighting; list norms."""
        groups: dict[tuple[int, bool], LinearGroup] = {}
        norms: dict[str, NormStats] = {}
        missing = [n for n in mods if n not in xs]
        if missing:
            log.warning("FeatCal: modules never called in the block forward, left at merged values: %s", missing)
        for name in order:
            mod = mods[name]
            weighted = last and self.fc.token_weighting and not backbone.is_key_value(name)
            if isinstance(mod, nn.Linear):
                key = (id(xs[name]), weighted)
                if key not in groups:
                    groups[key] = LinearGroup(name, weighted, [], [], mod.in_features)
                g = groups[key]
                g.names.append(name)
                g.out_dims.append(mod.out_features)
                g.has_bias.append(mod.bias is not None)
            elif is_norm(mod) and self.fc.calibrate_norm:
                norms[name] = NormStats(name, weighted, is_rms_norm(mod), float(backbone.norm_scale_offset(mod)))
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

    def _expert_weight(self, emods, g: LinearGroup) -> torch.Tensor:
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

        a = self.fc.alpha
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
        a = self.fc.alpha
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
        lam, rho = self.fc.lam, self.fc.rho
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for g in groups:
            if g.lhs is None:
                continue
            dt = self.fc.dtype
            anc_w = torch.cat(
                [anchor(mods[n].weight.to(dt), base_mods[n].weight.to(device=device, dtype=dt), rho) for n in g.names], 0
            )
            info = SolveInfo()
            lhs = finish_gram(g.lhs)  # Σ_t s_t C_ss summed on its upper block triangle
            check_finite(", ".join(qual[n] for n in g.names), lhs=lhs, rhs=g.rhs)
            w_new = solve_weight_from_sums(lhs, g.rhs, anc_w, lam, self.fc.eps, dt, info)
            if info.method != "cholesky":
                fallbacks.append(f"{', '.join(qual[n] for n in g.names)}: {info.method}")
                log.warning("FeatCal: %s solved by %s", ", ".join(qual[n] for n in g.names), info.method)
            check_finite(", ".join(qual[n] for n in g.names), solved_weight=w_new)
            b_new = None
            if self.fc.calibrate_bias and any(g.has_bias):
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
                gamma, beta = solve_layernorm(e, m, gam, torch.stack(ns.betas), a_g, a_b, lam, self.fc.eps)
                out.append((mod.weight, gamma))
                out.append((mod.bias, beta))
            check_finite(qual[n], solved_norm=out[-1][1])
        return out


def _detached_copy(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of ``param`` on ``device`` that shares no storage with it."""
    return param.detach().to(device=device, dtype=torch.float32, copy=True)
