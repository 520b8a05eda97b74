"""Layer-streamed FeatCal: bounded device and host memory for LLM-sized models.

The same block loop as the in-memory driver (``walk.py``: the same closed forms,
statistics and drift chains), over other places for the models and the activations:

- **Models, block by block.** Block l of the merged model, of the base and of each
  expert is acquired when its turn comes through the backbone's ``block_source(model)``:
  a model on disk (``backbone.is_on_disk``) has only that block's tensors read from its
  safetensors shards, then dropped; an in-memory model has the block moved to the device
  and back. An in-memory merged model (the output) stays on the host and its block l
  is written in place; a merged model on disk is read block by block
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

import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, move_inputs
from featcal.calibration.base import CalibratedModel, CalibrationReport
from featcal.calibration.feature_calibration.walk import walk
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


def _acquire_pinned(src, index: int, device: torch.device, stream) -> tuple[nn.Module, Any]:
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

    def __init__(self, sources: list, device: torch.device, num_blocks: int, enabled: bool = True):
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


class StreamedStates:
    """The walk's block states in a host :class:`ActivationStore` (see ``walk.StateAccess``):
    only hidden states are stored (one slot per role, task and batch, overwritten in place
    block after block); masks and extras are the first block's (``_Slot``), which suits
    families whose blocks keep them (decoder LLMs). One batch at a time visits the device."""

    def __init__(self, store: ActivationStore, slots: list[list[_Slot]], device: torch.device, compute_dtype: torch.dtype):
        self.store = store
        self.slots = slots
        self.device = device
        self.compute_dtype = compute_dtype

    @classmethod
    def embed(cls, backbone: Backbone, store: ActivationStore, merged_source, expert_sources: list,
              calibration: list[list[Any]], num_tasks: int, device: torch.device) -> "StreamedStates":
        """First-block inputs of every calibration batch of the merged model and of each
        task's expert (a model on disk: its shell, the model without its blocks)."""
        dtypes: list[torch.dtype] = []

        def embed_all(model: nn.Module, role: str, t: int) -> list[_Slot]:
            out = []
            home = backbone.device_of(model)
            for b, batch in enumerate(calibration[t]):
                st = backbone.embed(model, move_inputs(batch, home))
                dtypes.append(st.hidden.dtype)
                store.put((role, t, b), st.hidden)
                out.append(_Slot(st))
            return out

        shell = merged_source.embedder()
        slots = [embed_all(shell, "s", t) for t in range(num_tasks)]
        del shell
        for t in range(num_tasks):
            shell = expert_sources[t].embedder()
            embed_all(shell, "e", t)  # same masks as the student's: only the hidden states are kept
            del shell
        return cls(store, slots, device, dtypes[0])

    def num_batches(self, task: int) -> int:
        return len(self.slots[task])

    def batch_sizes(self, task: int) -> list[int]:
        return [s.batch for s in self.slots[task]]

    def tokens(self, task: int) -> int:
        return sum(s.token_mask.numel() for s in self.slots[task])

    def get(self, role: str, task: int, batch: int, cut: int | None = None) -> BlockState:
        st = self.slots[task][batch].state(self.store.get((role, task, batch), self.device, self.compute_dtype), self.device)
        return st.take(cut) if cut is not None else st

    def put(self, role: str, task: int, batch: int, state: BlockState) -> None:
        """Store the hidden states; fewer rows than the slot holds (the last block's drift
        examples) overwrite the slot's first rows."""
        slot = self.store.slots.get((role, task, batch))
        hidden = state.hidden
        if slot is not None and hidden.shape[1:] == slot.shape[1:] and hidden.shape[0] < slot.shape[0]:
            slot[: hidden.shape[0]].copy_(hidden)
        else:
            self.store.put((role, task, batch), hidden)

    def start_chain(self, plan: list[list[int]]) -> None:
        for t, counts in enumerate(plan):
            for b, c in enumerate(counts):
                self.store.put(("u", t, b), self.store.slots[("s", t, b)][:c])

    def postfix(self) -> dict[str, str]:
        return {"rss": f"{current_rss_mib() / 1024:.1f}G"}


