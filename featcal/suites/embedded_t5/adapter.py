"""The embedded text-to-text suite's model adapter.

``EmbeddedT5Backbone`` is the T5 adapter (``featcal.backbone.t5.T5Backbone``: encoder
blocks then decoder blocks, label-free decoder targets from each expert's greedy answer)
whose base and experts come from the suite's cache, built on first use
(``featcal.suites.embedded_t5.build``).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from featcal.backbone.t5 import T5Backbone, load_t5, load_t5_tokenizer
from featcal.suites.embedded_t5.build import EmbeddedT5Build
from featcal.suites.embedded_t5.spec import EmbeddedT5Spec


class EmbeddedT5Backbone(EmbeddedT5Build, T5Backbone):
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
