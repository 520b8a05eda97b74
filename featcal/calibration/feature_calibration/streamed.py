"""Layer-streamed FeatCal: bounded device and host memory for LLM-sized models.

The same closed forms and statistics as the in-memory driver (it reuses the FeatCal
object's planning, accumulation and solve methods), walked differently:

- **Models, block by block.** Block l of the merged model, of the base and of each
  expert is acquired when its turn comes through ``featcal.backbone.lazy.BlockSource``:
  a model on disk (``LazyCausalLM``) has only that block's tensors read from its
  safetensors shards, then dropped; an in-memory model has the block moved to the device
  and back. An in-memory merged model (the output) stays on the host and its block l
  is written in place; a merged model on disk (``LazyCausalLM``) is read block by block
  too and the calibrated blocks are written, one safetensors shard per block, into a new
  HF folder (``<merged folder>.featcal`` or ``fc.output_dir``) whose model is loaded
  only when a task asks for it (``DiskCalibratedModel``): host memory then stays flat in
  depth. Nothing here knows a model family: blocks, embeddings and block forwards all
  come from the backbone.
- **Activations on the host.** Student and expert hidden states of every calibration
  batch of every task live in an ``ActivationStore`` on the host (pinned memory when a
  CUDA device is in use, or memory-mapped files with ``offload="disk"``), in the model's
  dtype (bf16 for real LLMs) or ``activation_dtype``; one batch at a time moves to the
  device. Statistics are float32 on the device.

- **IO beside compute.** While block l computes, a background thread loads block l + 1
  of every model (one block set ahead, no more; on CUDA a model on disk is read into
  pinned host memory and copied on a side stream), and each calibrated block of a merged
  model on disk is written by another thread while the next block computes. The numbers
  are those of the sequential walk (``FeatCal(prefetch=False)``), bit for bit: the same
  tensors are loaded, only earlier.

Peak device memory ≈ 2 × (experts + 2) blocks (block l and the prefetched block l + 1)
+ the block's statistics + one batch of activations; peak host memory ≈ the activations
+ a few blocks (+ the merged model when it is kept in memory).
Both are printed at the end and returned in ``report["memory"]``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Backbone, BlockState, move_inputs
from featcal.backbone.lazy import BlockSource, is_lazy
from featcal.calibration.base import CalibratedModel, CalibrationReport, drift_rows
from featcal.calibration.feature_calibration.capture import capture_inputs
from featcal.calibration.feature_calibration.drift import token_drift
from featcal.utils import current_rss_mib, peak_rss_mib

log = logging.getLogger(__name__)


class ActivationStore:
    """Host-side slots for hidden states, one per (role, task, batch).

    ``offload="host"``: plain (pinned when ``pin``) CPU tensors; ``offload="disk"``: one
    memory-mapped file per slot under ``folder`` (torch.from_file, shared), so the OS
    pages them in and out. Slots keep their shape across blocks (a block maps [B, N, D]
    to [B, N, D]) and are overwritten in place.
    """

    def __init__(self, offload: str = "host", folder: str | os.PathLike | None = None, dtype: torch.dtype | None = None, pin: bool = False):
        if offload not in ("host", "disk"):
            raise ValueError(f"offload must be host or disk, got {offload!r}")
        self.offload = offload
        self.dtype = dtype
        self.pin = bool(pin) and offload == "host"
        self.slots: dict[Any, torch.Tensor] = {}
        self._tmp = None
        if offload == "disk":
            if folder is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="featcal-act-")
                folder = self._tmp.name
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)

    def _alloc(self, key, like: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype or like.dtype
        if self.offload == "disk":
            path = self.folder / ("slot-" + "-".join(str(k) for k in key) + ".bin")
            t = torch.from_file(str(path), shared=True, size=like.numel(), dtype=dtype).view(like.shape)
        else:
            t = torch.empty(like.shape, dtype=dtype, pin_memory=self.pin)
        return t

    def put(self, key, value: torch.Tensor) -> None:
        slot = self.slots.get(key)
        if slot is None or slot.shape != value.shape:
            slot = self._alloc(key, value)
            self.slots[key] = slot
        slot.copy_(value, non_blocking=False)

    def get(self, key, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.slots[key].to(device=device, dtype=dtype, non_blocking=self.pin)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots.values())

    def close(self) -> None:
        self.slots.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _Slot:
    """A calibration batch's state without its hidden states (kept in the store)."""

    def __init__(self, state: BlockState):
        self.token_mask = state.token_mask.cpu()
        self.readout_mask = state.readout_mask.cpu()
        self.extras = move_inputs(state.extras, "cpu")
        self.batch = int(state.hidden.shape[0])

    def state(self, hidden: torch.Tensor, device: torch.device) -> BlockState:
        return BlockState(hidden, self.token_mask.to(device), self.readout_mask.to(device), move_inputs(self.extras, device))


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*block.parameters(), *block.buffers())]


