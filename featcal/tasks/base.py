"""Task pool interface: data, heads and metrics per task.

A task pool is ordered like the backbone's experts (task i <-> expert i). It hands
out unlabeled calibration batches (train split by default, shuffled with the run
seed, first n) and labeled test batches, and scores final representations with the
task's head. Calibrators never see a task pool, only the calibration batches.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Inputs, move_inputs


class ClassEmbeddingHead(nn.Module):
    """CLIP-style head: logits = scale · cos(z, class embedding).

    ``class_embeddings`` [C, D] are L2-normalised and frozen (buffers).
    """

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        emb = torch.nn.functional.normalize(class_embeddings.float(), dim=-1)
        self.register_buffer("class_embeddings", emb)
        self.logit_scale = float(logit_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.normalize(z.float(), dim=-1)
        return self.logit_scale * z @ self.class_embeddings.t()


@dataclass
class Task:
    """One task: its head and its data access."""

    name: str
    head: nn.Module
    #: (n, seed, batch_size, split) -> iterator over unlabeled input batches
    calibration_batches: Callable[[int, int, int, str], Iterator[Inputs]]
    #: batch_size -> iterator over (inputs, labels)
    test_batches: Callable[[int], Iterator[tuple[Inputs, torch.Tensor]]]
    train_size: int | None = None
    metric: str = "accuracy"


class TaskPool(abc.ABC):
    """An ordered collection of tasks, aligned with a backbone's experts."""

    @property
    @abc.abstractmethod
    def tasks(self) -> list[Task]:
        ...

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def heads(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per task, final representation [B, D] -> class logits [B, C] (what AdaMerging's
        entropy objective scores). Merges receive these, never the task names or data."""
        return [t.head for t in self.tasks]

    def calibration_set(self, n: int, seed: int, batch_size: int, split: str = "train") -> list[list[Inputs]]:
        """Per task, a list of unlabeled batches holding n examples in total."""
        return [list(t.calibration_batches(n, seed, batch_size, split)) for t in self.tasks]


@torch.no_grad()
def evaluate(
    represent: Callable[[Inputs, int], torch.Tensor],
    pool: TaskPool,
    device: torch.device | str,
    batch_size: int = 256,
    only: list[int] | None = None,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Top-1 accuracy (in %) per task of ``represent(inputs, task_index) -> z``."""
    out: dict[str, float] = {}
    for i, task in enumerate(pool.tasks):
        if only is not None and i not in only:
            continue
        head = task.head.to(device)
        # counts stay on the device: no host round trip per batch
        correct = torch.zeros((), dtype=torch.long, device=device)
        total = 0
        for inputs, labels in tqdm(task.test_batches(batch_size), desc=f"{desc}:{task.name}", leave=False):
            z = represent(move_inputs(inputs, device), i)
            pred = head(z).argmax(-1)
            correct += (pred == labels.to(pred.device, non_blocking=True)).sum()
            total += int(labels.numel())
        out[task.name] = 100.0 * int(correct.item()) / max(total, 1)
    return out
