"""Where FeatCal's in-memory walk keeps the models and the activations: the placement of
the models (host, resident on the device, or prefetched block by block), the activation
check, the joined passes, and the walk's block and state access over models and lists of
block states in memory (``walk.BlockAccess`` / ``walk.StateAccess``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, Inputs, join_states, move_inputs


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


class Resident:
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


class BlockCopier:
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


class InMemoryBlocks:
    """The walk's block access for models in memory (see ``walk.BlockAccess``): block l of
    the merged model goes to the device for its turn, each expert's block l for its task,
    and both go back home after; the base block stays where it is (the solve reads its
    anchors from there). ``placement="prefetch"``: block l + 1 is copied to the device
    from pinned memory on a side stream while block l computes."""

    def __init__(self, backbone: Backbone, merged: nn.Module, base: nn.Module, experts: list[nn.Module],
                 device: torch.device, placement: str):
        self.device = device
        self.merged = backbone.blocks(merged)
        self.base = backbone.blocks(base)
        self.experts = [backbone.blocks(e) for e in experts]
        if len(self.base) != len(self.merged) or any(len(b) != len(self.merged) for b in self.experts):
            raise ValueError("base, merged and experts must have the same number of blocks")
        # each block's home (resident models: the device); blocks copied ahead return there
        self.homes = {id(b): backbone.device_of(b) for b in (*self.merged, *(b for be in self.experts for b in be))}
        self.ahead = BlockCopier(device) if placement == "prefetch" else None
        if self.ahead is not None:
            self.ahead.start(0, self._set(0))

    def _set(self, index: int) -> list[nn.Module]:
        return [self.merged[index], *(be[index] for be in self.experts)]

    def __len__(self) -> int:
        return len(self.merged)

    def take(self, index: int) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        blk = self.merged[index]
        if self.ahead is not None:  # block l arrived (or arrives now); block l + 1 is copied meanwhile
            self.ahead.wait(index, self._set(index))
            if index + 1 < len(self):
                self.ahead.start(index + 1, self._set(index + 1))
        blk.to(self.device)
        return blk, self.base[index], [be[index] for be in self.experts]

    def enter_expert(self, task: int, index: int, block: nn.Module) -> nn.Module:
        return block.to(self.device)

    def leave_expert(self, task: int, index: int, block: nn.Module) -> None:
        block.to(self.homes[id(block)])

    def solved(self, index: int, base_block: nn.Module) -> None:
        pass

    def done(self, index: int, block: nn.Module) -> None:
        block.to(self.homes[id(block)])

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class InMemoryStates:
    """The walk's block states in memory (see ``walk.StateAccess``): per task, lists of
    student and expert states on the work device, consecutive batches joined into passes
    of up to ``pass_tokens`` tokens; the drift chain holds the first examples only."""

    def __init__(self, student: list[list[BlockState]], expert: list[list[BlockState]]):
        self.chains: dict[str, list[list[BlockState]]] = {"s": student, "e": expert, "u": []}

    @classmethod
    def embed(cls, backbone: Backbone, merged: nn.Module, experts: list[nn.Module], calibration: list[list[Inputs]],
              device: torch.device, num_tasks: int, pass_tokens: int | None) -> "InMemoryStates":
        """First-block inputs of every calibration batch: the merged model's (student) and
        each task's expert's, after a check that one block's activations fit."""
        def embed(model, batch):
            return backbone.embed(model, move_inputs(batch, backbone.device_of(model))).to(device)

        first = embed(merged, calibration[0][0])
        check_activation_memory(first, calibration, device)
        student = [[first if t == 0 and i == 0 else embed(merged, b) for i, b in enumerate(calibration[t])]
                   for t in range(num_tasks)]
        del first
        expert = [[embed(experts[t], b) for b in calibration[t]] for t in range(num_tasks)]
        # statistics are sums over tokens: consecutive batches may run as one larger pass
        for t in range(num_tasks):
            student[t], expert[t] = pack_passes(student[t], expert[t], pass_tokens)
        return cls(student, expert)

    def num_batches(self, task: int) -> int:
        return len(self.chains["s"][task])

    def batch_sizes(self, task: int) -> list[int]:
        return [backbone_batch(s) for s in self.chains["s"][task]]

    def tokens(self, task: int) -> int:
        return sum(s.token_mask.numel() for s in self.chains["s"][task])

    def get(self, role: str, task: int, batch: int, cut: int | None = None) -> BlockState:
        state = self.chains[role][task][batch]
        return state.take(cut) if cut is not None else state

    def put(self, role: str, task: int, batch: int, state: BlockState) -> None:
        self.chains[role][task][batch] = state

    def start_chain(self, plan: list[list[int]]) -> None:
        self.chains["u"] = [[s.take(c) for s, c in zip(self.chains["s"][t], counts)] for t, counts in enumerate(plan)]

    def postfix(self) -> dict[str, str]:
        return {}
