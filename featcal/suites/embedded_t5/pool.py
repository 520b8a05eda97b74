"""The embedded text-to-text suite as a backbone and a task pool.

``EmbeddedT5Backbone`` is the T5 adapter (``featcal.backbone.t5.T5Backbone``: encoder
blocks then decoder blocks, label-free decoder targets from each expert's greedy answer)
whose base and experts come from the suite's cache, built on first use
(``featcal.tasks.embedded_t5``). ``EmbeddedT5TaskPool`` is a text-to-text pool
(``featcal.tasks.text2text``: batched greedy generation, exact match) over the suite's
in-code data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from featcal.backbone.t5 import T5Backbone, load_t5, load_t5_tokenizer
from featcal.cache import BuiltSuite
from featcal.tasks.embedded_t5 import EmbeddedT5Spec, ensure_built
from featcal.tasks.text2text import TextToTextTaskPool


class _EmbeddedT5Build(BuiltSuite):
    """The embedded_t5 suite's spec and cache folder (``featcal.cache.BuiltSuite``)."""

    SPEC = EmbeddedT5Spec
    ENSURE_BUILT = staticmethod(ensure_built)


class EmbeddedT5Backbone(_EmbeddedT5Build, T5Backbone):
    """The suite's base and experts through the T5 adapter.

    ``EmbeddedT5Backbone(spec={...}, cache_dir=None)`` or with spec fields as keyword
    arguments; ``tasks`` (optional) must agree with the spec. The remaining arguments
    are ``T5Backbone``'s.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedT5Spec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        dtype: str = "float32",
        calibration_target: str = "expert",
        max_new_tokens: int = 10,
        generation_batch_size: int = 64,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        names = list(self.spec.tasks)
        super().__init__(
            names, base="", experts={t: "" for t in names}, lora=False, dtype=dtype,
            calibration_target=calibration_target, max_new_tokens=max_new_tokens,
            generation_batch_size=generation_batch_size,
        )

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        return T5Backbone.validate_config({k: v for k, v in node.items() if k != "experts"}) + cls.spec_problems(node)

    def load_base(self) -> nn.Module:
        model = load_t5(str(self.folder / "base"), self.dtype)
        self._base_cache = model
        return model

    def load_expert(self, task: str) -> nn.Module:
        if task not in self.tasks:
            raise KeyError(f"no embedded_t5 expert for task '{task}' (tasks: {self.tasks})")
        return load_t5(str(self.folder / "experts" / task), self.dtype)

    def load_tokenizer(self):
        return load_t5_tokenizer(str(self.folder / "base"))


class EmbeddedT5TaskPool(_EmbeddedT5Build, TextToTextTaskPool):
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
