"""Task pool interface: data, heads, metrics and evaluation per benchmark.

A task pool is ordered like the backbone's experts (task i <-> expert i). It hands
out unlabeled calibration batches (train split by default, shuffled with the run
seed, first n) and evaluates models with its family's own scorer:
``evaluate(model_for_task, device, batch_size) -> {task: {metric: value}}``, where
``model_for_task(i)`` is the family's model (a ``CLIPVisionModelWithProjection``,
a ``T5ForConditionalGeneration``, a causal LM) to score task i with.
Calibrators never see a task pool, only the calibration batches.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Backbone, Inputs, move_inputs

#: {task: {metric: value}}
Metrics = dict[str, dict[str, float]]


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
    """One classification task: its head and its data access."""

    name: str
    head: nn.Module
    #: (n, seed, batch_size, split) -> iterator over unlabeled input batches (n: int or "all")
    calibration_batches: Callable[[int, int, int, str], Iterator[Inputs]]
    #: batch_size -> iterator over (inputs, labels)
    test_batches: Callable[[int], Iterator[tuple[Inputs, torch.Tensor]]]


class TaskPool(abc.ABC):
    """An ordered collection of tasks, aligned with a backbone's experts.

    What a model's representation is and how a model is stored (loaded or on disk) are the
    model layer's business: a pool asks the adapter of the models it scores, which the run
    hands it with ``bind``; a pool used on its own asks its family's adapter
    (``family_backbone``)."""

    _backbone: Backbone | None = None

    def bind(self, backbone: Backbone) -> "TaskPool":
        """Score models through ``backbone`` (the run's model adapter); returns the pool."""
        self._backbone = backbone
        return self

    def backbone(self) -> Backbone:
        """The model adapter this pool asks: the bound one, else its family's."""
        if self._backbone is None:
            self._backbone = self.family_backbone()
        return self._backbone

    def family_backbone(self) -> Backbone:
        """The adapter of this pool's model family, with no models configured (only its
        model-independent API is used: representation, storage); pools that ask none raise."""
        raise NotImplementedError(f"{type(self).__name__} has no model family adapter; bind one with pool.bind(backbone)")

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        """Problems with this pool's config node (``key=value: what is allowed``),
        found before anything loads; ``featcal.config.validate`` collects them."""
        return []

    @property
    @abc.abstractmethod
    def names(self) -> list[str]:
        """Task names, in expert order."""

    @abc.abstractmethod
    def calibration_set(self, n: int | str, seed: int, batch_size: int, split: str = "train") -> list[list[Inputs]]:
        """Per task, a list of unlabeled batches holding n examples in total."""

    @abc.abstractmethod
    def evaluate(
        self,
        model_for_task: Callable[[int], nn.Module],
        device: torch.device | str,
        batch_size: int = 256,
        only: list[int] | None = None,
        desc: str = "",
    ) -> Metrics:
        """``{task: {metric: value}}`` for every task (or the indices in ``only``);
        ``model_for_task(i)`` is the model to score task i with."""

    def primary_metric(self, task: str) -> str:
        """The metric of ``task`` that the run averages and tables show."""
        return "accuracy"

    def finalize(self, metrics: dict[str, Metrics]) -> dict[str, Metrics]:
        """Metrics that need several stages at once (``{stage: {task: {metric: v}}}``,
        e.g. merged ÷ expert), added once every stage is evaluated; default: unchanged."""
        return metrics


class ClassificationTaskPool(TaskPool):
    """CLIP-style pools: each task has a frozen head on the model's final representation
    (the adapter's ``represent``: CLIP's projected image embedding); the metric is top-1
    accuracy in %."""

    def family_backbone(self) -> Backbone:
        from featcal.backbone.clip import CLIPVisionBackbone

        return CLIPVisionBackbone([], base="", experts=[])

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

    def calibration_set(self, n: int | str, seed: int, batch_size: int, split: str = "train") -> list[list[Inputs]]:
        """Per task, a list of unlabeled batches holding n examples in total (n = "all":
        the whole split, in a seeded order)."""
        return [list(t.calibration_batches(n, seed, batch_size, split)) for t in self.tasks]

    @torch.no_grad()
    def evaluate(
        self,
        model_for_task: Callable[[int], nn.Module],
        device: torch.device | str,
        batch_size: int = 256,
        only: list[int] | None = None,
        desc: str = "",
    ) -> Metrics:
        out: Metrics = {}
        represent = self.backbone().represent
        for i, task in enumerate(self.tasks):
            if only is not None and i not in only:
                continue
            model = model_for_task(i)
            head = task.head.to(device)
            # counts stay on the device: no host round trip per batch
            correct = torch.zeros((), dtype=torch.long, device=device)
            total = 0
            for inputs, labels in tqdm(task.test_batches(batch_size), desc=f"{desc}:{task.name}", leave=False):
                z = represent(model, move_inputs(inputs, device))
                pred = head(z).argmax(-1)
                correct += (pred == labels.to(pred.device, non_blocking=True)).sum()
                total += int(labels.numel())
            out[task.name] = {"accuracy": 100.0 * int(correct.item()) / max(total, 1)}
        return out


def scores(metrics: Metrics, pool: TaskPool) -> dict[str, float]:
    """Per task its primary metric, plus ``average`` (their mean)."""
    out = {task: float(values[pool.primary_metric(task)]) for task, values in metrics.items()}
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out


def model_for_task_of(models: Any) -> Callable[[int], nn.Module]:
    """``model_for_task`` from one model (every task) or a list of models (one per task)."""
    if isinstance(models, (list, tuple)):
        return lambda i: models[i]
    return lambda i: models