def _acquire_pinned(src: BlockSource, index: int, device: torch.device, stream) -> tuple[nn.Module, Any]:
    """Block ``index`` of a model on disk, read into pinned host memory and copied to the
    CUDA ``device`` on ``stream`` without blocking: (block, event recorded after the copy)."""
    blk = src.acquire(index, torch.device("cpu"))
    for t in _tensors(blk):
        t.data = t.data.pin_memory()
    with torch.cuda.stream(stream):
        blk.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return blk, event


class BlockPrefetcher:
    """Block l of every source, with block l + 1 loading in a background thread meanwhile.

    ``take(l)`` returns the blocks of ``sources`` (acquired as ``BlockSource.acquire``
    would) and schedules block l + 1; at most one block set is loaded ahead. ``enabled``
    False: plain sequential ``acquire`` calls in the caller's thread. On CUDA, models on
    disk are read into pinned memory and copied on a side stream; the caller's stream
    waits for the copy before the blocks are returned."""

    def __init__(self, sources: list[BlockSource], device: torch.device, num_blocks: int, enabled: bool = True):
        self.sources = sources
        self.device = device
        self.num_blocks = num_blocks
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="featcal-prefetch") if enabled else None
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.pending: dict[int, Future] = {}

    def _load(self, index: int) -> list[tuple[nn.Module, Any]]:
        out = []
        for src in self.sources:
            if self.stream is not None and src.lazy:
                out.append(_acquire_pinned(src, index, self.device, self.stream))
            else:
                out.append((src.acquire(index, self.device), None))
        return out

    def schedule(self, index: int) -> None:
        if self.pool is not None and 0 <= index < self.num_blocks and index not in self.pending:
            self.pending[index] = self.pool.submit(self._load, index)

    def take(self, index: int) -> list[nn.Module]:
        if self.pool is None:
            return [src.acquire(index, self.device) for src in self.sources]
        self.schedule(index)
        loaded = self.pending.pop(index).result()
        self.schedule(index + 1)  # loads while this block computes
        blocks = []
        for blk, event in loaded:
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in _tensors(blk):  # the memory was allocated on the side stream
                    t.record_stream(current)
            blocks.append(blk)
        return blocks

    def close(self) -> None:
        """Wait for a load in flight and give its blocks back (an aborted walk)."""
        if self.pool is None:
            return
        for index, fut in list(self.pending.items()):
            try:
                for src, (blk, _) in zip(self.sources, fut.result()):
                    src.release(index, blk)
            except Exception:  # noqa: BLE001 - the walk's own error is the one to report
                pass
        self.pending.clear()
        self.pool.shutdown(wait=True)


def _cuda_peak(device: torch.device) -> float | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


