"""The one FeatCal block loop, shared by the in-memory driver and the layer-streamed run.

Both walks are this loop over two small objects that say where things live:

- ``blocks`` (:class:`BlockAccess`): block l of the merged model, of the base and of each
  expert on the work device (in memory: moved there and back; streamed: read from disk or
  moved, one block set prefetched), and what happens to them when their part is done;
- ``states`` (:class:`StateAccess`): the student (``"s"``) and expert (``"e"``) block
  inputs of every calibration batch of every task, and the drift chain (``"u"``): the
  first examples of each task through the uncalibrated blocks (forward order) or through
  the calibrated ones (the ``forward_order=false`` ablation, whose student chain is the
  uncalibrated model). In memory: lists of states on the device; streamed: a host store.

For each block: every task's batches run through the student block (stopped after the
last module's input is captured, in forward order) and the expert block, their statistics
go into :class:`BlockSystems`, the block is solved and written at once, then the chains
advance and the drift before/after is measured on the first ``drift_examples`` examples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import BlockState
from featcal.calibration.base import CalibrationReport, drift_rows
from featcal.calibration.feature_calibration.capture import capture_inputs
from featcal.calibration.feature_calibration.drift import token_drift
from featcal.calibration.feature_calibration.systems import BlockSystems


class BlockAccess(Protocol):
    def __len__(self) -> int: ...
    def take(self, index: int) -> tuple[nn.Module, nn.Module, list[nn.Module]]: ...
    def enter_expert(self, task: int, index: int, block: nn.Module) -> nn.Module: ...
    def leave_expert(self, task: int, index: int, block: nn.Module) -> None: ...
    def solved(self, index: int, base_block: nn.Module) -> None: ...
    def done(self, index: int, block: nn.Module) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


class StateAccess(Protocol):
    def num_batches(self, task: int) -> int: ...
    def batch_sizes(self, task: int) -> list[int]: ...
    def tokens(self, task: int) -> int: ...
    def get(self, role: str, task: int, batch: int, cut: int | None = None) -> BlockState: ...
    def put(self, role: str, task: int, batch: int, state: BlockState) -> None: ...
    def start_chain(self, plan: list[list[int]]) -> None: ...
    def postfix(self) -> dict[str, str]: ...


def drift_plan(batch_sizes: list[int], k: int | None) -> list[int]:
    """How many examples of each batch the drift diagnostics use (k in total, None: all)."""
    counts, left = [], float("inf") if k is None else k
    for size in batch_sizes:
        if left <= 0:
            break
        c = int(min(size, left))
        counts.append(c)
        left -= c
    return counts


@dataclass
class WalkResult:
    """What the walk measured: drift per task and block, solver fallbacks, cross routes."""

    num_tasks: int
    track: bool
    plan: list[list[int]]
    drift_before: dict[int, list[float]] = field(default_factory=dict)
    drift_after: dict[int, list[float]] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)

    def report(self, tasks: list[str], settings: dict, start: float, extra: dict) -> CalibrationReport:
        """The calibration report (``extra`` is added after the drift counts and routes)."""
        t_names = list(tasks) if len(tasks) == self.num_tasks else [str(t) for t in range(self.num_tasks)]
        drift = {"before": self.drift_before, "after": self.drift_after}
        return CalibrationReport(
            method="featcal",
            drift=drift_rows(drift, t_names) if self.track else [],
            fallbacks=self.fallbacks,
            settings=settings,
            timings={"total": time.perf_counter() - start},
            extra={
                "drift_examples_per_task": {t_names[t]: sum(self.plan[t]) for t in range(self.num_tasks)} if self.track else {},
                "cross_routes": self.routes,
                **extra,
            },
        )


@torch.no_grad()
def walk(fc, backbone, blocks: BlockAccess, states: StateAccess, num_tasks: int, device: torch.device,
         qualified: dict[int, str], desc: str = "featcal") -> WalkResult:
    """Calibrate every block in order (see the module docstring); ``fc`` is the FeatCal."""
    k = fc.drift_examples
    track = k is None or k > 0
    plan = [drift_plan(states.batch_sizes(t), k) if track else [] for t in range(num_tasks)]
    if track:
        states.start_chain(plan)
    result = WalkResult(num_tasks, track, plan, {t: [] for t in range(num_tasks)}, {t: [] for t in range(num_tasks)})
    num_blocks = len(blocks)
    bar = tqdm(range(num_blocks), desc=desc, disable=not fc.progress)
    try:
        for index in bar:
            last = index == num_blocks - 1
            blk, base_blk, expert_blocks = blocks.take(index)
            mods = backbone.calibratable_modules(blk)
            qual = {n: qualified.get(id(m), n) for n, m in mods.items()}
            systems = BlockSystems(fc, backbone, mods, qual, last, device)
            _accumulate_block(fc, backbone, blocks, states, index, blk, mods, expert_blocks, num_tasks, device, systems)
            del expert_blocks
            result.routes.update(systems.routes())
            if track and fc.forward_order:  # the uncalibrated chain, through the block before it is solved
                _run_chain(fc, backbone, blk, states, "u", plan, device)
            # solve every module of the block, then write them all at once
            new_params = systems.solve(backbone.calibratable_modules(base_blk), result.fallbacks)
            for param, value in new_params:
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            blocks.solved(index, base_blk)
            del new_params, systems, base_blk
            _advance(fc, backbone, blk, states, plan, last, track, device)
            if track:
                _measure_drift(states, plan, fc.forward_order, result)
                bar.set_postfix(
                    drift=f"{sum(v[-1] for v in result.drift_before.values()) / num_tasks:.3f}"
                    f"->{sum(v[-1] for v in result.drift_after.values()) / num_tasks:.3f}",
                    **states.postfix(),
                )
            blocks.done(index, blk)
            del blk
        blocks.finish()
    finally:
        blocks.close()
    return result


def _accumulate_block(fc, backbone, blocks, states, index, blk, mods, expert_blocks, num_tasks, device, systems):
    """Every task's batches through the student block and the expert block, their
    statistics into ``systems``; the expert outputs become the next expert inputs (and,
    with ``forward_order=false``, the student outputs the next student inputs)."""
    stop_after: str | None = None
    steps = sum(states.num_batches(t) for t in range(num_tasks))
    inner = tqdm(total=steps, desc=f"block {index + 1}/{len(blocks)}", leave=False, disable=not fc.progress)
    for t in range(num_tasks):
        eblk = blocks.enter_expert(t, index, expert_blocks[t])
        expert_blocks[t] = None
        emods = backbone.calibratable_modules(eblk)
        if set(emods) != set(mods):
            raise ValueError(f"expert {t} block {index} has different calibratable modules")
        tokens = states.tokens(t)
        systems.start_task()
        for b in range(states.num_batches(t)):
            s_state, e_state = states.get("s", t, b), states.get("e", t, b)
            with fc.pass_context(device):
                xs, order, s_out = capture_inputs(backbone, blk, mods, s_state, stop_after=stop_after)
                xe, _, e_out = capture_inputs(backbone, eblk, emods, e_state)
            if not fc.forward_order:
                states.put("s", t, b, s_out)
            states.put("e", t, b, e_out)
            systems.add_batch(emods, xs, order, xe, s_state, tokens)
            if stop_after is None and fc.forward_order:
                stop_after = order[-1]
            del xs, xe, s_out, e_out, s_state, e_state
            inner.update(1)
        systems.finish_task(emods)
        blocks.leave_expert(t, index, eblk)
        del eblk, emods
    inner.close()


def _run_chain(fc, backbone, blk, states, role, plan, device) -> None:
    """The drift examples of chain ``role`` through ``blk``."""
    for t, counts in enumerate(plan):
        for b, c in enumerate(counts):
            with fc.pass_context(device):
                states.put(role, t, b, backbone.run_block(blk, states.get(role, t, b, c)))


def _advance(fc, backbone, blk, states, plan, last, track, device) -> None:
    """After the solve. Forward order: the calibrated block gives the next student inputs
    (after the last block only the drift examples need them). Ablation: the student chain
    already advanced; the calibrated drift chain goes through the solved block."""
    if not fc.forward_order:
        if track:
            _run_chain(fc, backbone, blk, states, "u", plan, device)
        return
    for t, counts in enumerate(plan):
        for b in range(states.num_batches(t)):
            if last and b >= len(counts):
                continue
            cut = counts[b] if last else None
            with fc.pass_context(device):
                states.put("s", t, b, backbone.run_block(blk, states.get("s", t, b, cut)))


def _measure_drift(states, plan, forward_order: bool, result: WalkResult) -> None:
    """Drift of the uncalibrated and the calibrated chain to the experts, this block."""
    before_role, after_role = ("u", "s") if forward_order else ("s", "u")
    for t, counts in enumerate(plan):
        ref = [states.get("e", t, b, c) for b, c in enumerate(counts)]
        before = [states.get(before_role, t, b, c) for b, c in enumerate(counts)]
        after = [states.get(after_role, t, b, c) for b, c in enumerate(counts)]
        result.drift_before[t].append(token_drift(before, ref))
        result.drift_after[t].append(token_drift(after, ref))
