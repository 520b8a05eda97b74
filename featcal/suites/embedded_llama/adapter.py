"""The embedded LLM suite's model adapter.

``EmbeddedLlamaBackbone`` is the Llama adapter (``featcal.backbone.llama.LlamaBackbone``,
unchanged: streaming loads, streamed merge, layer-streamed FeatCal) whose base and experts
are the suite's cached folders (``featcal.suites.embedded_llama.build``, built on first use).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from featcal.backbone.llama import LlamaBackbone
from featcal.suites.build import BuiltSuite
from featcal.suites.embedded_llama.build import EmbeddedLlamaSpec, ensure_built


class EmbeddedLlamaBuild(BuiltSuite):
    """The embedded_llama suite's spec and cache folder (``featcal.suites.build.BuiltSuite``),
    shared by the adapter and the task pool (``featcal.suites.embedded_llama.pool``)."""

    SPEC = EmbeddedLlamaSpec
    ENSURE_BUILT = staticmethod(ensure_built)


class EmbeddedLlamaBackbone(EmbeddedLlamaBuild, LlamaBackbone):
    """The suite's base and experts through the Llama adapter (``streaming`` as there)."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedLlamaSpec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        streaming: bool = True,
        merge_dir: str | None = None,
        merge_device: str = "cpu",
        merged_on_disk: bool = False,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        names = list(self.spec.tasks)
        super().__init__(
            names, base="", experts={t: "" for t in names}, dtype=dtype, attn_implementation=attn_implementation,
            streaming=streaming, merge_dir=merge_dir, merge_device=merge_device, merged_on_disk=merged_on_disk,
        )

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        return LlamaBackbone.validate_config({k: v for k, v in node.items() if k not in ("experts", "spec")}) + cls.spec_problems(node)

    def _resolve(self) -> None:
        """Point the adapter's sources at the built folders (building them if needed)."""
        folder = self.folder
        self.base_source = str(folder / "base")
        self.expert_sources = {t: str(folder / "experts" / t) for t in self.tasks}

    def load_base(self) -> nn.Module:
        self._resolve()
        return super().load_base()

    def load_expert(self, task: str) -> nn.Module:
        if task not in self.tasks:
            raise KeyError(f"no embedded_llama expert for task '{task}' (tasks: {self.tasks})")
        self._resolve()
        return super().load_expert(task)

    def load_tokenizer(self):
        self._resolve()
        return super().load_tokenizer()
