"""Task pools: datasets, preprocessing, heads, metrics and evaluation per benchmark."""
from featcal.tasks.base import ClassEmbeddingHead, ClassificationTaskPool, Metrics, Task, TaskPool, scores

__all__ = ["ClassEmbeddingHead", "ClassificationTaskPool", "Metrics", "Task", "TaskPool", "scores"]