@torch.no_grad()
def calibrate_streamed(
    fc,
    backbone: Backbone,
    merged: nn.Module,
    base,
    experts: list,
    calibration: list[list[Any]],
    device: torch.device | str = "cpu",
) -> CalibratedModel:
    """Layer-streamed FeatCal (see the module docstring); ``fc`` is the configured FeatCal."""
    start = time.perf_counter()
    device = torch.device(device)
    if not fc.forward_order:
        raise ValueError("layer-streamed FeatCal runs in forward order only (forward_order=false needs the in-memory driver)")
    num_tasks = fc.check_inputs(experts, calibration)
    on_disk = is_lazy(merged)
    if not on_disk:
        merged.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = current_rss_mib()
    qualified = {id(m): n for n, m in (merged.skeleton() if on_disk else merged).named_modules()}
    src_m = BlockSource(backbone, merged)
    src_0 = BlockSource(backbone, base)
    src_e = [BlockSource(backbone, e) for e in experts]
    num_blocks = len(src_m)
    if len(src_0) != num_blocks or any(len(s) != num_blocks for s in src_e):
        raise ValueError("base, merged and experts must have the same number of blocks")

    store = ActivationStore(fc.offload, fc.offload_dir, fc.activation_dtype, pin=device.type == "cuda")
    slots: list[list[_Slot]] = []
    compute_dtype: torch.dtype | None = None

    def embed_all(model: nn.Module, role: str, t: int) -> list[_Slot]:
        nonlocal compute_dtype
        out = []
        home = backbone.device_of(model)
        for b, batch in enumerate(calibration[t]):
            st = backbone.embed(model, move_inputs(batch, home))
            compute_dtype = compute_dtype or st.hidden.dtype
            store.put((role, t, b), st.hidden)
            out.append(_Slot(st))
        return out

    shell = src_m.embedder()
    for t in range(num_tasks):
        slots.append(embed_all(shell, "s", t))
    del shell
    writer = _BlockFolderWriter(merged, backbone, fc.output_dir) if on_disk else None
    for t in range(num_tasks):
        shell = src_e[t].embedder()  # a lazy expert: the model without its blocks
        embed_all(shell, "e", t)  # same masks as the student's: only the hidden states are kept
        del shell

    # drift diagnostics: the first k examples per task, an uncalibrated chain beside
    k = fc.drift_examples
    track = k is None or k > 0
    plan: list[list[int]] = []
    for t in range(num_tasks):
        counts, left = [], float("inf") if k is None else k
        for s in slots[t]:
            if left <= 0:
                break
            c = int(min(s.batch, left))
            counts.append(c)
            left -= c
        plan.append(counts if track else [])
    if track:
        for t in range(num_tasks):
            for b, c in enumerate(plan[t]):
                store.put(("u", t, b), store.slots[("s", t, b)][:c])
    drift_before: dict[int, list[float]] = {t: [] for t in range(num_tasks)}
    drift_after: dict[int, list[float]] = {t: [] for t in range(num_tasks)}
    fallbacks: list[str] = []
    routes: dict[str, str] = {}

    def state(role: str, t: int, b: int, cut: int | None = None) -> BlockState:
        st = slots[t][b].state(store.get((role, t, b), device, compute_dtype), device)
        return st.take(cut) if cut is not None else st

    steps_per_block = sum(len(c) for c in calibration)
    overlap = bool(getattr(fc, "prefetch", True))
    prefetch = BlockPrefetcher([src_m, src_0, *src_e], device, num_blocks, enabled=overlap)
    prefetch.schedule(0)
    # calibrated blocks of a merged model on disk: written by a thread (one write in flight)
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="featcal-write") if writer is not None and overlap else None
    writing: Future | None = None

    def write_and_release(index: int, block: nn.Module) -> None:
        writer.write_block(index, block)
        src_m.release(index, block)

    bar = tqdm(range(num_blocks), desc="featcal (streamed)", disable=not fc.progress)
    try:
        for l in bar:
            last = l == num_blocks - 1
            blk, base_blk, *eblks = prefetch.take(l)
            mods = backbone.calibratable_modules(blk)
            qual = {n: qualified.get(id(m), n) for n, m in mods.items()}
            groups = None
            norms: dict = {}
            stop_after: str | None = None
            block_acc = None
            inner = tqdm(total=steps_per_block, desc=f"block {l + 1}/{num_blocks}", leave=False, disable=not fc.progress)
            for t in range(num_tasks):
                eblk = eblks[t]
                emods = backbone.calibratable_modules(eblk)
                if set(emods) != set(mods):
                    raise ValueError(f"expert {t} block {l} has different calibratable modules")
                tokens = sum(s.token_mask.numel() for s in slots[t])
                if block_acc is not None:
                    fc._reset_task_acc(block_acc)
                for b in range(len(slots[t])):
                    s_state = state("s", t, b)
                    e_state = state("e", t, b)
                    with fc._pass_context(device):
                        xs, order, _ = capture_inputs(backbone, blk, mods, s_state, stop_after=stop_after)
                        xe, _, e_out = capture_inputs(backbone, eblk, emods, e_state)
                    store.put(("e", t, b), e_out.hidden)
                    if groups is None:
                        groups, norms = fc._plan(backbone, mods, xs, order, last, tokens)
                        for g in groups:
                            routes[f"{qual[g.leader]}" + ("[readout-weighted]" if g.weighted else "")] = g.route
                    if stop_after is None:
                        stop_after = order[-1]
                    if block_acc is None:
                        block_acc = fc._new_block_acc(groups, norms, device)
                    with fc._gram_context(device):
                        fc._accumulate(block_acc, groups, norms, mods, emods, xs, xe, s_state, backbone)
                    del xs, xe, e_out, s_state, e_state
                    inner.update(1)
                fc._finish_task(block_acc, groups, norms, mods, emods, qual)
                src_e[t].release(l, eblk)
                eblks[t] = None
                del eblk, emods
            inner.close()

            if track:  # the uncalibrated chain, through the block before it is solved
                for t in range(num_tasks):
                    for b, c in enumerate(plan[t]):
                        with fc._pass_context(device):
                            store.put(("u", t, b), backbone.run_block(blk, state("u", t, b, c)).hidden)

            new_params = fc._solve_block(groups or [], norms, mods, backbone.calibratable_modules(base_blk), qual, device, fallbacks)
            for param, value in new_params:
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            src_0.release(l, base_blk)
            del new_params, groups, norms, block_acc

            # next student inputs from the calibrated block (last block: the drift examples only)
            for t in range(num_tasks):
                for b in range(len(slots[t])):
                    if last and (not track or b >= len(plan[t])):
                        continue
                    cut = plan[t][b] if last else None
                    with fc._pass_context(device):
                        out = backbone.run_block(blk, state("s", t, b, cut)).hidden
                    if cut is not None:
                        store.slots[("s", t, b)][:cut].copy_(out)
                    else:
                        store.put(("s", t, b), out)
            if track:
                for t in range(num_tasks):
                    before = [state("u", t, b, c) for b, c in enumerate(plan[t])]
                    after = [state("s", t, b, c) for b, c in enumerate(plan[t])]
                    ref = [state("e", t, b, c) for b, c in enumerate(plan[t])]
                    drift_before[t].append(token_drift(before, ref))
                    drift_after[t].append(token_drift(after, ref))
                bar.set_postfix(
                    drift=f"{sum(v[-1] for v in drift_before.values()) / num_tasks:.3f}"
                    f"->{sum(v[-1] for v in drift_after.values()) / num_tasks:.3f}",
                    rss=f"{current_rss_mib() / 1024:.1f}G",
                )
            if write_pool is not None:
                if writing is not None:
                    writing.result()  # at most one block waits to be written
                writing = write_pool.submit(write_and_release, l, blk)
            else:
                if writer is not None:
                    writer.write_block(l, blk)
                src_m.release(l, blk)
            del blk, base_blk, eblks
        if writing is not None:
            writing.result()
    finally:
        prefetch.close()
        if write_pool is not None:
            write_pool.shutdown(wait=True)

    act_bytes = store.nbytes()
    store.close()
    memory = {
        "activation_store": fc.offload,
        "activation_mib": act_bytes / 2**20,
        "peak_rss_mib": peak_rss_mib(),
        "rss_at_start_mib": rss_start,
        "cuda_peak_mib": _cuda_peak(device),
    }
    msg = (
        f"featcal (streamed): {num_blocks} blocks, {num_tasks} tasks; activations {memory['activation_mib']:.0f} MiB "
        f"({fc.offload}); peak host RSS {memory['peak_rss_mib']:.0f} MiB"
    )
    if memory["cuda_peak_mib"] is not None:
        msg += f"; peak device memory {memory['cuda_peak_mib']:.0f} MiB"
    if fc.progress:
        print(msg)
    log.info(msg)
    tasks = list(backbone.tasks) if len(backbone.tasks) == num_tasks else [str(t) for t in range(num_tasks)]
    report = CalibrationReport(
        method="featcal",
        drift=drift_rows({"before": drift_before, "after": drift_after}, tasks) if track else [],
        fallbacks=fallbacks,
        settings=_settings(fc),
        timings={"total": time.perf_counter() - start},
        extra={
            "drift_examples_per_task": {tasks[t]: sum(plan[t]) for t in range(num_tasks)} if track else {},
            "cross_routes": routes,
            "memory": memory,
        },
    )
    if writer is not None:
        folder = writer.finish()
        report.extra["calibrated_folder"] = str(folder)
        out = DiskCalibratedModel(backbone, folder, merged, device, report)
    else:
        out = CalibratedModel(backbone, merged, report)
    return out


