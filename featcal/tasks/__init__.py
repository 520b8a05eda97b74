"""Task pools: datasets, preprocessing, heads and metrics per benchmark."""
from featcal.tasks.base import ClassEmbeddingHead, Task, TaskPool, evaluate

__all__ = ["ClassEmbeddingHead", "Task", "TaskPool", "evaluate"]