class StreamedBlocks:
    """The walk's block access for the streamed run (see ``walk.BlockAccess``): block l of
    every model from its block source through a :class:`BlockPrefetcher` (block l + 1
    loading meanwhile), each given back when its part is done; calibrated blocks of a
    merged model on disk are written by ``writer`` (from a thread when ``overlap``)."""

    def __init__(self, merged_source, base_source, expert_sources: list, device: torch.device, overlap: bool, writer=None):
        self.src_m, self.src_0, self.src_e = merged_source, base_source, expert_sources
        self.num_blocks = len(merged_source)
        if len(base_source) != self.num_blocks or any(len(s) != self.num_blocks for s in expert_sources):
            raise ValueError("base, merged and experts must have the same number of blocks")
        self.prefetch = BlockPrefetcher([merged_source, base_source, *expert_sources], device, self.num_blocks, enabled=overlap)
        self.prefetch.schedule(0)
        self.writer = writer
        # calibrated blocks of a merged model on disk: written by a thread (one write in flight)
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="featcal-write") if writer is not None and overlap else None
        self.writing: Future | None = None

    def __len__(self) -> int:
        return self.num_blocks

    def take(self, index: int) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        blk, base_blk, *expert_blocks = self.prefetch.take(index)
        return blk, base_blk, expert_blocks

    def enter_expert(self, task: int, index: int, block: nn.Module) -> nn.Module:
        return block

    def leave_expert(self, task: int, index: int, block: nn.Module) -> None:
        self.src_e[task].release(index, block)

    def solved(self, index: int, base_block: nn.Module) -> None:
        self.src_0.release(index, base_block)

    def _write_and_release(self, index: int, block: nn.Module) -> None:
        self.writer.write_block(index, block)
        self.src_m.release(index, block)

    def done(self, index: int, block: nn.Module) -> None:
        if self.write_pool is not None:
            if self.writing is not None:
                self.writing.result()  # at most one block waits to be written
            self.writing = self.write_pool.submit(self._write_and_release, index, block)
        else:
            if self.writer is not None:
                self.writer.write_block(index, block)
            self.src_m.release(index, block)

    def finish(self) -> None:
        if self.writing is not None:
            self.writing.result()

    def close(self) -> None:
        self.prefetch.close()
        if self.write_pool is not None:
            self.write_pool.shutdown(wait=True)


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
    on_disk = backbone.is_on_disk(merged)
    if not on_disk:
        merged.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = current_rss_mib()
    qualified = backbone.module_names(merged)
    src_m, src_0 = backbone.block_source(merged), backbone.block_source(base)
    src_e = [backbone.block_source(e) for e in experts]
    store = ActivationStore(fc.offload, fc.offload_dir, fc.activation_dtype, pin=device.type == "cuda")
    states = StreamedStates.embed(backbone, store, src_m, src_e, calibration, num_tasks, device)
    writer = backbone.block_writer(merged, fc.output_dir) if on_disk else None
    blocks = StreamedBlocks(src_m, src_0, src_e, device, fc.prefetch, writer)
    result = walk(fc, backbone, blocks, states, num_tasks, device, qualified, desc="featcal (streamed)")

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
        f"featcal (streamed): {len(blocks)} blocks, {num_tasks} tasks; activations {memory['activation_mib']:.0f} MiB "
        f"({fc.offload}); peak host RSS {memory['peak_rss_mib']:.0f} MiB"
    )
    if memory["cuda_peak_mib"] is not None:
        msg += f"; peak device memory {memory['cuda_peak_mib']:.0f} MiB"
    if fc.progress:
        print(msg)
    log.info(msg)
    report = result.report(backbone.tasks, fc.settings(streamed=True), start, {"memory": memory})
    if writer is not None:
        folder = writer.finish()
        report.extra["calibrated_folder"] = str(folder)
        return DiskCalibratedModel(backbone, folder, merged, device, report)
    return CalibratedModel(backbone, merged, report)


class DiskCalibratedModel(CalibratedModel):
    """A calibrated model written to disk by the layer-streamed FeatCal; loaded (once, onto
    the calibration device) when a task first asks for it."""

    def __init__(self, backbone, folder: Path, merged_on_disk, device: torch.device, report: CalibrationReport):
        super().__init__(backbone, None, report)
        self.folder = Path(folder)
        self._merged_on_disk = merged_on_disk
        self._device = device
        self._loaded: nn.Module | None = None

    def model_for_task(self, task_index: int) -> nn.Module:
        if self._loaded is None:
            saved = self.backbone.open_saved(self.folder, like=self._merged_on_disk)
            self._loaded = self.backbone.materialize(saved).to(self._device)
        return self._loaded

    def save(self, folder):
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(self.folder, folder)
        (folder / "calibration_report.json").write_text(json.dumps(self.report.to_dict(), indent=2, default=str) + "\n")
        return folder