def _settings(fc) -> dict:
    return {
        "lambda_ratio": fc.lam,
        "rho": fc.rho,
        "alpha": fc.alpha,
        "eps": fc.eps,
        "calibrate_bias": fc.calibrate_bias,
        "calibrate_norm": fc.calibrate_norm,
        "token_weighting": fc.token_weighting,
        "last_block_patch_weight": fc.last_block_patch_weight,
        "forward_order": fc.forward_order,
        "dtype": str(fc.dtype).replace("torch.", ""),
        "cross_route": fc.cross_route,
        "drift_examples": fc.drift_examples,
        "streamed": True,
        "offload": fc.offload,
        "activation_dtype": str(fc.activation_dtype).replace("torch.", "") if fc.activation_dtype else None,
    }


class _BlockFolderWriter:
    """Writes a calibrated model on disk: one safetensors shard per calibrated block, one
    shard with every non-block tensor of the merged checkpoint, the index, the config and
    tokenizer files: a normal HF folder."""

    def __init__(self, merged, backbone, output_dir=None):
        self.merged = merged
        self.prefixes = merged.block_prefixes(backbone)
        self.folder = Path(output_dir) if output_dir else merged.folder.with_name(merged.folder.name + ".featcal")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.safetensors"):
            old.unlink()
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from featcal.merge.streaming import ShardWriter

        layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        w = ShardWriter(self.folder / name, layout)
        for k, v in tensors.items():
            w.write(k, v)
            self.weight_map[k] = name
        w.close()
        self.total += w.total_bytes

    def write_block(self, index: int, block: nn.Module) -> None:
        prefix = self.prefixes[index]
        on_disk = {k for k in self.merged.reader.keys() if k.startswith(prefix)}
        sd = {prefix + k: v.detach() for k, v in block.state_dict().items() if prefix + k in on_disk}
        self._write(f"model-block-{index:05d}.safetensors", sd)

    def finish(self) -> Path:
        import json

        from featcal.merge.streaming import INDEX_NAME, copy_model_files

        rest = [k for k in self.merged.reader.keys() if not k.startswith(tuple(self.prefixes))]
        self._write("model-rest.safetensors", {k: self.merged.reader.get(k) for k in rest})
        copy_model_files(self.merged.folder, self.folder)
        (self.folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))
        return self.folder


class DiskCalibratedModel(CalibratedModel):
    """A calibrated model written to disk by the layer-streamed FeatCal; loaded (once, onto
    the calibration device) when a task first asks for it."""

    def __init__(self, backbone, folder: Path, merged_lazy, device: torch.device, report: CalibrationReport):
        super().__init__(backbone, None, report)
        self.folder = Path(folder)
        self._lazy = merged_lazy
        self._device = device
        self._loaded: nn.Module | None = None

    def model_for_task(self, task_index: int) -> nn.Module:
        if self._loaded is None:
            from featcal.backbone.lazy import LazyCausalLM

            lazy = LazyCausalLM(self.folder, self._lazy.dtype, self._lazy.attn_implementation)
            self._loaded = lazy.materialize().to(self._device)
        return self._loaded

    def save(self, folder):
        import shutil

        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(self.folder, folder)
        (folder / "calibration_report.json").write_text(__import__("json").dumps(self.report.to_dict(), indent=2, default=str) + "\n")
        return folder
