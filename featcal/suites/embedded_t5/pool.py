"""The embedded text-to-text suite's task pool.

``EmbeddedT5TaskPool`` is a text-to-text pool (``featcal.tasks.text2text``: batched
greedy generation, exact match) over the suite's in-code data, read from its cache
(``featcal.suites.embedded_t5.build``); the models are read by
``featcal.suites.embedded_t5.adapter.EmbeddedT5Backbone``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from featcal.backbone.t5 import load_t5_tokenizer
from featcal.suites.embedded_t5.build import EmbeddedT5Build
from featcal.suites.embedded_t5.spec import EmbeddedT5Spec
from featcal.tasks.text2text import TextToTextTaskPool


class EmbeddedT5TaskPool(EmbeddedT5Build, TextToTextTaskPool):
    """The suite's tasks as a text-to-text pool: the cached splits (prompt, label word),
    scored by exact match of the greedy answer."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedT5Spec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        max_new_tokens: int = 10,
        calibration_target: str = "expert",
        max_test_examples: int | None = None,
        progress: bool = True,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        super().__init__(
            list(self.spec.tasks), tokenizer=None,
            cache_dir=None if cache_dir is None else str(Path(cache_dir) / "text2text"),
            max_input_length=512, max_new_tokens=max_new_tokens, calibration_target=calibration_target,
            max_test_examples=max_test_examples, progress=progress,
        )
        self._rows: dict[str, dict[str, list[dict]]] = {}

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        return TextToTextTaskPool.validate_config(node) + cls.spec_problems(node)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_t5_tokenizer(str(self.folder / "base"))
        return self._tokenizer

    def _task_rows(self, task: str) -> dict[str, list[dict]]:
        if task not in self._rows:
            if task not in self.spec.tasks:
                raise KeyError(f"unknown embedded_t5 task '{task}' (tasks: {list(self.spec.tasks)})")
            self._rows[task] = json.loads((self.folder / "data" / f"{task}.json").read_text())
        return self._rows[task]

    def load_split(self, task: str, split: str) -> Sequence[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self._task_rows(task)[split]

    def split_size(self, task: str, split: str) -> int:
        return self.spec.n_train if split == "train" else self.spec.n_test

    def render_input(self, task: str, row: dict) -> str:
        return row["input"]

    def render_target(self, task: str, row: dict) -> str:
        return row["target"]

    def source_identity(self, task: str, split: str) -> Any:
        return ["embedded_t5", self.spec.spec_hash(), task, split]
