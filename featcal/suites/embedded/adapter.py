"""The embedded benchmark's CLIP vision towers, read from its offline build.

The build itself (pre-training, fine-tuning, cache, checksums) lives in
``featcal.suites.embedded.build``; the tasks (splits, zero-shot heads) in
``featcal.suites.embedded.pool``. This adapter only loads the cached base and experts
through ``load_clip_vision``; everything else is the CLIP vision backbone.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from featcal.backbone.clip import CLIPVisionBackbone, load_clip_vision
from featcal.suites.embedded.build import EmbeddedBuild
from featcal.suites.embedded.spec import EmbeddedSpec


class EmbeddedBackbone(EmbeddedBuild, CLIPVisionBackbone):
    """The embedded suite's CLIP vision towers, built on first load and read from the cache.

    ``EmbeddedBackbone(spec={...}, cache_dir=None)`` or with spec fields as keyword
    arguments. ``tasks`` (optional) must agree with the spec.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedSpec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        super().__init__(list(self.selected), base="", experts={t: "" for t in self.selected})

    def load_base(self) -> nn.Module:
        return load_clip_vision(str(self.folder / "base"))

    def load_expert(self, task: str) -> nn.Module:
        return load_clip_vision(str(self.folder / "experts" / task), projection_source=str(self.folder / "base"))
